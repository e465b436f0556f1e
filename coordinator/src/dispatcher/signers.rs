//! Receipt signatures checked beside the socket, before the dispatcher thread.
//!
//! The dispatcher is one thread, and checking a receipt's ed25519 signature was the largest
//! single cost of a result on it: a third of its time in a pipelined batch (`perf record
//! --call-graph dwarf` on `ambient bench --only e2e`). The MQTT task runs beside it, so the
//! service checks the signature there, as it answers pings there ([`super::pong`]), and hands
//! the dispatcher the key it checked under ([`Input::Frame`](super::Input::Frame)'s
//! `signed_by`). The dispatcher skips its own check only when that key is the one it has
//! registered for the node, and checks as before otherwise: what is accepted never depends on
//! this cache, which only moves work off the dispatcher thread.
//!
//! Keys are learned from announce frames without checking the announce's signature: a node's
//! id is the hash of its key ([`NodeId::from_public_key`]), so the key that hashes to the
//! topic's node id is that node's key, whoever sent the frame. Keys are kept decompressed
//! ([`PublicKey`]), which saves a tenth of each check. At most `cap` keys are kept; once
//! full, the receipts of nodes not yet seen are checked on the dispatcher thread.

use std::collections::HashMap;

use ambient_core::topics::NodeTopic;
use ambient_core::{Envelope, Message, NodeId, PublicKey, ReportBody};

/// The keys of the nodes seen announcing; see the module docs.
#[derive(Debug)]
pub struct Signers {
    keys: HashMap<NodeId, PublicKey>,
    cap: usize,
}

impl Signers {
    /// Keeps at most `cap` keys.
    pub fn new(cap: usize) -> Self {
        Self {
            keys: HashMap::new(),
            cap,
        }
    }

    /// Reads a frame from `ambient/v1/nodes/{node}/{leaf}`: an announce teaches the node's key;
    /// for a report whose receipt's signature verifies under the node's key, returns that key.
    pub fn check(&mut self, node: NodeId, leaf: NodeTopic, frame: &[u8]) -> Option<[u8; 32]> {
        if !matches!(leaf, NodeTopic::Announce | NodeTopic::Results) {
            return None;
        }
        match Envelope::decode(frame).ok()?.message {
            Message::Announce(a) if leaf == NodeTopic::Announce => {
                let bytes = a.announce.public_key;
                if NodeId::from_public_key(&bytes) == node
                    && (self.keys.len() < self.cap || self.keys.contains_key(&node))
                    && let Ok(key) = PublicKey::from_bytes(&bytes)
                {
                    self.keys.insert(node, key);
                }
                None
            }
            Message::Report(r) if leaf == NodeTopic::Results && r.node == node => {
                let ReportBody::Executed { receipt, .. } = &r.body else {
                    return None;
                };
                let key = self.keys.get(&node)?;
                (receipt.receipt.node == node && receipt.verify_signature_by(key).is_ok())
                    .then(|| key.to_bytes())
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

    fn report_frame(signer: &Identity, node: NodeId) -> Vec<u8> {
        let receipt = Receipt {
            task_id: TaskId::new("t-1").expect("a valid id"),
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

    #[test]
    fn a_receipt_signed_by_the_key_its_node_announced_comes_back_with_that_key() {
        let node = Identity::from_secret(&[1; 32]);
        let mut signers = Signers::new(8);
        let id = node.node_id();
        assert_eq!(
            signers.check(id, NodeTopic::Results, &report_frame(&node, id)),
            None,
            "no key is known before the node announces"
        );
        signers.check(id, NodeTopic::Announce, &announce(&node));
        assert_eq!(
            signers.check(id, NodeTopic::Results, &report_frame(&node, id)),
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
        let mut signers = Signers::new(8);
        // Another key announced on this node's topic is not this node's key.
        signers.check(id, NodeTopic::Announce, &announce(&other));
        signers.check(id, NodeTopic::Announce, &announce(&node));
        assert_eq!(
            signers.check(id, NodeTopic::Results, &report_frame(&other, id)),
            None
        );
        assert_eq!(signers.check(id, NodeTopic::Results, &b"garbage"[..]), None);
    }

    #[test]
    fn once_full_the_cache_learns_no_more_keys_but_keeps_those_it_has() {
        let (a, b) = (
            Identity::from_secret(&[1; 32]),
            Identity::from_secret(&[2; 32]),
        );
        let mut signers = Signers::new(1);
        for n in [&a, &b] {
            signers.check(n.node_id(), NodeTopic::Announce, &announce(n));
        }
        let (ia, ib) = (a.node_id(), b.node_id());
        assert_eq!(
            signers.check(ia, NodeTopic::Results, &report_frame(&a, ia)),
            Some(a.public_key())
        );
        assert_eq!(
            signers.check(ib, NodeTopic::Results, &report_frame(&b, ib)),
            None
        );
    }
}
