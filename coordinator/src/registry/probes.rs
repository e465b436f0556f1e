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

impl Registry {
    /// Microseconds from the registry's epoch to `at`: the probes' clock.
    fn micros(&mut self, at: Instant) -> u64 {
        let epoch = *self.epoch.get_or_insert(at);
        u64::try_from(at.saturating_duration_since(epoch).as_micros()).unwrap_or(u64::MAX)
    }

    /// The probes due at `now`, each recorded as sent at `now` with a nonce from `nonce` (draw
    /// it at random: a node that could guess it could answer a large probe before the padding
    /// arrived). A node is first probed as soon as it registers, then every
    /// [`RegistryConfig::probe_interval`] while it is online; every
    /// [`RegistryConfig::bandwidth_probe_every`]th probe, starting with the second, is large.
    /// Forgotten nodes leave the schedule here. O(due probes).
    pub fn probes(&mut self, now: Instant, mut nonce: impl FnMut() -> u64) -> Vec<Probing> {
        let now_us = self.micros(now);
        let every = u64::from(self.config.bandwidth_probe_every.max(1));
        let next = now + self.config.probe_interval.max(Duration::from_millis(1));
        let mut due = Vec::new();
        while let Some(&(at, id)) = self.probe_queue.front() {
            if at > now {
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
            let padding = if node.probes_sent % every == 1 % every {
                LARGE_PADDING
            } else {
                0
            };
            node.probes_sent += 1;
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

    /// Takes in a pong to one of the coordinator's probes, `received` when the service read it
    /// off the socket (not when the dispatcher got to it, so a backlog does not count against
    /// the node). It must be signed by the node's registered key for this node, and answer a
    /// probe still outstanding. It updates the node's latency or bandwidth, hence its score;
    /// it is not traffic that keeps the node live (telemetry does that).
    ///
    /// # Errors
    /// [`RegistryError::UnknownNode`], [`RegistryError::TooFast`],
    /// [`RegistryError::BadSignature`] (another signer, or a bad signature) or
    /// [`RegistryError::UnknownProbe`]; the registry is unchanged.
    pub fn on_pong(
        &mut self,
        received: Instant,
        node: NodeId,
        pong: &Pong,
    ) -> Result<(), RegistryError> {
        let received_us = self.micros(received);
        let entry = self
            .nodes
            .get_mut(&node)
            .ok_or(RegistryError::UnknownNode)?;
        if !entry.bad_frames.has(received) {
            return Err(RegistryError::TooFast);
        }
        if pong.signer != entry.public_key || pong.verify(&node).is_err() {
            entry.bad_frames.take(received);
            return Err(RegistryError::BadSignature);
        }
        if !entry.link.pong(pong.nonce, received_us) {
            return Err(RegistryError::UnknownProbe);
        }
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
