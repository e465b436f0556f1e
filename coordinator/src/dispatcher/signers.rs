//! Receipt signatures checked beside the socket, before the dispatcher thread.
//!
//! The dispatcher is one thread, and checking a receipt's ed25519 signature was the largest
//! single cost of a result on it: 31% of its time in a pipelined batch (`perf record
//! --call-graph dwarf` on `ambient bench --only e2e`). The MQTT task runs beside it, so the
//! service checks the signature there, as it answers pings there ([`super::pong`]), and hands
//! the dispatcher a [`Checked`] with the frame. The dispatcher skips its own check only when
//! the [`Checked`] names the key it has registered for the node and the receipt's very
//! signature, and checks as before otherwise: what is accepted never depends on this cache,
//! which only moves work off the dispatcher thread.
//!
//! Keys are learned from announce frames without checking the announce's signature: a node's
//! id is the hash of its key ([`NodeId::from_public_key`]), so the key that hashes to the
//! topic's node id is that node's key, whoever sent the frame. Keys are kept decompressed
//! ([`PublicKey`]), which saves a tenth of each check.
//!
//! What a peer can make this task check is bounded, since before it the dispatcher dropped a
//! report for an attempt no longer outstanding without checking anything:
//!
//! - a replayed report (a signature among the node's last [`RECENT`] checked) is not checked
//!   again: it goes to the dispatcher unchecked, which drops it as stale;
//! - reports whose signature fails draw on the node's budget of bad frames
//!   (`enrollment.bad_frames_per_s`, the registry's for telemetry); once it is spent, the
//!   node's reports go to the dispatcher unchecked until it refills;
//! - a new, validly signed report costs its sender a signature, half what it costs here.
//!
//! At most `cap` nodes are kept; once full, the receipts of nodes not yet seen are checked on
//! the dispatcher thread.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use ambient_core::topics::NodeTopic;
use ambient_core::{Envelope, Message, NodeId, PublicKey, ReportBody, SignedReceipt};

use crate::TokenBucket;

/// Receipt signatures remembered per node, so that a replayed frame is not checked again.
pub const RECENT: usize = 64;

/// Evidence from [`Signers::check`] that a receipt's signature verified under a key. Only
/// [`Signers`] makes one; it vouches for that one signature only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    key: [u8; 32],
    signature: [u8; 64],
}

impl Checked {
    /// Whether it vouches for `receipt`'s signature under `key`.
    pub(crate) fn vouches(&self, key: &[u8; 32], receipt: &SignedReceipt) -> bool {
        self.key == *key && self.signature == receipt.signature
    }

    /// What [`Signers::check`] would return for `receipt` under `key`, for tests of what the
    /// dispatcher does with it.
    #[cfg(test)]
    pub(crate) fn assume(key: [u8; 32], receipt: &SignedReceipt) -> Self {
        Self {
            key,
            signature: receipt.signature,
        }
    }
}

#[derive(Debug)]
struct Signer {
    key: PublicKey,
    bad: TokenBucket,
    recent: VecDeque<[u8; 64]>,
}

/// The keys of the nodes seen announcing; see the module docs.
#[derive(Debug)]
pub struct Signers {
    nodes: HashMap<NodeId, Signer>,
    cap: usize,
    bad_frames_per_s: u32,
}

impl Signers {
    /// Keeps at most `cap` nodes; each may send `bad_frames_per_s` reports that fail the
    /// check (bursts of ten seconds' worth) before its reports are left to the dispatcher.
    pub fn new(cap: usize, bad_frames_per_s: u32) -> Self {
        Self {
            nodes: HashMap::new(),
            cap,
            bad_frames_per_s,
        }
    }

    /// Reads a frame from `ambient/v1/nodes/{node}/{leaf}` that arrived at `now`: an announce
    /// teaches the node's key; a report whose receipt's signature verifies under it comes back
    /// [`Checked`].
    pub fn check(
        &mut self,
        now: Instant,
        node: NodeId,
        leaf: NodeTopic,
        frame: &[u8],
    ) -> Option<Checked> {
        if !matches!(leaf, NodeTopic::Announce | NodeTopic::Results) {
            return None;
        }
        match Envelope::decode(frame).ok()?.message {
            Message::Announce(a) if leaf == NodeTopic::Announce => {
                let bytes = a.announce.public_key;
                if NodeId::from_public_key(&bytes) == node
                    && !self.nodes.contains_key(&node)
                    && self.nodes.len() < self.cap
                    && let Ok(key) = PublicKey::from_bytes(&bytes)
                {
                    self.nodes.insert(
                        node,
                        Signer {
                            key,
                            bad: TokenBucket::new(self.bad_frames_per_s),
                            // Grows with the node's reports: an announce alone (say, of an
                            // id an open broker let anyone use) costs about 100 bytes.
                            recent: VecDeque::new(),
                        },
                    );
                }
                None
            }
            Message::Report(r) if leaf == NodeTopic::Results && r.node == node => {
                let ReportBody::Executed { receipt, .. } = &r.body else {
                    return None;
                };
                let signer = self.nodes.get_mut(&node)?;
                if receipt.receipt.node != node
                    || signer.recent.contains(&receipt.signature)
                    || !signer.bad.has(now)
                {
                    return None;
                }
                if receipt.verify_signature_by(&signer.key).is_err() {
                    signer.bad.take(now);
                    return None;
                }
                if signer.recent.len() == RECENT {
                    signer.recent.pop_front();
                }
                signer.recent.push_back(receipt.signature);
                Some(Checked {
                    key: signer.key.to_bytes(),
                    signature: receipt.signature,
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use ambient_core::{Engine, Exit, Identity, Limits, Receipt, Report, TaskId, sha3_256};

    use super::*;
    use crate::sim::announce_frame;

    fn report_frame(signer: &Identity, node: NodeId, task: &str) -> Vec<u8> {
        let receipt = Receipt {
            task_id: TaskId::new(task).expect("a valid id"),
            attempt: 1,
            node,
            module: sha3_256(b"module"),
            input: sha3_256(b"in"),
            output: sha3_256(b"out"),
            fuel_used: 1,
            limits: Limits::default(),
            engine: Engine::Wasmtime,
            exit: Exit::Ok,
        }
        .sign(signer);
        let report = Report {
            task_id: receipt.receipt.task_id.clone(),
            attempt: 1,
            node,
            body: ReportBody::Executed {
                receipt,
                output: b"out",
                message: Default::default(),
            },
        };
        Envelope::new(Message::Report(report)).to_vec()
    }

    fn announce(node: &Identity) -> Vec<u8> {
        announce_frame(node, "x86_64", 4)
    }

    /// The key a check vouched under, if it did.
    fn key(checked: Option<Checked>) -> Option<[u8; 32]> {
        checked.map(|c| c.key)
    }

    #[test]
    fn a_receipt_signed_by_the_key_its_node_announced_comes_back_checked_under_that_key() {
        let node = Identity::from_secret(&[1; 32]);
        let (mut signers, now) = (Signers::new(8, 20), Instant::now());
        let id = node.node_id();
        let frame = report_frame(&node, id, "t-1");
        assert_eq!(
            signers.check(now, id, NodeTopic::Results, &frame),
            None,
            "no key is known before the node announces"
        );
        signers.check(now, id, NodeTopic::Announce, &announce(&node));
        assert_eq!(
            key(signers.check(now, id, NodeTopic::Results, &frame)),
            Some(node.public_key())
        );
    }

    #[test]
    fn a_receipt_signed_by_another_key_or_an_announce_of_another_nodes_key_is_left_to_the_dispatcher()
     {
        let (node, other) = (
            Identity::from_secret(&[1; 32]),
            Identity::from_secret(&[2; 32]),
        );
        let id = node.node_id();
        let (mut signers, now) = (Signers::new(8, 20), Instant::now());
        // Another key announced on this node's topic is not this node's key.
        signers.check(now, id, NodeTopic::Announce, &announce(&other));
        signers.check(now, id, NodeTopic::Announce, &announce(&node));
        let forged = report_frame(&other, id, "t-1");
        assert_eq!(signers.check(now, id, NodeTopic::Results, &forged), None);
        assert_eq!(signers.check(now, id, NodeTopic::Results, b"garbage"), None);
    }

    #[test]
    fn a_replayed_report_is_not_checked_again_and_a_node_out_of_bad_frames_is_left_to_the_dispatcher()
     {
        let (node, forger) = (
            Identity::from_secret(&[1; 32]),
            Identity::from_secret(&[2; 32]),
        );
        let id = node.node_id();
        // One bad frame per second: a burst of ten.
        let (mut signers, now) = (Signers::new(8, 1), Instant::now());
        signers.check(now, id, NodeTopic::Announce, &announce(&node));
        let honest = report_frame(&node, id, "t-1");
        assert!(
            signers
                .check(now, id, NodeTopic::Results, &honest)
                .is_some()
        );
        assert_eq!(
            signers.check(now, id, NodeTopic::Results, &honest),
            None,
            "the dispatcher drops a replay as stale without checking it"
        );
        for _ in 0..10 {
            let forged = report_frame(&forger, id, "t-2");
            assert_eq!(signers.check(now, id, NodeTopic::Results, &forged), None);
        }
        let next = report_frame(&node, id, "t-3");
        assert_eq!(
            signers.check(now, id, NodeTopic::Results, &next),
            None,
            "its budget of bad frames is spent"
        );
        let later = now + std::time::Duration::from_secs(1);
        assert!(
            signers
                .check(later, id, NodeTopic::Results, &next)
                .is_some()
        );
    }

    #[test]
    fn once_full_the_cache_learns_no_more_keys_but_keeps_those_it_has() {
        let (a, b) = (
            Identity::from_secret(&[1; 32]),
            Identity::from_secret(&[2; 32]),
        );
        let (mut signers, now) = (Signers::new(1, 20), Instant::now());
        for n in [&a, &b] {
            signers.check(now, n.node_id(), NodeTopic::Announce, &announce(n));
        }
        let (ia, ib) = (a.node_id(), b.node_id());
        let check = |signers: &mut Signers, id, n: &Identity| {
            key(signers.check(now, id, NodeTopic::Results, &report_frame(n, id, "t-1")))
        };
        assert_eq!(check(&mut signers, ia, &a), Some(a.public_key()));
        assert_eq!(check(&mut signers, ib, &b), None);
    }
}
