//! What clients receive on `ambient/v1/tasks/{task_id}/result` (JSON).

use ambient_core::SignedReceipt;
use serde::{Deserialize, Serialize};

/// Where a task stands. `accepted` comes first; `completed`, `failed` or `rejected` ends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventStatus {
    /// Journaled durably; a result will follow.
    Accepted,
    /// The submission was invalid; nothing was journaled.
    Rejected,
    /// Verified output delivered.
    Completed,
    /// The task could not produce a verified output; `error` says why.
    Failed,
}

impl EventStatus {
    /// Whether no further event follows.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Accepted)
    }
}

/// One event about a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// The task (for a rejected submission without an id, the id the coordinator assigned).
    pub task_id: String,
    /// Where it stands.
    pub status: EventStatus,
    /// The verified output, base64 (completed tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_b64: Option<String>,
    /// How the accepted run ended (`ok`, `trapped`, `out_of_fuel`, `timed_out`,
    /// `out_of_memory`, `exit_status`, `rejected`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<String>,
    /// The program's status, when `exit` is `exit_status` (a WASI `proc_exit` with a non-zero
    /// status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// The verification outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// Signed receipts of the accepted result.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub receipts: Vec<ReceiptJson>,
    /// Nodes whose result was accepted (hex ids).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Total paid to the nodes, in µcredits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<u64>,
    /// Submission to result at the coordinator, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Why it was rejected or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorJson>,
}

impl TaskEvent {
    /// An event with only an id and a status.
    pub fn new(task_id: impl Into<String>, status: EventStatus) -> Self {
        Self {
            task_id: task_id.into(),
            status,
            output_b64: None,
            exit: None,
            exit_status: None,
            verdict: None,
            receipts: Vec::new(),
            nodes: Vec::new(),
            reward: None,
            latency_ms: None,
            error: None,
        }
    }

    /// Adds an error.
    pub fn with_error(mut self, code: impl Into<String>, message: impl Into<String>) -> Self {
        self.error = Some(ErrorJson {
            code: code.into(),
            message: message.into(),
        });
        self
    }

    /// Encodes as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        // Plain data with string keys: serialisation cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A machine-readable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorJson {
    /// Stable code.
    pub code: String,
    /// Explanation.
    pub message: String,
}

/// A word about a task that already ended, on [`NOTICES`](ambient_core::topics::NOTICES).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// The task.
    pub task_id: String,
    /// `suspect_result`: the accepted result rested on `node`'s receipt alone, and `node` has
    /// since been shown to return wrong results. The result may be right; to be sure, submit
    /// the task again under a new id (with `replicate:K` for independent runs).
    pub code: String,
    /// The node.
    pub node: String,
    /// What happened, for a person.
    pub message: String,
}

/// How the result was verified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// `receipt`, `replicate:K` or `target:E` as submitted.
    pub policy: String,
    /// Replicas finally required (grows when replicas disagree).
    pub replicas: usize,
    /// Replicas whose output hash, fuel and exit agreed with the accepted result.
    pub agreeing: usize,
    /// Whether the task was drawn for a random spot check (a re-run on a second node).
    pub spot_checked: bool,
    /// Why a drawn spot check got no second result (the verified receipt stands alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot_check_missed: Option<String>,
    /// The bound on the chance that the accepted result is wrong, from the verified history of
    /// the nodes that agreed on it and of any that disagreed (`ambient_core::result_doubt`):
    /// what `target:ε` drives under ε, reported under every policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_bound: Option<f64>,
    /// Nodes whose result disagreed with the majority (their reputation dropped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disputed: Vec<String>,
}

/// A signed receipt, spelled out in hex for any client to re-verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptJson {
    /// Node id.
    pub node: String,
    /// Dispatch attempt.
    pub attempt: u16,
    /// sha3-256 of the module.
    pub module: String,
    /// sha3-256 of the input.
    pub input: String,
    /// sha3-256 of the output.
    pub output: String,
    /// Fuel consumed.
    pub fuel_used: u64,
    /// How the run ended.
    pub exit: String,
    /// The program's status, when `exit` is `exit_status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// Engine.
    pub engine: String,
    /// The signed commitment (sha3-256 over the receipt's canonical encoding).
    pub commitment: String,
    /// ed25519 signature over the commitment.
    pub signature: String,
}

impl From<&SignedReceipt> for ReceiptJson {
    fn from(s: &SignedReceipt) -> Self {
        let r = &s.receipt;
        Self {
            node: r.node.to_hex().to_string(),
            attempt: r.attempt,
            module: r.module.to_hex().to_string(),
            input: r.input.to_hex().to_string(),
            output: r.output.to_hex().to_string(),
            fuel_used: r.fuel_used,
            exit: r.exit.as_str().into(),
            exit_status: r.exit.status(),
            engine: r.engine.as_str().into(),
            commitment: r.commitment().to_hex().to_string(),
            signature: hex::encode(s.signature),
        }
    }
}
