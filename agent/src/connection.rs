//! The MQTT side: client options, the one task that owns rumqttc's event loop, and the
//! [`Publisher`] every other task publishes through.
//!
//! The event loop task never blocks and never waits on another task: incoming frames go to
//! the agent over a bounded channel (dropped and counted when it is full), connection events
//! and delivery acknowledgements over an unbounded one (they are small and few). Publishing
//! uses `try_*` calls, so a broker outage never stalls the caller either; what could not be
//! queued is retried after the next connect.

use std::sync::{Arc, Mutex, MutexGuard};

use ambient_core::{
    ConnectToken, Digest, Identity, MAX_FRAME_BYTES, MAX_MODULE_BYTES, NodeId, topics,
};
use bytes::Bytes;
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Outgoing, Packet, QoS,
    Request,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::AgentError;
use crate::config::AgentConfig;
use crate::delivery::{Delivery, Tag};
use ambient_mqtt::Backoff;

/// Requests the client may queue before `try_publish` reports the channel full.
const REQUEST_CAPACITY: usize = 256;
/// Unacknowledged QoS 1 publishes on the wire at once.
const MAX_INFLIGHT: u16 = 64;

/// What the connection tells the agent.
#[derive(Debug)]
pub(crate) enum ConnEvent {
    /// Connected (again): subscribe, announce and resend.
    Connected,
    /// The connection dropped; these outbox entries must be sent again.
    Lost { resend: Vec<u64>, error: String },
    /// The broker acknowledged this outbox entry.
    Delivered(u64),
}

/// A frame for the agent.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// On the node's tasks topic, with the time it was read (for pong round trips).
    Tasks { payload: Bytes, at: Instant },
    /// On a module topic.
    Module { hash: Digest, payload: Bytes },
}

/// Publishes through the event loop, keeping QoS 1 publishes and their tags in step.
#[derive(Clone)]
pub(crate) struct Publisher {
    client: AsyncClient,
    delivery: Arc<Mutex<Delivery>>,
}

fn lock(delivery: &Mutex<Delivery>) -> MutexGuard<'_, Delivery> {
    // The state is plain data updated in single steps, so a panic elsewhere cannot leave it
    // half-changed; keep using it.
    delivery.lock().unwrap_or_else(|p| p.into_inner())
}

impl Publisher {
    /// Queues a publish; `false` if the client's queue is full or the event loop is gone.
    pub fn publish(&self, topic: &str, qos: QoS, retain: bool, payload: Vec<u8>, tag: Tag) -> bool {
        if qos == QoS::AtMostOnce {
            return self.client.try_publish(topic, qos, retain, payload).is_ok();
        }
        // Hold the lock across the send so tags queue in exactly the channel's order.
        let mut delivery = lock(&self.delivery);
        let queued = self.client.try_publish(topic, qos, retain, payload).is_ok();
        if queued {
            delivery.queued(tag);
        }
        queued
    }

    pub fn subscribe(&self, topic: &str) -> bool {
        self.client.try_subscribe(topic, QoS::AtLeastOnce).is_ok()
    }

    pub fn unsubscribe(&self, topic: &str) -> bool {
        self.client.try_unsubscribe(topic).is_ok()
    }

    pub fn disconnect(&self) -> bool {
        self.client.try_disconnect().is_ok()
    }
}

/// The username and password that prove the node's key to the coordinator's embedded broker:
/// the node id and a fresh [`ConnectToken`], valid for minutes (see the coordinator's
/// `access` module). Other brokers ignore them unless configured to check passwords.
pub(crate) fn login(identity: &Identity) -> (String, String) {
    let node = identity.node_id().to_hex();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let token = ConnectToken::sign(identity, &node, now_ms).to_hex();
    (node.to_string(), token.to_string())
}

/// Client options: persistent session, last will, packet sizes for 16 MiB modules, TLS, and
/// the broker URL's account or else the node's `login`.
pub(crate) fn options(
    config: &AgentConfig,
    node: &NodeId,
    login: Option<(String, String)>,
) -> Result<MqttOptions, AgentError> {
    let mut opts = ambient_mqtt::client_options(
        config.broker(),
        format!("ambient-agent-{node}"),
        config.tls(),
    )
    .map_err(|e| AgentError::Tls(e.to_string()))?;
    if let Some((username, password)) = login {
        opts.set_credentials(username, password);
    }
    opts.set_keep_alive(config.keep_alive())
        // Assignments queued while we were away arrive when we come back.
        .set_clean_session(false)
        .set_last_will(LastWill::new(
            topics::node(node, topics::NodeTopic::Status).as_str(),
            "offline",
            QoS::AtLeastOnce,
            true,
        ))
        // Incoming: a module plus headroom, so a somewhat oversize frame is read and dropped by
        // us rather than failing the connection. Outgoing: the largest report.
        .set_max_packet_size(MAX_MODULE_BYTES + (1 << 20), MAX_FRAME_BYTES + (4 << 10))
        .set_inflight(MAX_INFLIGHT)
        .set_request_channel_capacity(REQUEST_CAPACITY);
    Ok(opts)
}

/// Creates the client and its event loop with TCP_NODELAY on.
pub(crate) fn client(opts: MqttOptions) -> (Publisher, EventLoop, Arc<Mutex<Delivery>>) {
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let delivery = Arc::new(Mutex::new(Delivery::default()));
    (
        Publisher {
            client,
            delivery: delivery.clone(),
        },
        eventloop,
        delivery,
    )
}

/// The connection task: polls the event loop until `stop` fires or a clean disconnect has been
/// sent, reconnecting with `backoff` whenever the connection fails. Never returns early on
/// broker loss.
pub(crate) struct Driver {
    pub eventloop: EventLoop,
    pub delivery: Arc<Mutex<Delivery>>,
    pub events: mpsc::UnboundedSender<ConnEvent>,
    pub inbound: mpsc::Sender<Inbound>,
    pub tasks_topic: String,
    pub backoff: Backoff,
    /// A fresh username and password for each connection attempt; `None` when the broker URL
    /// names an account.
    pub login: Option<Box<dyn Fn() -> (String, String) + Send>>,
    /// Frames dropped because the agent's channel was full.
    pub dropped: u64,
    pub stop: CancellationToken,
}

impl Driver {
    pub async fn run(mut self) {
        let mut failures: u64 = 0;
        loop {
            let polled = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                polled = self.eventloop.poll() => polled,
            };
            match polled {
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                Ok(event) => {
                    if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                        failures = 0;
                    }
                    self.handle(event);
                }
                Err(e) => {
                    // Events rumqttc read before failing would otherwise be replayed after the
                    // reconnect; handle them now, while their packet ids still mean what they did.
                    while let Some(event) = self.eventloop.state.events.pop_front() {
                        self.handle(event);
                    }
                    let resend = self.take_back_publishes();
                    let _ = self.events.send(ConnEvent::Lost {
                        resend,
                        error: e.to_string(),
                    });
                    let delay = self.backoff.next_delay();
                    failures += 1;
                    if let rumqttc::ConnectionError::ConnectionRefused(code) = &e {
                        tracing::warn!(
                            ?code,
                            "the broker refused this node: on the coordinator's embedded broker, check that this device's clock is within 5 minutes of the gateway's (the sign-in token is timestamped)"
                        );
                    }
                    // Loud on the first failure and then at 10, 100, 1000...: a broker that
                    // stays away is visible without flooding the log.
                    if is_power_of_ten(failures) {
                        tracing::warn!(error = %e, failures, delay_ms = delay.as_millis() as u64, "cannot reach the broker; retrying");
                    } else {
                        tracing::debug!(error = %e, failures, delay_ms = delay.as_millis() as u64, "cannot reach the broker; retrying");
                    }
                    tokio::select! {
                        _ = self.stop.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    if let Some(login) = &self.login {
                        let (username, password) = login();
                        self.eventloop
                            .mqtt_options
                            .set_credentials(username, password);
                    }
                }
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Incoming(Packet::ConnAck(_)) => {
                self.backoff.reset();
                let _ = self.events.send(ConnEvent::Connected);
            }
            Event::Incoming(Packet::Publish(p)) => self.route(p.topic, p.payload),
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(seq) = lock(&self.delivery).acked(ack.pkid) {
                    let _ = self.events.send(ConnEvent::Delivered(seq));
                }
            }
            Event::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => {
                lock(&self.delivery).sent(pkid)
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => lock(&self.delivery).held_back(pkid),
            _ => {}
        }
    }

    fn route(&mut self, topic: String, payload: Bytes) {
        let frame = if topic == self.tasks_topic {
            Inbound::Tasks {
                payload,
                at: Instant::now(),
            }
        } else if let Some(hash) = topics::parse_module(&topic) {
            Inbound::Module { hash, payload }
        } else {
            tracing::debug!(%topic, "ignoring a message on an unexpected topic");
            return;
        };
        if self.inbound.try_send(frame).is_err() {
            self.dropped += 1;
            tracing::warn!(%topic, dropped_frames = self.dropped, "agent is saturated, dropping an incoming frame");
        }
    }

    /// Takes every QoS 1 publish out of rumqttc's retransmission queue (the outbox resends
    /// reports itself) and returns the outbox entries to resend.
    fn take_back_publishes(&mut self) -> Vec<u64> {
        let mut fresh = 0;
        self.eventloop.pending.retain(|request| match request {
            Request::Publish(p) if p.qos != QoS::AtMostOnce => {
                // Id 0: drained from the channel before the event loop got to it.
                fresh += usize::from(p.pkid == 0);
                false
            }
            _ => true,
        });
        // rumqttc keeps a held-back publish across reconnects, where its id can never be
        // acked; its tag is in `Delivery` and comes back below.
        self.eventloop.state.collision = None;
        lock(&self.delivery).connection_lost(fresh)
    }
}

/// 1, 10, 100, ...
fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn powers_of_ten_are_recognised() {
        let found: Vec<u64> = (0..2000).filter(|n| is_power_of_ten(*n)).collect();
        assert_eq!(found, [1, 10, 100, 1000]);
    }
}
