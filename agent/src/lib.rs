#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod agent;
pub mod calibrate;
mod config;
mod connection;
mod dedup;
mod delivery;
pub mod engine;
mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
mod metrics;
mod node;
mod outbox;
mod profile;
mod telemetry;

pub use agent::{COORDINATOR_KEY_FILE, run};
pub use ambient_daemon::config::env_vars;
pub use ambient_daemon::{IDENTITY_FILE, IdentityError, load_identity, notify_systemd};
pub use config::{
    AgentConfig, BrokerUrl, ConfigError, DEFAULT_BROKER, DEFAULT_CONFIG_PATH, DEFAULT_STATE_DIR,
    ENV_PREFIX, EngineChoice, RawConfig, RawSafety, RawSandbox, RawTls,
};
pub use error::AgentError;
pub use profile::{Heater, Profile, UnknownProfile};
