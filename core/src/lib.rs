//! `ambient-core`: the decisions every Ambient device and gateway must agree on, bit for bit.
//!
//! Plain data, pure functions and small state machines; no clock, file or socket. Callers pass
//! time in (`now_ms`) and act on what comes back. Builds without `std` for microcontrollers
//! (`default-features = false`).
//!
//! - [`TelemetrySample`]: one reading of a device, integers in named units.
//! - [`health_score`]: the seed's `0.4·bandwidth + 0.3·latency + 0.2·compute + 0.1·reputation`.
//! - [`Reputation`]: task outcomes and a score that resists small samples; [`credibility`]
//!   ([`doubt`], and [`result_doubt`] for a result some nodes agreed on and others did not):
//!   how far a node's results can be trusted after agreeing with other nodes' k times.
//! - [`SafetyPolicy`] and [`Breaker`]: the circuit breaker that takes a device out of the pool.
//! - [`Receipt`] and [`SignedReceipt`]: what a node signs for every task; [`chain_hash`] for the ledger.
//! - [`Envelope`] and [`Message`]: the versioned wire protocol; [`topics`] builds every MQTT topic.
//! - [`LinkProbe`]: latency and bandwidth from ping/pong round trips, for either end of a link.
//! - `inspect` (feature `inspect`, with `std`): what a WASM module imports and exports, and
//!   whether a call can run it, read without compiling it.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod connect;
mod error;
mod health;
mod id;
#[cfg(feature = "inspect")]
mod inspect;
mod link;
mod proof;
mod reputation;
mod safety;
mod telemetry;
pub mod topics;
mod verify;
mod wire;

pub use connect::{ConnectToken, TokenError};
pub use error::{DecodeError, ProofError, VerifyError};
pub use health::{HealthTerms, SCORE_SCALE, ScoreConfig, health_score};
pub use id::{Digest, NodeId, TaskId, sha3_256};
#[cfg(feature = "inspect")]
pub use inspect::{ModuleError, ModuleInfo, Refusals, WASI_MODULE, WASI_OFFERED, inspect};
pub use link::{LARGE_PADDING, LinkProbe};
pub use proof::{
    Engine, Exit, Identity, Limits, PublicKey, Receipt, SignedReceipt, chain_hash, sign_message,
    verify_message, verify_message_by,
};
pub use reputation::{Reputation, credibility, doubt, result_doubt};
pub use safety::{Admission, Breaker, BreakerState, SafetyPolicy, Transition, TripReason};
pub use telemetry::{TelemetrySample, ThrottleFlags};
pub use verify::{
    CONTESTED_LEAD, Expected, Quorum, Tariff, quorum, verify_receipt, verify_receipt_claims,
};
pub use wire::{
    Abi, Announce, Assignment, Envelope, MAX_BATCH, MAX_ENTRY_LEN, MAX_FRAME_BYTES,
    MAX_INPUT_BYTES, MAX_LABEL_LEN, MAX_LABELS, MAX_MESSAGE_LEN, MAX_MODULE_BYTES,
    MAX_OUTPUT_BYTES, MAX_PACKET_BYTES, MAX_SUBMISSION_BYTES, Message, PROTOCOL_VERSION, Ping,
    Pong, Probe, Refusal, Report, ReportBody, SignedAnnounce, SignedRefusal, SignedTelemetry,
    Telemetry,
};
