//! What Ambient's two daemons share as long-running processes. The agent (`ambient-agent`) and
//! the coordinator (`ambient coordinator`) both:
//!
//! - sign with an ed25519 key kept on disk: [`load_identity`] (the agent in its state
//!   directory, the coordinator in its data directory);
//! - keep private state in directories only their user can read: [`create_private_dir`];
//! - run as `Type=notify` systemd services with a watchdog: [`notify_systemd`];
//! - stop cleanly on SIGINT or SIGTERM: [`shutdown_signal`];
//! - read a TOML file with environment variables over it: [`config::load`].
//!
//! Nothing here decides anything; it is the thin I/O both binaries would otherwise write twice.
#![deny(missing_docs)]

pub mod config;
mod identity;
mod systemd;

use std::path::Path;

pub use identity::{IDENTITY_FILE, IdentityError, load_or_create as load_identity};
pub use systemd::notify_systemd;

/// Creates `dir` (and parents) readable by the owner only (mode 0700 on Unix).
///
/// # Errors
/// Whatever creating the directory fails with.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM (what `systemctl stop` and `docker stop` send).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
