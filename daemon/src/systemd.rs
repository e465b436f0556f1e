//! systemd's readiness protocol (`Type=notify`) and watchdog: the agent's `main` and the
//! coordinator's `ambient coordinator` wrap their shutdown signal in [`notify_systemd`].
//!
//! Every message is a no-op unless systemd started the process with `NOTIFY_SOCKET` set, and
//! the pings only run when the unit has `WatchdogSec=` (systemd then sets `WATCHDOG_USEC`).

use std::future::Future;
use std::time::Duration;

/// Wraps the daemon's shutdown future: tells systemd `READY=1` when it is first awaited, sends
/// `WATCHDOG=1` every half watchdog period while it is awaited, and `STOPPING=1` when it
/// completes.
///
/// Readiness rests on where the daemons await their shutdown future: only in their main loop,
/// once they serve. The agent reaches it with its identity loaded and sandbox built (it never
/// waits for the broker, which it retries by itself); the coordinator with its broker listener
/// bound, its journal opened and recovered, and its broker, HTTP and dispatcher running.
///
/// The pings come from the same place, so they also show that loop is alive: the agent awaits
/// this future in the `select!` of its event loop, so a loop stuck anywhere else stops the
/// pings and systemd restarts the agent. The coordinator awaits it while its dispatcher thread
/// runs, so there the pings show that the async runtime is alive and the dispatcher has not
/// ended, not that the dispatcher is making progress.
pub async fn notify_systemd(shutdown: impl Future<Output = ()>) {
    send(Notify::Ready);
    match sd_watchdog() {
        Some(timeout) => {
            // Half the timeout, as sd_watchdog_enabled(3) recommends; a late tick is delayed,
            // not bunched up.
            let mut ping = tokio::time::interval(timeout / 2);
            ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tokio::pin!(shutdown);
            loop {
                tokio::select! {
                    () = &mut shutdown => break,
                    _ = ping.tick() => send(Notify::Watchdog),
                }
            }
        }
        None => shutdown.await,
    }
    send(Notify::Stopping);
}

/// The states this crate reports.
#[derive(Debug, Clone, Copy)]
enum Notify {
    Ready,
    Watchdog,
    Stopping,
}

#[cfg(unix)]
fn send(state: Notify) {
    use sd_notify::NotifyState;
    let message = match state {
        Notify::Ready => NotifyState::Ready,
        Notify::Watchdog => NotifyState::Watchdog,
        Notify::Stopping => NotifyState::Stopping,
    };
    // Nothing to do about a failure but say so: the service keeps running, and systemd reports
    // a missing READY=1 or WATCHDOG=1 itself.
    if let Err(error) = sd_notify::notify(&[message]) {
        tracing::warn!(%error, ?state, "cannot notify systemd");
    }
}

#[cfg(not(unix))]
fn send(_: Notify) {}

/// The watchdog timeout systemd set for this process, if any.
fn sd_watchdog() -> Option<Duration> {
    #[cfg(unix)]
    {
        // A zero timeout would make a zero-period interval, which panics.
        sd_notify::watchdog_enabled().filter(|t| !t.is_zero())
    }
    #[cfg(not(unix))]
    {
        None
    }
}
