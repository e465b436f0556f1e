//! Every MQTT topic Ambient uses, built in one place: `ambient/v1/...`.

use core::fmt::Write as _;

use crate::{Digest, NodeId, TaskId};

/// A topic string; long enough for the longest topic (a 64-character task id).
pub type Topic = heapless::String<128>;

/// Root of every topic.
pub const PREFIX: &str = "ambient/v1";
/// Where clients publish task submissions (JSON).
pub const SUBMIT: &str = "ambient/v1/tasks/submit";
/// Where the coordinator publishes a `rejected` event for every submission it refuses (JSON),
/// including those whose task id could not be read, so no submission goes unanswered.
pub const REJECTED: &str = "ambient/v1/tasks/rejected";
/// Where the coordinator publishes a notice (JSON) about a task that already ended, when its
/// accepted result rested on one node's receipt alone and that node has since been shown to
/// return wrong results.
pub const NOTICES: &str = "ambient/v1/tasks/notices";
/// Filter matching every node topic (`ambient/v1/nodes/{id}/{leaf}`).
pub const ALL_NODES: &str = "ambient/v1/nodes/+/+";
/// Filter matching every module upload.
pub const ALL_MODULES: &str = "ambient/v1/modules/+";
/// Filter matching every node's Home Assistant state (`ambient/v1/ha/{id}/state`).
pub const ALL_HA_STATES: &str = "ambient/v1/ha/+/state";

/// The leaf of a node topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeTopic {
    /// Retained text `online` / `offline` (the last will).
    Status,
    /// Retained signed announce.
    Announce,
    /// Signed telemetry and pings.
    Telemetry,
    /// Assignments and pongs, to the node.
    Tasks,
    /// Reports, from the node.
    Results,
}

impl NodeTopic {
    const ALL: [NodeTopic; 5] = [
        Self::Status,
        Self::Announce,
        Self::Telemetry,
        Self::Tasks,
        Self::Results,
    ];

    /// The leaf's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Announce => "announce",
            Self::Telemetry => "telemetry",
            Self::Tasks => "tasks",
            Self::Results => "results",
        }
    }
}

/// Filter matching one leaf of every node: `ambient/v1/nodes/+/{leaf}`.
pub fn all_nodes(leaf: NodeTopic) -> Topic {
    let mut t = Topic::new();
    let _ = write!(t, "{PREFIX}/nodes/+/{}", leaf.as_str());
    t
}

/// `ambient/v1/nodes/{node}/{leaf}`.
pub fn node(node: &NodeId, leaf: NodeTopic) -> Topic {
    let mut t = Topic::new();
    // 11 + 6 + 32 + 1 + 9 bytes always fit in 128.
    let _ = write!(t, "{PREFIX}/nodes/{node}/{}", leaf.as_str());
    t
}

/// Splits a node topic into the node id and leaf; `None` for any other topic.
pub fn parse_node(topic: &str) -> Option<(NodeId, NodeTopic)> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix("/nodes/")?;
    let (id, leaf) = rest.split_once('/')?;
    let leaf = NodeTopic::ALL.into_iter().find(|l| l.as_str() == leaf)?;
    Some((NodeId::from_hex(id)?, leaf))
}

/// `ambient/v1/ha/{node}/state`: the coordinator's view of a node as JSON, retained, for Home
/// Assistant (which cannot read the signed binary telemetry).
pub fn ha_state(node: &NodeId) -> Topic {
    let mut t = Topic::new();
    let _ = write!(t, "{PREFIX}/ha/{node}/state");
    t
}

/// `ambient/v1/tasks/{task_id}/result`: where the outcome of a task is delivered (JSON).
pub fn task_result(task: &TaskId) -> Topic {
    let mut t = Topic::new();
    let _ = write!(t, "{PREFIX}/tasks/{task}/result");
    t
}

/// `ambient/v1/modules/{sha3-256 hex}`: a module's bytes, retained, content-addressed.
pub fn module(hash: &Digest) -> Topic {
    let mut t = Topic::new();
    let _ = write!(t, "{PREFIX}/modules/{hash}");
    t
}

/// The module hash named by a module topic.
pub fn parse_module(topic: &str) -> Option<Digest> {
    Digest::from_hex(topic.strip_prefix(PREFIX)?.strip_prefix("/modules/")?)
}
