//! The coordinator's own measurements of each node's link: which probes are due, and what
//! their pongs show.

use ambient_core::{LARGE_PADDING, Pong};

use super::*;

/// A probe the dispatcher should send: a [`Probe`](ambient_core::Probe) frame to `node` with
/// `padding` bytes and `nonce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probing {
    /// The node.
    pub node: NodeId,
    /// The probe's nonce, which its pong must carry.
    pub nonce: u64,
    /// Bytes of padding: 0, or [`LARGE_PADDING`] for a bandwidth probe.
    pub padding: usize,
}

/// Most probes one call of [`Registry::probes`] sends (the service calls it every 100 ms):
/// after a restart, ten thousand nodes due at once are probed over four seconds rather than
/// in one burst that would measure the gateway's queue instead of their links. The rest wait
/// for the next call.
pub const MAX_PROBES_PER_CALL: usize = 256;
/// Most large probes one call sends: 4 × 64 KiB every 100 ms, 2.6 MB/s at most. A node whose
/// large probe is due when they are spent gets a small one, and the large one next time.
pub const MAX_LARGE_PER_CALL: usize = 4;

impl Registry {
    /// [`Registry::since_epoch`] in microseconds.
    fn micros(&mut self, at: Instant) -> u64 {
        u64::try_from(self.since_epoch(at).as_micros()).unwrap_or(u64::MAX)
    }

    /// The probes due at `now`, each recorded as sent at `now` with a nonce from `nonce` (draw
    /// it at random: a node that could guess it could answer a large probe before the padding
    /// arrived). A node is first probed at the first call after it registers, then every
    /// [`RegistryConfig::probe_interval`] while it is online. Its first probe is small; after
    /// that one in every [`RegistryConfig::bandwidth_probe_every`] is large, staggered by node
    /// so that nodes that joined together do not all send 64 KiB in the same call. At most
    /// `MAX_PROBES_PER_CALL` (256) probes, `MAX_LARGE_PER_CALL` (4) of them large. Forgotten nodes
    /// leave the schedule here. O(probes sent).
    pub fn probes(&mut self, now: Instant, mut nonce: impl FnMut() -> u64) -> Vec<Probing> {
        let now_us = self.micros(now);
        let every = self.config.bandwidth_probe_every.max(1);
        let interval = self.config.probe_interval.max(Duration::from_millis(1));
        let next = now.checked_add(interval).unwrap_or(now);
        let mut due = Vec::new();
        let mut large = 0;
        while let Some(&(at, id)) = self.probe_queue.front() {
            if at > now || due.len() == MAX_PROBES_PER_CALL {
                break;
            }
            self.probe_queue.pop_front();
            let Some(node) = self.nodes.get_mut(&id) else {
                continue;
            };
            if node.probe_due != at {
                continue;
            }
            node.probe_due = next;
            self.probe_queue.push_back((next, id));
            if !node.is_online(now) {
                continue;
            }
            let padding = if node.large_in == 0 && large < MAX_LARGE_PER_CALL {
                large += 1;
                node.large_in = every - 1;
                LARGE_PADDING
            } else {
                node.large_in = node.large_in.saturating_sub(1);
                0
            };
            let nonce = nonce();
            node.link.ping(now_us, nonce, padding);
            due.push(Probing {
                node: id,
                nonce,
                padding,
            });
        }
        due
    }

    /// Takes in a pong to one of the coordinator's probes at `now`, `received` when the service
    /// read it off the socket: the round trip ends there, so the dispatcher's backlog does not
    /// count against the node (the service's bounded inbound queue, when full, still does).
    /// It must answer a probe still outstanding (checked first, so replays cost no signature
    /// check) and be signed by the node's registered key for this node. It updates the node's
    /// latency or bandwidth, hence its score; it is not traffic that keeps the node live
    /// (telemetry does that).
    ///
    /// # Errors
    /// [`RegistryError::UnknownNode`], [`RegistryError::UnknownProbe`],
    /// [`RegistryError::TooFast`] or [`RegistryError::BadSignature`] (another signer, or a bad
    /// signature); the registry is unchanged.
    pub fn on_pong(
        &mut self,
        now: Instant,
        received: Instant,
        node: NodeId,
        pong: &Pong,
    ) -> Result<(), RegistryError> {
        let received_us = self.micros(received);
        let entry = self
            .nodes
            .get_mut(&node)
            .ok_or(RegistryError::UnknownNode)?;
        if !entry.link.is_outstanding(pong.nonce) {
            return Err(RegistryError::UnknownProbe);
        }
        if !entry.bad_frames.has(now) {
            return Err(RegistryError::TooFast);
        }
        if pong.signer != *entry.public_key.as_bytes() || pong.verify(&node).is_err() {
            entry.bad_frames.take(now);
            return Err(RegistryError::BadSignature);
        }
        entry.link.pong(pong.nonce, received_us);
        entry.rescore(&self.config.score);
        reindex(&mut self.placement, node, entry);
        Ok(())
    }

    /// Records a probe of `node` sent at `now`, outside the schedule: tests that set a node's
    /// link without waiting for its turn.
    #[cfg(test)]
    pub(crate) fn probe_now(&mut self, now: Instant, node: &NodeId, nonce: u64, padding: usize) {
        let now_us = self.micros(now);
        if let Some(entry) = self.nodes.get_mut(node) {
            entry.link.ping(now_us, nonce, padding);
        }
    }
}
