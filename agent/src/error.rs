use std::path::PathBuf;

use crate::config::ConfigError;
use crate::engine::ExecError;
use ambient_daemon::IdentityError;

/// Why the agent could not start. Once running, the agent does not stop on errors: a lost
/// broker is retried, a bad frame is dropped, a bad task gets a report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The identity key could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The outbox directory could not be opened.
    #[error("cannot open the outbox {path}: {source}")]
    Outbox {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The WASM engine could not be set up.
    #[error("cannot start the sandbox: {0}")]
    Sandbox(#[from] ExecError),
    /// TLS to the broker cannot be set up.
    #[error("cannot set up TLS to the broker: {0}")]
    Tls(String),
    /// The metrics address cannot be listened on.
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The pinned coordinator key cannot be read.
    #[error(
        "{path}: {reason}; it must hold the coordinator's public key as 64 hex digits (printed when the coordinator starts), or be deleted to trust the first coordinator that assigns a task"
    )]
    CoordinatorKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}
