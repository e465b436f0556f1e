//! The HTTP API: the journal, the node snapshot and the ledger as typed JSON, the service's
//! health, and task submission for clients that do not speak MQTT.
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /` | the dashboard; with `GET /api/dashboard` and `GET /api/stream`, see [`crate::dashboard`] |
//! | `GET /metrics` | Prometheus text (OpenMetrics); see [`crate::metrics`] |
//! | `GET /healthz` | 200 when the journal is readable and the broker connected, else 503; both named |
//! | `GET /api/nodes` | `{"nodes": [NodeView], "dropped": {reason: count}}`, as `ambient nodes --json` |
//! | `GET /api/nodes/{id}` | one `NodeView`, or 404 |
//! | `GET /api/tasks?status=&limit=` | the newest tasks (`limit` 20, at most 1,000), each with its final event as `result` |
//! | `GET /api/tasks/{id}` | one task, or 404 |
//! | `GET /api/ledger` | balances by account |
//! | `GET /api/ledger/verify` | the hash chain and the books checked: 200 if they hold, 500 if not |
//! | `POST /api/tasks` | one submission's JSON, as on `ambient/v1/tasks/submit` (arrays go over MQTT): 202 `{"task_id", "events"}`, or 400 `{"error": {code, message}}` |
//!
//! Reads open the database read-only on a blocking thread, per request; WAL mode lets them run
//! beside the dispatcher's commits, so the API never waits on, or slows, the dispatcher. A
//! submission is checked with the same intake code first (a bad one gets its `rejected` code
//! at once) and then published to `ambient/v1/tasks/submit` like any MQTT client's, so it is
//! journaled, acknowledged, deduplicated and answered exactly the same way; it shows in
//! `GET /api/tasks/{id}` once journaled, and its events go to the topic in `events`.
//!
//! The API has no authentication: it listens on loopback unless `[http] listen` says
//! otherwise, and should stay there or behind a proxy that authenticates.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ambient_core::{NodeId, TaskId, topics};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rumqttc::{AsyncClient, QoS};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, TaskStatus};
use crate::{NodeView, Submission};

/// Most tasks one `GET /api/tasks` returns.
pub const MAX_TASKS: usize = 1_000;

/// What the handlers share: where the database is, the broker client submissions go
/// through, and whether that client is connected.
#[derive(Clone)]
pub(crate) struct Api {
    pub db: PathBuf,
    pub client: AsyncClient,
    pub link: Arc<crate::service::Link>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Cancelled when the service stops: live streams end then, so the server's graceful
    /// shutdown does not wait on a browser tab that is still open.
    pub stop: tokio_util::sync::CancellationToken,
}

/// The routes of the module docs.
pub(crate) fn router(api: Api) -> Router {
    Router::new()
        .route("/", get(crate::dashboard::page))
        .route("/api/dashboard", get(crate::dashboard::frame))
        .route("/api/stream", get(crate::dashboard::stream))
        .route("/healthz", get(health))
        .route("/metrics", get(metrics))
        .route("/api/nodes", get(nodes))
        .route("/api/nodes/{id}", get(node))
        .route("/api/tasks", get(tasks).post(submit))
        .route("/api/tasks/{id}", get(task))
        .route("/api/ledger", get(ledger))
        .route("/api/ledger/verify", get(verify))
        .layer(DefaultBodyLimit::max(ambient_core::MAX_SUBMISSION_BYTES))
        .with_state(api)
}

/// An error answer: `{"error": {"code", "message"}}` with its status.
pub(crate) struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.1, "message": self.2}});
        (self.0, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match e {
            StoreError::Missing { .. } | StoreError::NeedsMigration { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, "journal_unavailable", e.to_string())
    }
}

fn not_found(what: String) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "not_found", what)
}

/// Runs `read` on a read-only store, on a blocking thread.
pub(crate) async fn read<T: Send + 'static>(
    api: &Api,
    read: impl FnOnce(&Store) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let db = api.db.clone();
    tokio::task::spawn_blocking(move || read(&Store::open_read_only(&db)?))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
}

async fn metrics(State(api): State<Api>) -> Result<Response, ApiError> {
    let (metrics, connected) = (
        api.metrics.clone(),
        api.link.connected.load(Ordering::Relaxed),
    );
    let text = read(&api, move |store| Ok(metrics.render(store, connected)?)).await?;
    let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    Ok(([(axum::http::header::CONTENT_TYPE, kind)], text).into_response())
}

#[derive(Serialize)]
struct Health {
    journal: String,
    broker: &'static str,
}

async fn health(State(api): State<Api>) -> (StatusCode, Json<Health>) {
    let journal = read(&api, |store| Ok(store.nodes_saved_ms()?)).await;
    let connected = api.link.connected.load(Ordering::Relaxed);
    let body = Health {
        journal: match &journal {
            Ok(_) => "ok".into(),
            Err(ApiError(_, _, message)) => message.clone(),
        },
        broker: if connected {
            "connected"
        } else {
            "disconnected"
        },
    };
    let status = if journal.is_ok() && connected {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

#[derive(Serialize)]
struct Nodes {
    nodes: Vec<NodeView>,
    dropped: BTreeMap<String, u64>,
}

async fn nodes(State(api): State<Api>) -> Result<Json<Nodes>, ApiError> {
    read(&api, |store| {
        Ok(Json(Nodes {
            nodes: store.node_views()?,
            dropped: store.dropped()?,
        }))
    })
    .await
}

async fn node(State(api): State<Api>, Path(id): Path<String>) -> Result<Json<NodeView>, ApiError> {
    let node = NodeId::from_hex(&id.to_ascii_lowercase()).ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "bad_node_id",
            format!("{id:?} is not a node id (32 hex characters)"),
        )
    })?;
    read(&api, move |store| {
        store
            .node_views()?
            .into_iter()
            .find(|v| v.node == node)
            .map(Json)
            .ok_or_else(|| not_found(format!("no node {node} in the snapshot")))
    })
    .await
}

#[derive(Deserialize)]
struct TasksQuery {
    status: Option<String>,
    limit: Option<usize>,
}

async fn tasks(State(api): State<Api>, Query(q): Query<TasksQuery>) -> Result<Response, ApiError> {
    let status = q
        .status
        .map(|s| {
            s.parse::<TaskStatus>()
                .map_err(|e| ApiError(StatusCode::BAD_REQUEST, "bad_status", e.to_string()))
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(20).min(MAX_TASKS);
    read(&api, move |store| {
        Ok(Json(store.tasks(limit, status)?).into_response())
    })
    .await
}

async fn task(State(api): State<Api>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let task_id = TaskId::new(&id).ok_or_else(|| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "bad_task_id",
            format!("{id:?} is not a task id (1 to 64 characters from A-Z a-z 0-9 . _ -)"),
        )
    })?;
    read(&api, move |store| {
        store
            .task(&task_id)?
            .map(|row| Json(row).into_response())
            .ok_or_else(|| not_found(format!("task {task_id} is not in the journal")))
    })
    .await
}

async fn ledger(State(api): State<Api>) -> Result<Response, ApiError> {
    read(&api, |store| Ok(Json(store.balances()?).into_response())).await
}

async fn verify(State(api): State<Api>) -> Result<Response, ApiError> {
    read(&api, |store| {
        let check = store.verify_ledger()?;
        let status = if check.is_ok() {
            StatusCode::OK
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        Ok((status, Json(check)).into_response())
    })
    .await
}

#[derive(Serialize)]
struct Submitted {
    task_id: String,
    /// The topic the task's events are published to.
    events: String,
}

async fn submit(
    State(api): State<Api>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Submitted>), ApiError> {
    let bad =
        |code: &'static str, message: String| ApiError(StatusCode::BAD_REQUEST, code, message);
    let mut submission: Submission = serde_json::from_slice(&body).map_err(|e| {
        bad(
            "bad_json",
            format!("submission is not valid JSON for the task schema: {e}"),
        )
    })?;
    // The id is chosen here, so the client learns it before the coordinator has seen the task.
    let id = submission
        .task_id
        .get_or_insert_with(|| format!("http-{:016x}", rand::random::<u64>()))
        .clone();
    let json = serde_json::to_vec(&submission)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    // Whether a module named by hash is stored is the dispatcher's to say, on the events topic.
    let parsed = crate::intake::parse(&json, |_| true, unreachable_id)
        .map_err(|r| bad(r.code, r.message))?;
    let events = topics::task_result(&parsed.spec.task_id).to_string();
    if !api.link.connected.load(Ordering::Relaxed) {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            "the coordinator is not connected to its broker; submit again shortly".into(),
        ));
    }
    api.client
        .publish(topics::SUBMIT, QoS::AtLeastOnce, false, json)
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "broker_unavailable",
                e.to_string(),
            )
        })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Submitted {
            task_id: id,
            events,
        }),
    ))
}

/// The id intake would generate: never asked for, since the handler always sets one.
fn unreachable_id() -> TaskId {
    TaskId::new("http").expect("a valid id")
}
