//! `ambient-coordinator`: the gateway service as a library. The `ambient` binary (`cli/`)
//! runs it as `ambient coordinator`.
//!
//! - [`Coordinator`]: binds the embedded broker and runs the service until shutdown.
//! - [`Dispatcher`]: every decision about tasks (intake, placement, retries, verification,
//!   settlement, delivery), a state machine that takes the time and an [`Input`] and returns
//!   [`Effects`]; no socket, file or clock.
//! - [`Registry`] and [`Strategy`]: who is out there and where a task goes.
//! - [`store::Store`]: the SQLite journal, module store and ledger.
//! - [`client`]: what `ambient submit` and any program use to submit tasks and await results.
//! - [`http`]: the HTTP API (typed JSON views, health, submission); [`metrics`]: its
//!   Prometheus text; [`dashboard`]: its live page.
//! - [`sim`]: `ambient sim`, the dispatcher's verification against byzantine nodes on
//!   simulated time.
//! - [`ha`]: Home Assistant MQTT discovery (each node one device, with its sensors).
#![deny(missing_docs)]

pub mod access;
pub mod client;
mod config;
pub mod dashboard;
mod dispatcher;
#[doc(hidden)]
pub mod fixture;
pub mod ha;
pub mod http;
mod intake;
pub mod metrics;
pub mod mqtt;
mod registry;
mod results;
mod scheduler;
mod service;
pub mod sim;
pub mod store;

pub use ambient_mqtt::{BrokerUrl, TlsFiles};
pub use config::{BrokerMode, ConfigError, CoordinatorConfig, RawConfig, TlsListener};
pub use dispatcher::{
    Checked, DispatchConfig, Dispatcher, Dropped, Effects, Ended, Frame, Input, Journal, Now,
    Publish, Recovered, Signers, SpotCheck, pong,
};
pub use intake::{
    LimitsJson, MAX_REPLICAS, MAX_SUBMISSIONS_PER_MESSAGE, Parsed, Policy, Rejection, RequiresJson,
    Submission, TaskSpec, parse as parse_submission, split as split_submissions,
};
pub use registry::*;
pub use results::{ErrorJson, EventStatus, Notice, ReceiptJson, TaskEvent, Verdict};
pub use scheduler::*;
pub use service::{Coordinator, CoordinatorError};
