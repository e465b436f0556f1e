//! Module lookups: a job waits for its module in memory, then on disk, then on the broker
//! until the fetch deadline, then for its compile; the answers run or refuse the waiting jobs.

use super::*;

/// A module being looked up or fetched, and the jobs waiting for it.
#[derive(Debug)]
pub(super) struct Fetch {
    pub(super) state: FetchState,
    pub(super) waiters: Vec<Job>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FetchState {
    /// Looking in memory and on disk.
    Loading,
    /// Subscribed to the module topic until the deadline.
    Fetching { deadline: Instant },
    /// The bytes arrived and are being verified and compiled.
    Verifying,
}

impl<M: Clone> Node<M> {
    pub(super) fn wait_for_module(&mut self, job: Job, out: &mut Vec<Action<M>>) {
        let hash = job.module;
        if let Some(fetch) = self.fetches.get_mut(&hash) {
            fetch.waiters.push(job);
            return;
        }
        let fetch = Fetch {
            state: FetchState::Loading,
            waiters: vec![job],
        };
        self.fetches.insert(hash, fetch);
        out.push(Action::Load(hash));
    }

    pub(super) fn fetch_from_broker(
        &mut self,
        now: Instant,
        hash: Digest,
        out: &mut Vec<Action<M>>,
    ) {
        let Some(fetch) = self.fetches.get_mut(&hash) else {
            return;
        };
        fetch.state = FetchState::Fetching {
            deadline: now + self.settings.module_fetch_timeout,
        };
        tracing::debug!(module = %hash, "fetching module from the broker");
        // Offline, the subscription is made on the next connect; the deadline still holds.
        if self.connected {
            out.push(Action::Subscribe(hash));
        }
    }

    pub(super) fn on_module(&mut self, hash: Digest, payload: Bytes, out: &mut Vec<Action<M>>) {
        let Some(fetch) = self.fetches.get_mut(&hash) else {
            return;
        };
        if !matches!(fetch.state, FetchState::Fetching { .. }) {
            return;
        }
        fetch.state = FetchState::Verifying;
        out.push(Action::Unsubscribe(hash));
        out.push(Action::Prepare { hash, payload });
    }

    pub(super) fn expire_fetches(&mut self, now: Instant, out: &mut Vec<Action<M>>) {
        let mut expired: Vec<Digest> = self
            .fetches
            .iter()
            .filter(
                |(_, f)| matches!(f.state, FetchState::Fetching { deadline } if deadline <= now),
            )
            .map(|(h, _)| *h)
            .collect();
        expired.sort();
        for hash in expired {
            out.push(Action::Unsubscribe(hash));
            if let Some(fetch) = self.fetches.remove(&hash) {
                tracing::warn!(module = %hash, tasks = fetch.waiters.len(), "module did not arrive in time");
                for job in fetch.waiters {
                    refuse(job.key(), Refusal::ModuleUnavailable, true, out);
                }
            }
        }
    }

    pub(super) fn on_module_ready(
        &mut self,
        hash: Digest,
        result: Result<M, ExecError>,
        out: &mut Vec<Action<M>>,
    ) {
        let Some(fetch) = self.fetches.remove(&hash) else {
            return;
        };
        match result {
            Ok(module) => {
                for job in fetch.waiters {
                    let module = module.clone();
                    out.push(Action::Execute { job, module });
                }
            }
            Err(e @ (ExecError::HashMismatch { .. } | ExecError::Internal(_))) => {
                tracing::warn!(module = %hash, error = %e, "module unavailable");
                for job in fetch.waiters {
                    refuse(job.key(), Refusal::ModuleUnavailable, true, out);
                }
            }
            Err(e) => {
                tracing::warn!(module = %hash, error = %e, "module rejected");
                let error = Arc::new(e);
                for job in fetch.waiters {
                    let error = error.clone();
                    out.push(Action::Reject { job, error });
                }
            }
        }
    }
}
