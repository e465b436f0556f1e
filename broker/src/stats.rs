//! Counters a running broker keeps.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A cheap, cloneable view of a broker's counters; it stays valid after
/// [`Broker::run`](crate::Broker::run) has taken the broker. Counts start at zero when the
/// broker is bound and only grow, except [`connections`](BrokerStats::connections).
#[derive(Debug, Clone, Default)]
pub struct BrokerStats {
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    publishes_received: AtomicU64,
    publishes_sent: AtomicU64,
    dropped: AtomicU64,
    denied: AtomicU64,
    refused: AtomicU64,
}

impl BrokerStats {
    /// TCP connections open now, including those that have not sent CONNECT yet.
    pub fn connections(&self) -> u64 {
        self.counters.connections.load(Ordering::Relaxed)
    }

    /// PUBLISH packets received from clients, including retransmissions.
    pub fn publishes_received(&self) -> u64 {
        self.counters.publishes_received.load(Ordering::Relaxed)
    }

    /// PUBLISH packets queued for writing to clients, including redeliveries.
    pub fn publishes_sent(&self) -> u64 {
        self.counters.publishes_sent.load(Ordering::Relaxed)
    }

    /// Messages discarded for lack of room: QoS 0 messages a slow client's queue could not
    /// take, and the oldest QoS 1 messages pushed out of a full session queue.
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// PUBLISH and SUBSCRIBE requests a client's grant did not allow (see
    /// [`Gatekeeper`](crate::Gatekeeper)).
    pub fn denied(&self) -> u64 {
        self.counters.denied.load(Ordering::Relaxed)
    }

    /// Connections refused: beyond `max_connections_per_address`, by the gatekeeper, or by
    /// the session rules (a client id that belongs to another principal, `max_sessions`).
    /// Protocol-level refusals (wrong protocol level) are not counted.
    pub fn refused(&self) -> u64 {
        self.counters.refused.load(Ordering::Relaxed)
    }

    pub(crate) fn add_denied(&self, count: u64) {
        if count > 0 {
            self.counters.denied.fetch_add(count, Ordering::Relaxed);
        }
    }

    pub(crate) fn connect_refused(&self) {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_opened(&self) {
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.counters.connections.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn publish_received(&self) {
        self.counters
            .publishes_received
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn publish_sent(&self) {
        self.counters.publishes_sent.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_dropped(&self, count: u64) {
        if count > 0 {
            self.counters.dropped.fetch_add(count, Ordering::Relaxed);
        }
    }
}
