//! Which QoS 1 publish a broker acknowledgement belongs to. No I/O.
//!
//! rumqttc assigns packet ids inside its event loop and reports only the id
//! (`Outgoing::Publish(pkid)`, then `Incoming::PubAck(pkid)`), not which payload it was. Every
//! QoS 1 publish the agent hands to the client therefore pushes a [`Tag`] here in the same
//! critical section, so tags queue in the client's channel order; the event loop task pops one
//! per `Outgoing::Publish` and files it under the packet id, and the PUBACK for that id names
//! the outbox entry that is now safe to delete.
//!
//! When the connection drops, rumqttc moves unacknowledged publishes back into its pending
//! queue. The agent takes every QoS 1 publish out of that queue instead
//! ([`Delivery::connection_lost`]) and resends its reports from the outbox after reconnecting,
//! so the mapping never has to follow rumqttc's retransmissions.

use std::collections::{HashMap, VecDeque};

/// What a QoS 1 publish carries: the outbox sequence number of a report, or `None` for
/// publishes nobody waits on (status, announce).
pub(crate) type Tag = Option<u64>;

#[derive(Debug, Default)]
pub(crate) struct Delivery {
    /// Tags of publishes handed to the client and not yet seen leaving, oldest first.
    queued: VecDeque<Tag>,
    /// Tags of publishes on the wire, by packet id.
    inflight: HashMap<u16, Tag>,
    /// A publish rumqttc holds back because its packet id is still in flight (`AwaitAck`).
    collided: Option<(u16, Tag)>,
}

impl Delivery {
    /// A QoS 1 publish was handed to the client.
    pub fn queued(&mut self, tag: Tag) {
        self.queued.push_back(tag);
    }

    /// `Outgoing::Publish(pkid)` with a non-zero id: the oldest queued publish left (or the
    /// held-back one, once its id became free).
    pub fn sent(&mut self, pkid: u16) {
        if let Some((id, tag)) = self.collided
            && id == pkid
        {
            self.collided = None;
            self.inflight.insert(pkid, tag);
            return;
        }
        match self.queued.pop_front() {
            Some(tag) => {
                self.inflight.insert(pkid, tag);
            }
            None => tracing::debug!(pkid, "a publish left that the agent did not queue"),
        }
    }

    /// `Outgoing::AwaitAck(pkid)`: the oldest queued publish is held back until `pkid` is acked.
    pub fn held_back(&mut self, pkid: u16) {
        if let Some(tag) = self.queued.pop_front() {
            self.collided = Some((pkid, tag));
        }
    }

    /// `Incoming::PubAck(pkid)`: returns the outbox entry now delivered, if it was a report.
    pub fn acked(&mut self, pkid: u16) -> Option<u64> {
        self.inflight.remove(&pkid).flatten()
    }

    /// The connection dropped. `fresh` is how many QoS 1 publishes the client had not yet
    /// assigned an id to when they were taken out of its queue (they are the oldest queued);
    /// everything in flight or held back was taken out too. Returns the outbox entries that
    /// must be sent again.
    pub fn connection_lost(&mut self, fresh: usize) -> Vec<u64> {
        let mut resend: Vec<u64> = self.inflight.drain().filter_map(|(_, tag)| tag).collect();
        resend.extend(self.collided.take().and_then(|(_, tag)| tag));
        for _ in 0..fresh {
            match self.queued.pop_front() {
                Some(tag) => resend.extend(tag),
                None => break,
            }
        }
        resend.sort_unstable();
        resend
    }

    /// Publishes queued and not yet seen leaving.
    #[cfg(test)]
    pub fn queued_len(&self) -> usize {
        self.queued.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_names_the_report_that_left_under_its_packet_id() {
        let mut d = Delivery::default();
        d.queued(None); // status
        d.queued(Some(7));
        d.queued(Some(8));
        d.sent(1);
        d.sent(2);
        d.sent(3);
        assert_eq!(d.acked(2), Some(7));
        assert_eq!(d.acked(1), None);
        assert_eq!(d.acked(2), None, "an id is acked once");
        assert_eq!(d.acked(3), Some(8));
    }

    #[test]
    fn a_held_back_publish_takes_its_id_when_the_old_one_is_acked() {
        let mut d = Delivery::default();
        d.queued(Some(1));
        d.sent(5);
        d.queued(Some(2));
        d.held_back(5);
        assert_eq!(d.acked(5), Some(1));
        d.sent(5);
        assert_eq!(d.acked(5), Some(2));
    }

    #[test]
    fn a_lost_connection_hands_back_everything_unacknowledged() {
        let mut d = Delivery::default();
        for seq in 1..=4 {
            d.queued(Some(seq));
        }
        d.queued(None);
        d.sent(1); // seq 1 on the wire
        d.sent(2); // seq 2 on the wire
        assert_eq!(d.acked(1), Some(1));
        // seq 3 had been taken from the channel but not sent; 4 and the status are still
        // in the channel and keep their place.
        assert_eq!(d.connection_lost(1), vec![2, 3]);
        assert_eq!(d.queued_len(), 2);
        d.sent(1);
        assert_eq!(d.acked(1), Some(4));
    }
}
