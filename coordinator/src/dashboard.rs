//! The dashboard: one self-contained page at `/`, kept live over server-sent events.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /` | the page (`dashboard.html`: HTML, CSS and script in one file, nothing fetched from elsewhere) |
//! | `GET /api/dashboard` | one [`Frame`] as JSON |
//! | `GET /api/stream` | `text/event-stream`: a `frame` event with a [`Frame`] every second |
//!
//! A frame is everything the page shows: every node as the registry snapshot has it (health
//! score and its four terms, the coordinator's breaker with its reason, the device's own
//! breaker and readings, tasks in flight, last seen), the newest tasks with their node, latency
//! and verdict, tasks by status, tasks ended per second over the last five minutes
//! ([`crate::metrics::Series`]), the largest ledger balances and whether the ledger's hash
//! chain verifies.
//!
//! Each frame is read from the database, read-only, on a blocking thread, like every API
//! read: a watcher never slows the dispatcher. The ledger check reads the whole chain, so a
//! stream runs it when it starts and then every [`VERIFY_EVERY`] frames; frames in between
//! carry the last result.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse};
use futures_util::Stream;
use serde::Serialize;

use crate::http::{Api, ApiError};
use crate::metrics::Point;
use crate::store::{Balance, LedgerCheck, Store};
use crate::{NodeView, TaskEvent};

/// Most nodes one frame carries.
pub const MAX_NODES: usize = 500;
/// Tasks in a frame's feed.
pub const FEED: usize = 30;
/// Ledger balances in a frame, largest first.
pub const BALANCES: usize = 20;
/// Frames between two ledger checks on one stream.
pub const VERIFY_EVERY: u64 = 10;
/// Time between two frames of a stream.
pub const INTERVAL: Duration = Duration::from_secs(1);

const PAGE: &str = include_str!("dashboard.html");

/// What the page shows, at one moment.
#[derive(Debug, Serialize)]
pub struct Frame {
    /// When it was read, in Unix milliseconds.
    pub at_ms: u64,
    /// Whether the coordinator is connected to its broker.
    pub broker_connected: bool,
    /// Nodes in the registry snapshot (at most [`MAX_NODES`]).
    pub nodes: Vec<NodeView>,
    /// How many nodes the snapshot holds.
    pub nodes_total: usize,
    /// Inputs dropped, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Tasks in the journal, by status.
    pub tasks_by_status: BTreeMap<&'static str, u64>,
    /// The newest tasks, newest first.
    pub feed: Vec<FeedItem>,
    /// Tasks ended per second, over the last five minutes.
    pub series: Vec<Point>,
    /// The largest balances by amount.
    pub balances: Vec<Balance>,
    /// The latest ledger check, if one ran on this stream.
    pub ledger: Option<LedgerCheck>,
}

/// One task in the feed.
#[derive(Debug, Serialize)]
pub struct FeedItem {
    /// The task.
    pub task_id: String,
    /// `pending`, `running`, `completed` or `failed`.
    pub status: &'static str,
    /// Dispatch attempts.
    pub attempts: u16,
    /// Nodes whose result was accepted.
    pub nodes: Vec<String>,
    /// Submission to final event, in milliseconds.
    pub latency_ms: Option<f64>,
    /// How the result was verified: `receipt`, `replicate:K`, `target:E`, with `+spot` for a spot check.
    pub verdict: Option<String>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// Reads one frame; `ledger` is the check to carry.
fn read_frame(store: &Store, api: &Api, ledger: Option<LedgerCheck>) -> Result<Frame, ApiError> {
    let at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut nodes = store.node_views()?;
    let nodes_total = nodes.len();
    nodes.truncate(MAX_NODES);
    let feed = store
        .tasks(FEED, None)?
        .into_iter()
        .map(|row| {
            let event = row
                .result_json
                .as_deref()
                .and_then(|j| serde_json::from_str::<TaskEvent>(j).ok());
            let verdict = event.as_ref().and_then(|e| e.verdict.as_ref()).map(|v| {
                let spot = match (v.spot_checked, &v.spot_check_missed) {
                    (false, _) => "",
                    (true, None) => "+spot",
                    (true, Some(_)) => "+spot missed",
                };
                format!("{}{spot}", v.policy)
            });
            FeedItem {
                task_id: row.task_id.to_string(),
                status: row.status.as_str(),
                attempts: row.attempts,
                latency_ms: event.as_ref().and_then(|e| e.latency_ms),
                error: event
                    .as_ref()
                    .and_then(|e| e.error.as_ref())
                    .map(|e| format!("{}: {}", e.code, e.message)),
                nodes: event.map(|e| e.nodes).unwrap_or_default(),
                verdict,
            }
        })
        .collect();
    let mut balances = store.balances()?;
    balances.sort_by_key(|b| std::cmp::Reverse(b.balance.unsigned_abs()));
    balances.truncate(BALANCES);
    Ok(Frame {
        at_ms: u64::try_from(at.as_millis()).unwrap_or(u64::MAX),
        broker_connected: api.link.connected.load(Ordering::Relaxed),
        nodes,
        nodes_total,
        dropped: store.dropped()?,
        tasks_by_status: store
            .task_counts()?
            .into_iter()
            .map(|(s, n)| (s.as_str(), n))
            .collect(),
        feed,
        series: api.metrics.series(at.as_secs()),
        balances,
        ledger,
    })
}

/// `GET /`.
pub(crate) async fn page() -> impl IntoResponse {
    Html(PAGE)
}

/// `GET /api/dashboard`: one frame, with a fresh ledger check.
pub(crate) async fn frame(State(api): State<Api>) -> Result<Json<Frame>, ApiError> {
    let reader = api.clone();
    crate::http::read(&api, move |store| {
        let check = store.verify_ledger()?;
        Ok(Json(read_frame(store, &reader, Some(check))?))
    })
    .await
}

/// `GET /api/stream`: a frame a second, until the page goes away. A frame that cannot be
/// read (the journal briefly unavailable) is skipped; the stream goes on.
pub(crate) async fn stream(
    State(api): State<Api>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let stop = api.stop.clone().cancelled_owned();
    let state = (api, ticks, 0_u64, None::<LedgerCheck>);
    let frames = futures_util::stream::unfold(state, |(api, mut ticks, n, check)| async move {
        loop {
            ticks.tick().await;
            let (reader, carried) = (api.clone(), check.clone());
            let read = crate::http::read(&api, move |store| {
                let check = match carried {
                    Some(c) if n % VERIFY_EVERY != 0 => c,
                    _ => store.verify_ledger()?,
                };
                read_frame(store, &reader, Some(check))
            })
            .await;
            let Ok(frame) = read else { continue };
            let event = Event::default().event("frame").json_data(&frame);
            let Ok(event) = event else { continue };
            return Some((Ok(event), (api, ticks, n + 1, frame.ledger)));
        }
    });
    // Ends when the service stops, so its graceful shutdown is not held by an open page.
    Sse::new(futures_util::StreamExt::take_until(frames, stop)).keep_alive(KeepAlive::default())
}
