//! A client of the coordinator over MQTT: publish modules, submit tasks, receive their events.
//!
//! This is what `ambient submit` and `ambient demo` use; any MQTT client can do the same with
//! the JSON schema in the README.

use std::time::Duration;

use ambient_core::{Digest, MAX_MODULE_BYTES, sha3_256, topics};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::{Submission, TaskEvent, mqtt, parse_broker_url};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The broker URL is malformed.
    #[error("{0}")]
    BadUrl(String),
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

/// A connected client; task events arrive through [`Client::next_event`].
pub struct Client {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<TaskEvent>,
    eventloop: JoinHandle<()>,
}

impl Client {
    /// Connects and subscribes to every task's result topic, returning once the subscription
    /// is acknowledged (so no result published afterwards can be missed).
    ///
    /// # Errors
    /// When the URL is malformed or the broker cannot be reached within 10 s.
    pub async fn connect(broker_url: &str) -> Result<Self, ClientError> {
        let (host, port) = parse_broker_url(broker_url).map_err(ClientError::BadUrl)?;
        let id = format!("ambient-client-{:016x}", rand::random::<u64>());
        let (client, mut eventloop) = mqtt::connect(&host, port, &id, false);
        let (tx, events) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), String>>();
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
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(ev) = serde_json::from_slice::<TaskEvent>(&p.payload)
                            && tx.send(ev).is_err()
                        {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(Err(e.to_string()));
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        let unreachable = |reason: String| ClientError::Unreachable {
            url: broker_url.to_string(),
            reason,
        };
        match tokio::time::timeout(Duration::from_secs(10), ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(Self {
                client,
                events,
                eventloop,
            }),
            Ok(Ok(Err(reason))) => {
                eventloop.abort();
                Err(unreachable(reason))
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

    /// Submits a task (QoS 1).
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

    /// The next task event, or `None` when the connection is gone.
    pub async fn next_event(&mut self) -> Option<TaskEvent> {
        self.events.recv().await
    }

    /// Disconnects cleanly.
    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.eventloop).await;
    }
}

impl Client {
    /// Submits every task, then waits until each has a final event (completed, failed or
    /// rejected) or `timeout` passes without any event. `on_final` sees each final event as it
    /// arrives (for progress bars). Returns the final events in submission order; a task that
    /// got none within the timeout is missing from the map.
    ///
    /// # Errors
    /// When the connection is gone.
    pub async fn run_batch(
        &mut self,
        submissions: &[Submission],
        timeout: Duration,
        mut on_final: impl FnMut(&TaskEvent),
    ) -> Result<std::collections::HashMap<String, TaskEvent>, ClientError> {
        let mut pending: std::collections::HashSet<String> = submissions
            .iter()
            .filter_map(|s| s.task_id.clone())
            .collect();
        for s in submissions {
            self.submit(s).await?;
        }
        let mut done = std::collections::HashMap::new();
        while !pending.is_empty() {
            let ev = match tokio::time::timeout(timeout, self.next_event()).await {
                Ok(Some(ev)) => ev,
                Ok(None) => return Err(ClientError::Closed),
                Err(_) => break,
            };
            if ev.status.is_final() && pending.remove(&ev.task_id) {
                on_final(&ev);
                done.insert(ev.task_id.clone(), ev);
            }
        }
        Ok(done)
    }
}
