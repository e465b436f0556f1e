//! What the broker remembers about one client id, between and during its connections.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;

use rumqttc::{LastWill, Publish, QoS};

use crate::access::Grant;

/// One accepted TCP connection. Never reused, so a late event from a connection that was
/// taken over cannot be mistaken for one from its successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ConnId(pub u64);

/// The client identifier from CONNECT (or one the broker assigned). Shared, because it keys
/// the session and appears in every subscription of that session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ClientId(Arc<str>);

impl From<&str> for ClientId {
    fn from(id: &str) -> Self {
        ClientId(id.into())
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What happens to a session when its connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifetime {
    /// `clean_session = 1`: the session ends with the connection.
    Connection,
    /// `clean_session = 0`: subscriptions and QoS 1 messages outlive the connection.
    Persistent,
}

impl Lifetime {
    pub(crate) fn from_clean_session(clean_session: bool) -> Self {
        if clean_session {
            Lifetime::Connection
        } else {
            Lifetime::Persistent
        }
    }
}

/// Session state (MQTT 3.1.1 section 3.1.2.4) kept by the router.
#[derive(Debug)]
pub(crate) struct Session {
    /// The connection currently bound to this session, if the client is online.
    pub connection: Option<ConnId>,
    pub lifetime: Lifetime,
    /// Published if the current connection ends without DISCONNECT.
    pub will: Option<LastWill>,
    /// Raw filters as subscribed (including any `$share/<group>/` prefix) with granted QoS.
    pub subscriptions: HashMap<String, QoS>,
    pub outbound: Outbound,
    /// Packet ids of inbound QoS 2 messages already routed, until PUBREL. A retransmitted
    /// PUBLISH with one of these ids is acknowledged again but not routed twice.
    pub awaiting_pubrel: HashSet<u16>,
    /// What the connection that last bound the session may do, and who it is.
    pub grant: Arc<Grant>,
    /// Consecutive [`Router::sweep`](crate::router::Router::sweep)s that found it offline.
    pub idle_sweeps: u32,
}

impl Session {
    pub(crate) fn new(connection: ConnId, lifetime: Lifetime, grant: Arc<Grant>) -> Self {
        Session {
            connection: Some(connection),
            lifetime,
            will: None,
            subscriptions: HashMap::new(),
            outbound: Outbound::default(),
            awaiting_pubrel: HashSet::new(),
            grant,
            idle_sweeps: 0,
        }
    }

    pub(crate) fn is_online(&self) -> bool {
        self.connection.is_some()
    }
}

/// QoS 1 messages from the broker to one client: those sent and not yet acknowledged, and
/// those waiting to be sent.
#[derive(Debug, Default)]
pub(crate) struct Outbound {
    /// The packet id tried next; 0 is never used (MQTT-2.3.1-1).
    next_pkid: u16,
    /// Sent and awaiting PUBACK, in the order they were sent; resent in that order, with
    /// `dup` set, when the session resumes.
    inflight: VecDeque<Publish>,
    /// Not yet sent because the client is offline or `inflight` is full.
    queued: VecDeque<Publish>,
    /// Topic and payload bytes of `queued`.
    queued_bytes: usize,
}

/// How much one session may hold in its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueBound {
    /// Messages.
    pub messages: usize,
    /// Topic and payload bytes.
    pub bytes: usize,
}

/// What a queued message weighs against [`QueueBound::bytes`].
fn weight(publish: &Publish) -> usize {
    publish.topic.len() + publish.payload.len()
}

impl Outbound {
    /// Queues a QoS 1 message. When the queue would exceed `bound`, the oldest messages are
    /// dropped to make room (the newest carries the most current state); a message heavier
    /// than the whole byte bound is dropped itself. Returns how many messages were dropped.
    pub(crate) fn enqueue(&mut self, publish: Publish, bound: QueueBound) -> u64 {
        let w = weight(&publish);
        if bound.messages == 0 || w > bound.bytes {
            return 1;
        }
        let mut dropped = 0;
        while self.queued.len() >= bound.messages || self.queued_bytes + w > bound.bytes {
            self.pop();
            dropped += 1;
        }
        self.queued_bytes += w;
        self.queued.push_back(publish);
        dropped
    }

    fn pop(&mut self) -> Option<Publish> {
        let publish = self.queued.pop_front()?;
        self.queued_bytes -= weight(&publish);
        Some(publish)
    }

    /// Moves queued messages into flight until `window` are unacknowledged, giving each a
    /// packet id, and returns them for sending.
    pub(crate) fn release(&mut self, window: usize) -> Vec<Publish> {
        let mut released = Vec::new();
        while self.inflight.len() < window {
            let Some(mut publish) = self.pop() else {
                break;
            };
            publish.pkid = self.allocate_pkid();
            self.inflight.push_back(publish.clone());
            released.push(publish);
        }
        released
    }

    /// Handles PUBACK; an id that is not in flight is ignored, since a client may repeat an
    /// acknowledgement after a reconnect.
    pub(crate) fn acknowledge(&mut self, pkid: u16) {
        if let Some(index) = self.inflight.iter().position(|p| p.pkid == pkid) {
            self.inflight.remove(index);
        }
    }

    /// Copies of every unacknowledged message, marked as duplicates (MQTT-4.4.0-1).
    pub(crate) fn redeliver(&mut self) -> Vec<Publish> {
        self.inflight
            .iter_mut()
            .map(|publish| {
                publish.dup = true;
                publish.clone()
            })
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn inflight_len(&self) -> usize {
        self.inflight.len()
    }

    #[cfg(test)]
    pub(crate) fn queued_len(&self) -> usize {
        self.queued.len()
    }

    /// The next id not in flight. Terminates because `inflight` holds far fewer than 65,535
    /// messages (its window is small).
    fn allocate_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            let pkid = self.next_pkid;
            if !self.inflight.iter().any(|p| p.pkid == pkid) {
                return pkid;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: &str) -> Publish {
        Publish::new("t", QoS::AtLeastOnce, payload)
    }

    fn at_most(messages: usize) -> QueueBound {
        QueueBound {
            messages,
            bytes: usize::MAX,
        }
    }

    #[test]
    fn a_full_queue_drops_its_oldest_message() {
        let mut outbound = Outbound::default();
        assert_eq!(outbound.enqueue(message("1"), at_most(2)), 0);
        assert_eq!(outbound.enqueue(message("2"), at_most(2)), 0);
        assert_eq!(outbound.enqueue(message("3"), at_most(2)), 1);
        let sent: Vec<_> = outbound
            .release(10)
            .into_iter()
            .map(|p| p.payload)
            .collect();
        assert_eq!(sent, ["2", "3"]);
    }

    #[test]
    fn a_queue_over_its_byte_bound_drops_its_oldest_messages_and_refuses_a_giant() {
        let mut outbound = Outbound::default();
        let bound = QueueBound {
            messages: 100,
            bytes: 10,
        };
        // Each weighs 4 bytes: the topic "t" and three of payload.
        assert_eq!(outbound.enqueue(message("aaa"), bound), 0);
        assert_eq!(outbound.enqueue(message("bbb"), bound), 0);
        assert_eq!(outbound.enqueue(message("ccc"), bound), 1);
        assert_eq!(
            outbound.enqueue(message(&"x".repeat(10)), bound),
            1,
            "heavier than the bound"
        );
        let sent: Vec<_> = outbound
            .release(10)
            .into_iter()
            .map(|p| p.payload)
            .collect();
        assert_eq!(sent, ["bbb", "ccc"]);
        assert_eq!(outbound.queued_bytes, 0);
    }

    #[test]
    fn packet_ids_skip_zero_and_ids_still_in_flight() {
        let mut outbound = Outbound {
            next_pkid: u16::MAX - 1,
            ..Outbound::default()
        };
        for payload in ["a", "b", "c"] {
            outbound.enqueue(message(payload), at_most(10));
        }
        let ids: Vec<u16> = outbound.release(10).iter().map(|p| p.pkid).collect();
        assert_eq!(ids, [u16::MAX, 1, 2]);

        outbound.acknowledge(1);
        outbound.next_pkid = u16::MAX - 1;
        outbound.enqueue(message("d"), at_most(10));
        outbound.enqueue(message("e"), at_most(10));
        let ids: Vec<u16> = outbound.release(10).iter().map(|p| p.pkid).collect();
        assert_eq!(ids, [1, 3], "65535 and 2 are still in flight");
    }

    #[test]
    fn the_window_holds_back_messages_until_an_acknowledgement() {
        let mut outbound = Outbound::default();
        for payload in ["a", "b", "c"] {
            outbound.enqueue(message(payload), at_most(10));
        }
        let first = outbound.release(2);
        assert_eq!(first.len(), 2);
        assert!(outbound.release(2).is_empty());
        outbound.acknowledge(first[0].pkid);
        let next = outbound.release(2);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].payload, "c");
    }

    #[test]
    fn redelivered_messages_are_marked_as_duplicates() {
        let mut outbound = Outbound::default();
        outbound.enqueue(message("a"), at_most(10));
        let sent = outbound.release(10);
        assert!(!sent[0].dup);
        let again = outbound.redeliver();
        assert_eq!(again.len(), 1);
        assert!(again[0].dup);
        assert_eq!(again[0].pkid, sent[0].pkid);
    }
}
