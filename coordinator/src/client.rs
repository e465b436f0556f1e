//! A client of the coordinator over MQTT: publish modules, submit tasks, receive their events.
//!
//! This is what `ambient submit` and `ambient demo` use; any MQTT client can do the same with
//! the JSON schema in the README.
//!
//! # Delivery
//!
//! The coordinator acknowledges a submission (its `accepted` event) only once it is journaled,
//! and a task id is idempotent: resubmitting it returns `accepted` again while it runs and its
//! stored final event once it has one. [`Client::run_batch`] builds on that: it resubmits every
//! task that has no `accepted` event after [`RESUBMIT_AFTER`], and every task without a final
//! event after each reconnect (results published while it was away are not kept for a client
//! with a clean session), so no task is lost to a restarted coordinator or broker.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use ambient_core::{Digest, MAX_MODULE_BYTES, sha3_256, topics};
use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use ambient_mqtt::{BrokerUrl, TlsFiles};

use crate::intake::MAX_SUBMISSIONS_PER_MESSAGE;
use crate::{Submission, TaskEvent, mqtt};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The broker URL is malformed, or a TLS file is unusable.
    #[error(transparent)]
    BadUrl(#[from] ambient_mqtt::Error),
    /// The broker could not be reached.
    #[error(
        "cannot reach the MQTT broker at {url}: {reason} (is `ambient coordinator` or mosquitto running there?)"
    )]
    Unreachable {
        /// The broker URL.
        url: String,
        /// The underlying error.
        reason: String,
    },
    /// The broker answered, and refused this client.
    #[error("the MQTT broker at {url} refused this client: {reason}")]
    Refused {
        /// The broker URL (password hidden).
        url: String,
        /// What it said, and what to do.
        reason: String,
    },
    /// The connection closed.
    #[error("the broker connection closed")]
    Closed,
    /// The module is larger than agents accept.
    #[error("module is {len} bytes, over the {MAX_MODULE_BYTES} byte limit")]
    ModuleTooLarge {
        /// Its size.
        len: usize,
    },
}

/// What a CONNACK refusal means for a client of Ambient, and what to do about it.
fn refusal(code: rumqttc::ConnectReturnCode) -> String {
    use rumqttc::ConnectReturnCode as Code;
    match code {
        Code::BadUserNamePassword => {
            "wrong user or password (the account goes in the URL: mqtt://user:password@host)".into()
        }
        Code::NotAuthorized => "not authorized: the coordinator's embedded broker accepts clients \
            without an account only from the gateway itself; give this client an account \
            ([broker.users] in coordinator.toml, `ambient passwd`) and put it in the URL"
            .into(),
        other => format!("{other:?}"),
    }
}

/// Most bytes of JSON [`Client::submit_all`] puts in one message (a larger submission goes alone).
pub const BATCH_BYTES: usize = 1 << 20;

/// How long [`Client::run_batch`] waits for a task's `accepted` event before submitting it again.
pub const RESUBMIT_AFTER: Duration = Duration::from_secs(3);

/// A connected client; task events arrive through [`Client::next_event`].
pub struct Client {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<TaskEvent>,
    /// Counts subscriptions acknowledged after a reconnect: results may have been missed.
    resubscribed: watch::Receiver<u64>,
    eventloop: JoinHandle<()>,
}

impl Client {
    /// Connects and subscribes to every task's result topic, returning once the subscription
    /// is acknowledged (so no result published afterwards can be missed).
    ///
    /// # Errors
    /// When the URL is malformed or the broker cannot be reached within 10 s.
    pub async fn connect(broker_url: &str) -> Result<Self, ClientError> {
        Self::connect_with(broker_url, &TlsFiles::default()).await
    }

    /// As [`Client::connect`], with `tls` for an `mqtts://` broker.
    ///
    /// # Errors
    /// When the URL is malformed, a TLS file is unusable, or the broker cannot be reached
    /// within 10 s.
    pub async fn connect_with(broker_url: &str, tls: &TlsFiles) -> Result<Self, ClientError> {
        let url: BrokerUrl = broker_url.parse()?;
        let id = format!("ambient-client-{:016x}", rand::random::<u64>());
        let (client, mut eventloop) = mqtt::connect(&url, tls, &id, mqtt::Session::Clean, None)?;
        let (tx, events) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), rumqttc::ConnectionError>>();
        let (resub_tx, resubscribed) = watch::channel(0u64);
        let sub = client.clone();
        let eventloop = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let sub = sub.clone();
                        tokio::spawn(async move {
                            sub.subscribe("ambient/v1/tasks/+/result", QoS::AtLeastOnce)
                                .await
                        });
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => match ready.take() {
                        Some(r) => {
                            let _ = r.send(Ok(()));
                        }
                        None => {
                            resub_tx.send_modify(|n| *n += 1);
                        }
                    },
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(ev) = serde_json::from_slice::<TaskEvent>(&p.payload)
                            && tx.send(ev).is_err()
                        {
                            break;
                        }
                    }
                    // `disconnect` was called: stop instead of reconnecting.
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(Err(e));
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        let unreachable = |reason: String| ClientError::Unreachable {
            url: url.to_string(),
            reason,
        };
        match tokio::time::timeout(Duration::from_secs(10), ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(Self {
                client,
                events,
                resubscribed,
                eventloop,
            }),
            Ok(Ok(Err(rumqttc::ConnectionError::ConnectionRefused(code)))) => {
                eventloop.abort();
                Err(ClientError::Refused {
                    url: url.to_string(),
                    reason: refusal(code),
                })
            }
            Ok(Ok(Err(e))) => {
                eventloop.abort();
                Err(unreachable(e.to_string()))
            }
            _ => {
                eventloop.abort();
                Err(unreachable("no answer within 10 s".into()))
            }
        }
    }

    /// Publishes a module, retained and content-addressed, and returns its sha3-256.
    ///
    /// # Errors
    /// When the module is too large or the connection is gone.
    pub async fn publish_module(&self, bytes: &[u8]) -> Result<Digest, ClientError> {
        if bytes.len() > MAX_MODULE_BYTES {
            return Err(ClientError::ModuleTooLarge { len: bytes.len() });
        }
        let hash = sha3_256(bytes);
        self.client
            .publish(
                topics::module(&hash).as_str(),
                QoS::AtLeastOnce,
                true,
                bytes.to_vec(),
            )
            .await
            .map_err(|_| ClientError::Closed)?;
        Ok(hash)
    }

    /// Submits a task (QoS 1). Nothing is resubmitted: see [`Client::run_batch`].
    ///
    /// # Errors
    /// When the connection is gone.
    pub async fn submit(&self, submission: &Submission) -> Result<(), ClientError> {
        let json = serde_json::to_vec(submission).map_err(|_| ClientError::Closed)?;
        self.client
            .publish(topics::SUBMIT, QoS::AtLeastOnce, false, json)
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Submits several tasks (QoS 1): up to [`MAX_SUBMISSIONS_PER_MESSAGE`] in one MQTT message
    /// (a JSON array; see [`split_submissions`](crate::split_submissions)), and no more than about
    /// [`BATCH_BYTES`] of JSON in one unless a single submission is larger. A message with one
    /// submission carries it alone, as [`Client::submit`] does.
    ///
    /// # Errors
    /// When the connection is gone.
    pub async fn submit_all<'s>(
        &self,
        submissions: impl IntoIterator<Item = &'s Submission>,
    ) -> Result<(), ClientError> {
        let mut batch: Vec<Vec<u8>> = Vec::new();
        let mut bytes = 0;
        for s in submissions {
            let json = serde_json::to_vec(s).map_err(|_| ClientError::Closed)?;
            let full = batch.len() == MAX_SUBMISSIONS_PER_MESSAGE
                || (!batch.is_empty() && bytes + json.len() > BATCH_BYTES);
            if full {
                self.publish_submissions(std::mem::take(&mut batch)).await?;
                bytes = 0;
            }
            bytes += json.len() + 1;
            batch.push(json);
        }
        if !batch.is_empty() {
            self.publish_submissions(batch).await?;
        }
        Ok(())
    }

    async fn publish_submissions(&self, mut batch: Vec<Vec<u8>>) -> Result<(), ClientError> {
        let payload = if batch.len() == 1 {
            batch.pop().unwrap_or_default()
        } else {
            let mut array = b"[".to_vec();
            for (i, json) in batch.iter().enumerate() {
                if i > 0 {
                    array.push(b',');
                }
                array.extend_from_slice(json);
            }
            array.push(b']');
            array
        };
        self.client
            .publish(topics::SUBMIT, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// The next task event, or `None` when the connection is gone.
    pub async fn next_event(&mut self) -> Option<TaskEvent> {
        self.events.recv().await
    }

    /// Disconnects cleanly, returning as soon as the DISCONNECT is sent.
    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.eventloop).await;
    }
}

/// How far [`Client::run_batch`] follows each task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// Until the coordinator has journaled it (`accepted`) or refused it (`rejected`).
    Accepted,
    /// Until its final event: `completed`, `failed` or `rejected`.
    Final,
}

impl Client {
    /// Submits every task, then waits until each has a final event (completed, failed or
    /// rejected) or `idle` passes without progress (a task's first `accepted` or its final
    /// event). Resubmits as the module docs describe. `on_final` sees each final event as it
    /// arrives (for progress bars). Returns the final events by task id; a task that got none
    /// is missing from the map. Submissions need a `task_id`.
    ///
    /// # Errors
    /// When the connection is gone.
    pub async fn run_batch(
        &mut self,
        submissions: &[Submission],
        idle: Duration,
        on_final: impl FnMut(&TaskEvent),
    ) -> Result<HashMap<String, TaskEvent>, ClientError> {
        self.follow(submissions, Until::Final, idle, on_final).await
    }

    /// Submits every task and follows each until `until`, resubmitting as the module docs
    /// describe; see [`Client::run_batch`]. `on_done` sees each event that ends the wait for
    /// its task.
    ///
    /// # Errors
    /// When the connection is gone.
    pub async fn follow(
        &mut self,
        submissions: &[Submission],
        until: Until,
        idle: Duration,
        mut on_done: impl FnMut(&TaskEvent),
    ) -> Result<HashMap<String, TaskEvent>, ClientError> {
        let by_id: HashMap<&str, &Submission> = submissions
            .iter()
            .filter_map(|s| Some((s.task_id.as_deref()?, s)))
            .collect();
        // Tasks without an `accepted` event, and when each was last sent.
        let mut unacked: HashMap<&str, Instant> = HashMap::new();
        let mut pending: HashSet<&str> = by_id.keys().copied().collect();
        let start = Instant::now();
        self.submit_all(submissions).await?;
        for id in by_id.keys() {
            unacked.insert(id, start);
        }
        let mut done = HashMap::new();
        let mut last_progress = Instant::now();
        let mut check = tokio::time::interval(RESUBMIT_AFTER / 3);
        self.resubscribed.mark_unchanged();
        while !pending.is_empty() {
            tokio::select! {
                ev = self.events.recv() => {
                    let Some(ev) = ev else { return Err(ClientError::Closed) };
                    let Some((&id, _)) = by_id.get_key_value(ev.task_id.as_str()) else { continue };
                    if unacked.remove(id).is_some() {
                        last_progress = Instant::now();
                    }
                    let ends = ev.status.is_final() || until == Until::Accepted;
                    if ends && pending.remove(id) {
                        last_progress = Instant::now();
                        on_done(&ev);
                        done.insert(ev.task_id.clone(), ev);
                    }
                }
                changed = self.resubscribed.changed() => {
                    if changed.is_err() {
                        return Err(ClientError::Closed);
                    }
                    // Reconnected: whatever was published meanwhile is gone; ask again.
                    let again: Vec<&Submission> = pending.iter().map(|&id| by_id[id]).collect();
                    self.submit_all(again).await?;
                    for &id in &pending {
                        unacked.insert(id, Instant::now());
                    }
                }
                _ = check.tick() => {
                    let now = Instant::now();
                    if now.duration_since(last_progress) >= idle {
                        break;
                    }
                    let mut due = Vec::new();
                    for (&id, sent) in unacked.iter_mut() {
                        if now.duration_since(*sent) >= RESUBMIT_AFTER && pending.contains(id) {
                            due.push(by_id[id]);
                            *sent = now;
                        }
                    }
                    self.submit_all(due).await?;
                }
            }
        }
        Ok(done)
    }
}
