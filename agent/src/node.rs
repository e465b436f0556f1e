//! [`Node`]: the agent's decisions as a state machine, with no I/O.
//!
//! [`Node::handle`] takes the time (`now`, read by the caller) and one [`Input`], and appends
//! what to do to a list of [`Action`]s. It opens no socket or file, reads no clock, spawns
//! nothing and draws no random number (the seeds come in at construction). `agent.rs` owns
//! the I/O: it turns channel messages, timers and the shutdown signal into inputs, and
//! performs each action (publish, subscribe, run blocking work, write the outbox, pin a key).
//! Where an action can fail in a way the node must know about, the answer comes back as an
//! input ([`Input::Unqueued`], [`Input::NotCached`], [`Input::Closed`]).
//!
//! # State
//!
//! - **Admission**: execution slots ([`Settings::max_concurrency`]), the safety breaker, the
//!   duplicate filter, and the pinned coordinator key (trust on first use).
//! - **Modules**: one [`Fetch`] per module being looked up on disk, fetched from the broker
//!   (with a deadline) or compiled, with the jobs waiting for it.
//! - **Outbox**: every report not yet acknowledged by the broker, by sequence number; whether
//!   it is queued in the client and whether it is on disk (see `outbox.rs` for when).
//! - **Link**: the ping/pong probe that measures latency and bandwidth to the coordinator.
//! - **Phase**: running, then on shutdown draining (running tasks finish, up to the grace),
//!   flushing (the outbox empties, bounded), closing (the disconnect goes out), finished.
//!
//! # What the inputs decide
//!
//! | input | decision |
//! |---|---|
//! | [`Input::Tasks`] | an assignment verified against the pinned key is run, refused (busy, breaker, shutting down) or answered from the duplicate filter; a pong updates the link; anything else is dropped and counted |
//! | [`Input::NotCached`], [`Input::Loaded`], [`Input::Module`], [`Input::Prepared`] | a job waits for its module: disk, then the broker until the fetch deadline, then compile; a module that never comes or does not match its hash is refused as unavailable, one that does not compile is a rejected run |
//! | [`Input::Finished`] | a report enters the outbox, frees its slot and tells the breaker what the run said about the device |
//! | [`Input::Connected`], [`Input::Lost`], [`Input::Delivered`], [`Input::Unqueued`], [`Input::Retry`] | reports are (re)published oldest first and written to disk when they must outlive the process |
//! | [`Input::Tick`], [`Input::Reading`] | signed telemetry with the breaker's state, then a ping |
//! | [`Input::Shutdown`], [`Input::Timer`], [`Input::Closed`] | the shutdown phases; expired module fetches |

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambient_core::{
    Abi, Admission, Breaker, Digest, Envelope, Exit, Identity, Limits, Message, NodeId, Ping,
    Refusal, SafetyPolicy, SignedTelemetry, TaskId, Telemetry, TelemetrySample, Transition,
    sha3_256, sign_message, topics,
};
use bytes::Bytes;
use rumqttc::QoS;

use crate::dedup::{Dedup, Seen, TaskKey};
use crate::engine::ExecError;
use crate::link::{LARGE_PADDING, LinkProbe};
use crate::outbox::{self, Op, Stored};
use crate::telemetry::Reading;

/// Bytes of finished reports kept in memory to answer a duplicate assignment.
const REPORT_MEMORY: usize = 16 << 20;
/// Longest shutdown waits for the outbox to drain once tasks are done.
const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// Longest shutdown waits for the disconnect to go out.
const DISCONNECT_WAIT: Duration = Duration::from_secs(2);

/// What the node is configured with (from [`crate::AgentConfig`]).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Tasks run at once; further assignments are refused as busy.
    pub max_concurrency: u16,
    /// Assignments remembered by the duplicate filter.
    pub dedup_capacity: usize,
    /// When the breaker opens.
    pub safety: SafetyPolicy,
    /// How long a module may take to arrive from the broker.
    pub module_fetch_timeout: Duration,
    /// How long shutdown waits for running tasks.
    pub shutdown_grace: Duration,
    /// Every this many telemetry intervals, the ping carries [`LARGE_PADDING`].
    pub bandwidth_probe_every: u32,
    /// A simulated profile's added latency (µs) and link cap (kbit/s).
    pub link_offset: Option<(u32, u32)>,
    /// Readings come from a simulated profile.
    pub simulated: bool,
    /// Where the pinned coordinator key is kept, named when a frame is signed by another.
    pub key_file: PathBuf,
    /// Test-only faults this node injects.
    #[cfg(feature = "fault-injection")]
    pub faults: crate::fault::Faults,
}

/// A topic under the node's own prefix.
pub(crate) type Leaf = topics::NodeTopic;

/// An assignment the node holds: owned, with its input sliced from the frame without copying.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub task_id: TaskId,
    pub attempt: u16,
    pub module: Digest,
    pub abi: Abi,
    pub entry: String,
    pub limits: Limits,
    pub input: Bytes,
    /// sha3-256 of `input`: checked against the coordinator's signature, then in the receipt.
    pub input_hash: Digest,
}

impl Job {
    pub fn key(&self) -> TaskKey {
        (self.task_id.clone(), self.attempt)
    }
}

/// A signed report, built off the node (answer to [`Action::Execute`], [`Action::Reject`] and
/// [`Action::Refuse`]).
#[derive(Debug, Clone)]
pub(crate) struct Finished {
    pub key: TaskKey,
    /// Held an execution slot.
    pub admitted: bool,
    /// What to tell the breaker: success, failure, or nothing ([`device_outcome`]).
    pub outcome: Option<bool>,
    pub payload: Bytes,
    /// `None` for a refusal.
    pub exit: Option<Exit>,
    pub fuel_used: u64,
    pub elapsed: Duration,
}

/// What happened. `M` is a compiled module (the sandbox's; any clonable value in tests).
#[derive(Debug)]
pub(crate) enum Input<M> {
    /// Connected to the broker (again).
    Connected,
    /// The connection dropped; these outbox entries were not acknowledged.
    Lost { resend: Vec<u64>, error: String },
    /// The broker acknowledged this outbox entry.
    Delivered(u64),
    /// The client could not queue this outbox entry's publish; it goes again on the next retry.
    Unqueued(u64),
    /// A frame on the node's tasks topic, read at `now`.
    Tasks(Bytes),
    /// A frame on a module topic.
    Module { hash: Digest, payload: Bytes },
    /// The job's module is not compiled in memory (answer to [`Action::Start`]).
    NotCached(Job),
    /// A module lookup on disk ended: found, absent, or present but unusable.
    Loaded {
        hash: Digest,
        result: Result<Option<M>, ExecError>,
    },
    /// Fetched bytes were verified and compiled, or not.
    Prepared {
        hash: Digest,
        result: Result<M, ExecError>,
    },
    /// A report was built and signed.
    Finished(Finished),
    /// The telemetry interval.
    Tick,
    /// A reading of the host (answer to [`Action::Sample`]).
    Reading(Reading),
    /// The retry interval: publish what is not queued, store what waited too long.
    Retry,
    /// Stop taking tasks and shut down.
    Shutdown,
    /// [`Node::next_deadline`] passed.
    Timer,
    /// The connection ended after [`Action::Disconnect`], or could not be asked to.
    Closed,
}

/// What to do.
#[derive(Debug)]
pub(crate) enum Action<M> {
    /// Publish under the node's prefix. A report carries its outbox sequence number; if the
    /// client cannot queue it, answer [`Input::Unqueued`].
    Publish {
        leaf: Leaf,
        qos: QoS,
        retain: bool,
        payload: Bytes,
        report: Option<u64>,
    },
    Subscribe(Digest),
    Unsubscribe(Digest),
    /// Subscribe to the node's tasks topic.
    SubscribeTasks,
    /// Run the job if its module is compiled in memory, else answer [`Input::NotCached`].
    Start(Job),
    /// Look the module up on disk: answer [`Input::Loaded`].
    Load(Digest),
    /// Verify (size, hash) and compile fetched bytes: answer [`Input::Prepared`].
    Prepare {
        hash: Digest,
        payload: Bytes,
    },
    /// Run the job and sign its receipt: answer [`Input::Finished`].
    Execute {
        job: Job,
        module: M,
    },
    /// Report the job as rejected (its module does not compile): answer [`Input::Finished`].
    Reject {
        job: Job,
        error: Arc<ExecError>,
    },
    /// Sign a refusal: answer [`Input::Finished`].
    Refuse {
        key: TaskKey,
        refusal: Refusal,
        admitted: bool,
    },
    /// Read the host: answer [`Input::Reading`].
    Sample {
        running: u16,
    },
    /// The telemetry just published, for the metrics.
    Sampled(TelemetrySample),
    /// Write or delete a report on disk.
    Outbox(Op),
    /// Store the coordinator key just pinned in `file`.
    PinKey {
        key: [u8; 32],
        file: PathBuf,
    },
    /// Disconnect from the broker: answer [`Input::Closed`] when the connection ends.
    Disconnect,
    /// Shutdown is over: stop the connection and close the outbox.
    Finish,
}

/// A module being looked up or fetched, and the jobs waiting for it.
#[derive(Debug)]
struct Fetch {
    state: FetchState,
    waiters: Vec<Job>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FetchState {
    /// Looking in memory and on disk.
    Loading,
    /// Subscribed to the module topic until the deadline.
    Fetching { deadline: Instant },
    /// The bytes arrived and are being verified and compiled.
    Verifying,
}

/// A report the broker has not acknowledged yet.
#[derive(Debug)]
struct Pending {
    payload: Bytes,
    /// Handed to the client; cleared when it could not be or the connection dropped first.
    queued: bool,
    /// On disk, or asked of the writer.
    stored: bool,
    made: Instant,
}

/// Where shutdown stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    /// Waiting for running tasks.
    Draining {
        until: Instant,
    },
    /// Waiting for the outbox to empty.
    Flushing {
        until: Instant,
    },
    /// Waiting for the disconnect to go out.
    Closing {
        until: Instant,
    },
    Finished,
}

/// The agent's state and decisions. See the module docs.
pub(crate) struct Node<M> {
    settings: Settings,
    node: NodeId,
    identity: Arc<Identity>,
    /// The signed announce frame, published (retained) on every connect; empty if unsigned.
    announce: Bytes,
    start: Instant,
    phase: Phase,
    connected: bool,
    breaker: Breaker,
    /// The half-open breaker's single probe, while it runs.
    probe: Option<TaskKey>,
    dedup: Dedup,
    slots_used: usize,
    coordinator_key: Option<[u8; 32]>,
    fetches: HashMap<Digest, Fetch>,
    outbox: BTreeMap<u64, Pending>,
    next_seq: u64,
    link: LinkProbe,
    /// A sample is being taken.
    sampling: bool,
    telemetry_seq: u64,
    boot_id: u64,
    ticks: u64,
    dropped_frames: u64,
    duplicates: u64,
    _module: std::marker::PhantomData<fn() -> M>,
}

/// What a node starts from.
pub(crate) struct Start {
    pub identity: Arc<Identity>,
    pub announce: Bytes,
    /// Reports left on disk by an earlier run, oldest first.
    pub stored: Stored,
    /// The pinned coordinator key, if any.
    pub coordinator_key: Option<[u8; 32]>,
    /// Random per start: the telemetry's boot id and the first ping nonce.
    pub boot_id: u64,
    pub first_nonce: u64,
}

impl<M: Clone> Node<M> {
    pub fn new(settings: Settings, start: Start, now: Instant) -> Self {
        let next_seq = start
            .stored
            .iter()
            .map(|(seq, _)| seq + 1)
            .max()
            .unwrap_or(0);
        let outbox = start
            .stored
            .into_iter()
            .map(|(seq, payload)| {
                let pending = Pending {
                    payload: payload.into(),
                    queued: false,
                    stored: true,
                    made: now,
                };
                (seq, pending)
            })
            .collect();
        Self {
            node: start.identity.node_id(),
            identity: start.identity,
            announce: start.announce,
            start: now,
            phase: Phase::Running,
            connected: false,
            breaker: Breaker::new(settings.safety),
            probe: None,
            dedup: Dedup::new(settings.dedup_capacity, REPORT_MEMORY),
            slots_used: 0,
            coordinator_key: start.coordinator_key,
            fetches: HashMap::new(),
            outbox,
            next_seq,
            link: LinkProbe::new(start.first_nonce),
            sampling: false,
            telemetry_seq: 0,
            boot_id: start.boot_id,
            ticks: 0,
            dropped_frames: 0,
            duplicates: 0,
            settings,
            _module: std::marker::PhantomData,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Reports the broker has not acknowledged.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// When [`Input::Timer`] is next due: a module fetch's or a shutdown phase's deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        let fetch = self
            .fetches
            .values()
            .filter_map(|f| match f.state {
                FetchState::Fetching { deadline } => Some(deadline),
                _ => None,
            })
            .min();
        let phase = match self.phase {
            Phase::Running | Phase::Finished => None,
            Phase::Draining { until } | Phase::Flushing { until } | Phase::Closing { until } => {
                Some(until)
            }
        };
        fetch.into_iter().chain(phase).min()
    }

    /// Applies `input` at `now`; appends what to do to `out`.
    pub fn handle(&mut self, now: Instant, input: Input<M>, out: &mut Vec<Action<M>>) {
        if self.phase == Phase::Finished {
            return;
        }
        match input {
            Input::Connected => self.on_connected(out),
            Input::Lost { resend, error } => self.on_lost(now, resend, &error, out),
            Input::Delivered(seq) => {
                if let Some(p) = self.outbox.remove(&seq)
                    && p.stored
                {
                    out.push(Action::Outbox(Op::Remove(seq)));
                }
            }
            Input::Unqueued(seq) => {
                if let Some(p) = self.outbox.get_mut(&seq) {
                    p.queued = false;
                }
            }
            Input::Tasks(payload) => self.on_task_frame(now, payload, out),
            Input::Module { hash, payload } => self.on_module(hash, payload, out),
            Input::NotCached(job) => self.wait_for_module(job, out),
            Input::Loaded { hash, result } => match result {
                Ok(Some(module)) => self.on_module_ready(hash, Ok(module), out),
                Ok(None) => self.fetch_from_broker(now, hash, out),
                Err(e) => self.on_module_ready(hash, Err(e), out),
            },
            Input::Prepared { hash, result } => self.on_module_ready(hash, result, out),
            Input::Finished(f) => self.on_finished(now, f, out),
            Input::Tick => {
                if self.phase == Phase::Running {
                    self.sample(out);
                }
            }
            Input::Reading(reading) => self.on_reading(now, reading, out),
            Input::Retry => {
                self.send_reports(out);
                self.store_reports(now, false, out);
            }
            Input::Shutdown => self.begin_shutdown(now, out),
            Input::Timer => self.expire_fetches(now, out),
            Input::Closed => {
                if matches!(self.phase, Phase::Closing { .. }) {
                    self.finish(now, out);
                }
            }
        }
        self.advance(now, out);
    }

    fn now_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_millis() as u64
    }

    fn micros(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_micros() as u64
    }

    // --- shutdown ---------------------------------------------------------------------------

    fn begin_shutdown(&mut self, now: Instant, out: &mut Vec<Action<M>>) {
        if self.phase != Phase::Running {
            return;
        }
        tracing::info!(running = self.slots_used, "shutting down: no new tasks");
        self.phase = Phase::Draining {
            until: now + self.settings.shutdown_grace,
        };
        let mut fetches: Vec<(Digest, Fetch)> = self.fetches.drain().collect();
        fetches.sort_by_key(|(hash, _)| *hash);
        for (hash, fetch) in fetches {
            if matches!(fetch.state, FetchState::Fetching { .. }) {
                out.push(Action::Unsubscribe(hash));
            }
            for job in fetch.waiters {
                refuse(job.key(), Refusal::ShuttingDown, true, out);
            }
        }
    }

    /// Moves the shutdown along when its condition holds or its deadline passed.
    fn advance(&mut self, now: Instant, out: &mut Vec<Action<M>>) {
        match self.phase {
            Phase::Draining { until } if self.slots_used == 0 || now >= until => {
                if self.slots_used > 0 {
                    tracing::warn!(
                        running = self.slots_used,
                        "grace period over; abandoning running tasks"
                    );
                }
                if self.connected {
                    out.push(status(b"offline"));
                }
                self.send_reports(out);
                let wait =
                    FLUSH_WAIT.min(self.settings.shutdown_grace.max(Duration::from_millis(500)));
                self.phase = Phase::Flushing { until: now + wait };
                self.advance(now, out);
            }
            Phase::Flushing { until }
                if self.outbox.is_empty() || !self.connected || now >= until =>
            {
                if !self.outbox.is_empty() {
                    tracing::warn!(
                        reports = self.outbox.len(),
                        "reports stay in the outbox until the next start"
                    );
                }
                if self.connected {
                    self.phase = Phase::Closing {
                        until: now + DISCONNECT_WAIT,
                    };
                    out.push(Action::Disconnect);
                } else {
                    self.finish(now, out);
                }
            }
            Phase::Closing { until } if now >= until => self.finish(now, out),
            _ => {}
        }
    }

    /// Leaves every unacknowledged report on disk and ends.
    fn finish(&mut self, now: Instant, out: &mut Vec<Action<M>>) {
        self.store_reports(now, true, out);
        self.phase = Phase::Finished;
        out.push(Action::Finish);
    }

    // --- connection -------------------------------------------------------------------------

    fn on_connected(&mut self, out: &mut Vec<Action<M>>) {
        self.connected = true;
        out.push(Action::SubscribeTasks);
        let mut fetching: Vec<Digest> = self
            .fetches
            .iter()
            .filter(|(_, f)| matches!(f.state, FetchState::Fetching { .. }))
            .map(|(hash, _)| *hash)
            .collect();
        fetching.sort();
        out.extend(fetching.into_iter().map(Action::Subscribe));
        let running = self.phase == Phase::Running;
        out.push(status(if running { b"online" } else { b"offline" }));
        if !self.announce.is_empty() {
            out.push(Action::Publish {
                leaf: Leaf::Announce,
                qos: QoS::AtLeastOnce,
                retain: true,
                payload: self.announce.clone(),
                report: None,
            });
        }
        self.send_reports(out);
        // A node gets work only once the coordinator has its signed telemetry: send a sample
        // now rather than at the next interval.
        if running {
            self.sample(out);
        }
    }

    fn on_lost(&mut self, now: Instant, resend: Vec<u64>, error: &str, out: &mut Vec<Action<M>>) {
        if self.connected {
            tracing::info!(%error, unacknowledged = resend.len(), "lost the broker; reconnecting");
        }
        self.connected = false;
        for seq in resend {
            if let Some(p) = self.outbox.get_mut(&seq) {
                p.queued = false;
            }
        }
        self.store_reports(now, true, out);
    }

    /// Writes to disk the reports that must outlive the process: all of them with `all`
    /// (offline, stopping), else those the broker has not taken within [`outbox::WRITE_AFTER`].
    fn store_reports(&mut self, now: Instant, all: bool, out: &mut Vec<Action<M>>) {
        for (seq, pending) in self.outbox.iter_mut().filter(|(_, p)| {
            !p.stored && (all || now.saturating_duration_since(p.made) >= outbox::WRITE_AFTER)
        }) {
            out.push(Action::Outbox(Op::Write(*seq, pending.payload.clone())));
            pending.stored = true;
        }
    }

    /// Hands every report not yet queued to the client, oldest first.
    fn send_reports(&mut self, out: &mut Vec<Action<M>>) {
        if !self.connected {
            return;
        }
        for (seq, pending) in self.outbox.iter_mut().filter(|(_, p)| !p.queued) {
            out.push(Action::Publish {
                leaf: Leaf::Results,
                qos: QoS::AtLeastOnce,
                retain: false,
                payload: pending.payload.clone(),
                report: Some(*seq),
            });
            pending.queued = true;
        }
    }

    // --- assignments ------------------------------------------------------------------------

    fn drop_frame(&mut self, why: &str) {
        self.dropped_frames += 1;
        tracing::warn!(
            reason = why,
            dropped_frames = self.dropped_frames,
            "dropped a frame on the tasks topic"
        );
    }

    /// Accepts only what the coordinator signed: the assignment's or pong's signature must
    /// verify for this node (checked by the caller), under the pinned key. The first valid key
    /// seen is pinned (trust on first use, like SSH's `known_hosts`) unless the operator wrote
    /// one to the key file beforehand.
    fn check_coordinator(
        &mut self,
        what: &str,
        key: [u8; 32],
        out: &mut Vec<Action<M>>,
    ) -> Result<(), String> {
        match &self.coordinator_key {
            Some(pinned) if *pinned == key => Ok(()),
            Some(pinned) => Err(format!(
                "{what} signed by coordinator key {}, not the pinned {}; to trust a new coordinator, stop the agent and delete {}",
                hex::encode(key),
                hex::encode(pinned),
                self.settings.key_file.display()
            )),
            None => {
                self.coordinator_key = Some(key);
                let file = self.settings.key_file.clone();
                out.push(Action::PinKey { key, file });
                Ok(())
            }
        }
    }

    fn on_task_frame(&mut self, now: Instant, payload: Bytes, out: &mut Vec<Action<M>>) {
        let envelope = match Envelope::decode(&payload) {
            Ok(e) => e,
            Err(e) => return self.drop_frame(&e.to_string()),
        };
        match envelope.message {
            Message::Assign(a) => {
                let input_hash = sha3_256(a.input);
                let checked = a
                    .verify(&self.node, &input_hash)
                    .map_err(|e| format!("assignment signature: {e}"))
                    .and_then(|()| self.check_coordinator("assignment", a.coordinator, out));
                if let Err(why) = checked {
                    return self.drop_frame(&why);
                }
                let job = Job {
                    task_id: a.task_id,
                    attempt: a.attempt,
                    module: a.module,
                    abi: a.abi,
                    entry: a.entry.as_str().to_owned(),
                    limits: a.limits,
                    input: payload.slice_ref(a.input),
                    input_hash,
                };
                self.on_assign(now, job, out);
            }
            Message::Pong(p) => {
                let checked = p
                    .verify(&self.node)
                    .map_err(|e| format!("pong signature: {e}"))
                    .and_then(|()| self.check_coordinator("pong", p.coordinator, out));
                if let Err(why) = checked {
                    return self.drop_frame(&why);
                }
                self.link.pong(p.nonce, self.micros(now));
            }
            _ => self.drop_frame("not an assignment or a pong"),
        }
    }

    fn on_assign(&mut self, now: Instant, job: Job, out: &mut Vec<Action<M>>) {
        let key = job.key();
        if let Some(seen) = self.dedup.get(&key).cloned() {
            return self.on_duplicate(&key, seen, out);
        }
        self.dedup.start(key.clone());
        if self.phase != Phase::Running {
            return refuse(key, Refusal::ShuttingDown, false, out);
        }
        // Checked before the breaker, so a refused task never takes the half-open probe slot.
        if self.slots_used >= usize::from(self.settings.max_concurrency) {
            return refuse(key, Refusal::Busy, false, out);
        }
        match self.breaker.admit(self.now_ms(now)) {
            Admission::Admit => {}
            Admission::Probe => self.probe = Some(key),
            Admission::Refuse(reason) => return refuse(key, Refusal::Breaker(reason), false, out),
        }
        self.slots_used += 1;
        tracing::debug!(task = %job.task_id, attempt = job.attempt, module = %job.module, "task admitted");
        out.push(Action::Start(job));
    }

    fn on_duplicate(&mut self, key: &TaskKey, seen: Seen, out: &mut Vec<Action<M>>) {
        match seen {
            Seen::Done { seq, .. } if self.outbox.contains_key(&seq) => {
                tracing::debug!(task = %key.0, attempt = key.1, "duplicate assignment; its report is on its way");
            }
            Seen::Done {
                report: Some(report),
                ..
            } => {
                tracing::info!(task = %key.0, attempt = key.1, "duplicate assignment; resending its report");
                out.push(Action::Publish {
                    leaf: Leaf::Results,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    payload: report,
                    report: None,
                });
            }
            _ => {
                self.duplicates += 1;
                tracing::info!(task = %key.0, attempt = key.1, duplicates = self.duplicates, "dropped a duplicate assignment");
            }
        }
    }

    // --- modules ----------------------------------------------------------------------------

    fn wait_for_module(&mut self, job: Job, out: &mut Vec<Action<M>>) {
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

    fn fetch_from_broker(&mut self, now: Instant, hash: Digest, out: &mut Vec<Action<M>>) {
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

    fn on_module(&mut self, hash: Digest, payload: Bytes, out: &mut Vec<Action<M>>) {
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

    fn expire_fetches(&mut self, now: Instant, out: &mut Vec<Action<M>>) {
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

    fn on_module_ready(
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
            Err(ExecError::HashMismatch { actual, .. }) => {
                tracing::warn!(module = %hash, got = %actual, "module bytes do not match their hash");
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

    // --- reports ----------------------------------------------------------------------------

    fn on_finished(&mut self, now: Instant, f: Finished, out: &mut Vec<Action<M>>) {
        if f.admitted {
            self.slots_used = self.slots_used.saturating_sub(1);
        }
        let probe = self.probe.as_ref() == Some(&f.key);
        if probe {
            self.probe = None;
        }
        match f.outcome {
            Some(succeeded) => {
                if let Some(t) = self.breaker.record(self.now_ms(now), succeeded) {
                    log_transition(t);
                }
            }
            // A probe that said nothing (stopped by the wall clock) must not hold the slot,
            // or the breaker would refuse everything from now on.
            None if probe => self.breaker.release_probe(),
            None => {}
        }
        match f.exit {
            Some(exit) => tracing::info!(
                task = %f.key.0,
                attempt = f.key.1,
                exit = exit.as_str(),
                fuel = f.fuel_used,
                ms = f.elapsed.as_millis() as u64,
                "task finished"
            ),
            None => tracing::debug!(task = %f.key.0, attempt = f.key.1, "refusal stored"),
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.dedup.finish(f.key, seq, f.payload.clone());
        let pending = Pending {
            payload: f.payload,
            queued: false,
            stored: false,
            made: now,
        };
        self.outbox.insert(seq, pending);
        if self.connected {
            self.send_reports(out);
        } else {
            self.store_reports(now, true, out);
        }
    }

    // --- telemetry --------------------------------------------------------------------------

    fn sample(&mut self, out: &mut Vec<Action<M>>) {
        if self.sampling {
            return;
        }
        self.sampling = true;
        let running = self.slots_used.min(usize::from(u16::MAX)) as u16;
        out.push(Action::Sample { running });
    }

    fn on_reading(&mut self, now: Instant, reading: Reading, out: &mut Vec<Action<M>>) {
        self.sampling = false;
        let (extra_latency, link_kbps) = self.settings.link_offset.unwrap_or((0, u32::MAX));
        let mut sample = TelemetrySample {
            bandwidth_kbps: self.link.bandwidth_kbps().map(|b| b.min(link_kbps)),
            latency_us: self
                .link
                .latency_us()
                .map(|l| l.saturating_add(extra_latency)),
            cpu_load_permille: reading.cpu_load_permille,
            mem_free_bytes: reading.mem_free_bytes,
            temp_millic: reading.temp_millic,
            throttle: reading.throttle,
            tasks_running: self.slots_used.min(usize::from(u16::MAX)) as u16,
            simulated: self.settings.simulated,
            ..TelemetrySample::default()
        };
        #[cfg(feature = "fault-injection")]
        self.settings.faults.boast(&mut sample);
        if let Some(t) = self.breaker.observe(self.now_ms(now), &sample) {
            log_transition(t);
        }
        sample.errors = self.breaker.errors();
        sample.breaker = self.breaker.state();
        out.push(Action::Sampled(sample.clone()));
        tracing::debug!(
            ?sample,
            dropped_frames = self.dropped_frames,
            duplicates = self.duplicates,
            "telemetry"
        );
        if !self.connected {
            return;
        }
        let telemetry = Telemetry {
            node: self.node,
            seq: self.telemetry_seq,
            boot_id: self.boot_id,
            sample,
        };
        self.telemetry_seq += 1;
        match sign_message(&self.identity, SignedTelemetry::TAG, &telemetry) {
            Ok(signature) => {
                let frame = Envelope::new(Message::Telemetry(SignedTelemetry {
                    telemetry,
                    signature,
                }));
                out.push(telemetry_frame(frame.to_vec()));
            }
            Err(e) => tracing::error!(error = %e, "cannot sign telemetry"),
        }
        self.ticks += 1;
        let every = u64::from(self.settings.bandwidth_probe_every.max(1));
        // The first ping is small (latency first); then every `every` intervals a large one.
        let padding = if self.ticks % every == 2 % every {
            vec![0u8; LARGE_PADDING]
        } else {
            Vec::new()
        };
        let nonce = self.link.ping(self.micros(now), padding.len());
        let ping = Envelope::new(Message::Ping(Ping {
            node: self.node,
            nonce,
            padding: &padding,
        }));
        out.push(telemetry_frame(ping.to_vec()));
    }
}

fn refuse<M>(key: TaskKey, refusal: Refusal, admitted: bool, out: &mut Vec<Action<M>>) {
    tracing::info!(task = %key.0, attempt = key.1, ?refusal, "task refused");
    out.push(Action::Refuse {
        key,
        refusal,
        admitted,
    });
}

fn status<M>(text: &'static [u8]) -> Action<M> {
    Action::Publish {
        leaf: Leaf::Status,
        qos: QoS::AtLeastOnce,
        retain: true,
        payload: Bytes::from_static(text),
        report: None,
    }
}

fn telemetry_frame<M>(frame: Vec<u8>) -> Action<M> {
    Action::Publish {
        leaf: Leaf::Telemetry,
        qos: QoS::AtMostOnce,
        retain: false,
        payload: frame.into(),
        report: None,
    }
}

fn log_transition(t: Transition) {
    match t.reason {
        Some(reason) => {
            tracing::warn!(from = ?t.from, to = ?t.to, %reason, "breaker opened: not taking tasks")
        }
        None => tracing::info!(from = ?t.from, to = ?t.to, "breaker changed state"),
    }
}

/// What a refusal says about this device's health: a module it could not get counts
/// against it (a node that cannot fetch modules should stop taking work); the others are
/// its state, not its health.
pub(crate) fn refusal_outcome(refusal: Refusal) -> Option<bool> {
    match refusal {
        Refusal::ModuleUnavailable => Some(false),
        _ => None,
    }
}

/// What a run says about this device's health, for its own breaker. A task that traps, runs
/// out of fuel or memory, exits with a status or is refused did what its program does, the
/// same on every node: counting it as a device error would let any client open healthy
/// nodes' breakers by submitting failing tasks. A run stopped by the wall clock says nothing
/// either way (a slow board, or a task that asked for more than its time allows).
pub(crate) fn device_outcome(exit: Exit) -> Option<bool> {
    match exit {
        Exit::TimedOut => None,
        _ => Some(true),
    }
}

#[cfg(test)]
mod tests {
    use ambient_core::{Assignment, Pong, TripReason};

    use super::*;

    /// A compiled module, as far as the node cares.
    type Module = &'static str;

    const SECOND: Duration = Duration::from_secs(1);
    const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
    const GRACE: Duration = Duration::from_secs(30);

    fn coordinator() -> Identity {
        Identity::from_secret(&[0xC0; 32])
    }

    fn settings(max_concurrency: u16) -> Settings {
        Settings {
            max_concurrency,
            dedup_capacity: 64,
            safety: SafetyPolicy::default(),
            module_fetch_timeout: FETCH_TIMEOUT,
            shutdown_grace: GRACE,
            bandwidth_probe_every: 3,
            link_offset: None,
            simulated: false,
            key_file: "/state/coordinator.pub".into(),
            #[cfg(feature = "fault-injection")]
            faults: crate::fault::Faults::default(),
        }
    }

    /// A node driven by hand: `at(t)` is `t` after its start.
    struct Harness {
        node: Node<Module>,
        id: NodeId,
        t0: Instant,
    }

    impl Harness {
        fn new(max_concurrency: u16, pinned: Option<[u8; 32]>, stored: Stored) -> Self {
            let identity = Arc::new(Identity::from_secret(&[7; 32]));
            let id = identity.node_id();
            let t0 = Instant::now();
            let start = Start {
                identity,
                announce: Bytes::from_static(b"announce"),
                stored,
                coordinator_key: pinned,
                boot_id: 1,
                first_nonce: 100,
            };
            let node = Node::new(settings(max_concurrency), start, t0);
            Self { node, id, t0 }
        }

        /// Pinned to [`coordinator`], connected, nothing stored.
        fn online(max_concurrency: u16) -> Self {
            let mut h = Self::new(max_concurrency, Some(coordinator().public_key()), vec![]);
            h.step(Duration::ZERO, Input::Connected);
            h
        }

        fn step(&mut self, at: Duration, input: Input<Module>) -> Vec<Action<Module>> {
            let mut out = Vec::new();
            self.node.handle(self.t0 + at, input, &mut out);
            out
        }

        /// [`Harness::step`], each action in a line of [`describe`].
        fn said(&mut self, at: Duration, input: Input<Module>) -> Vec<String> {
            self.step(at, input).iter().map(describe).collect()
        }

        fn assign(&self, task: &str, attempt: u16, module: u8) -> Input<Module> {
            Input::Tasks(assignment(&self.id, task, attempt, module, &coordinator()))
        }
    }

    fn assignment(node: &NodeId, task: &str, attempt: u16, module: u8, by: &Identity) -> Bytes {
        let input = b"input";
        let mut a = Assignment {
            task_id: TaskId::new(task).unwrap(),
            attempt,
            module: Digest([module; 32]),
            abi: Abi::Plain,
            entry: "run".try_into().unwrap(),
            limits: Limits::default(),
            input,
            coordinator: [0; 32],
            signature: [0; 64],
        };
        a.sign(by, node, &sha3_256(input));
        Envelope::new(Message::Assign(a)).to_vec().into()
    }

    fn finished(task: &str, attempt: u16, admitted: bool) -> Input<Module> {
        Input::Finished(Finished {
            key: (TaskId::new(task).unwrap(), attempt),
            admitted,
            outcome: Some(true),
            payload: Bytes::from(format!("report of {task}/{attempt}")),
            exit: Some(Exit::Ok),
            fuel_used: 1,
            elapsed: Duration::ZERO,
        })
    }

    fn module(n: u8) -> Digest {
        Digest([n; 32])
    }

    /// One line per action, enough to tell them apart in an assertion.
    fn describe(action: &Action<Module>) -> String {
        let key = |k: &TaskKey| format!("{}/{}", k.0, k.1);
        let m = |h: &Digest| h.0[0];
        match action {
            Action::Publish {
                leaf,
                payload,
                report,
                ..
            } => match (leaf, report) {
                (Leaf::Results, Some(seq)) => format!("publish report #{seq}"),
                (Leaf::Results, None) => {
                    format!("resend {}", String::from_utf8_lossy(payload))
                }
                (Leaf::Status, _) => format!("status {}", String::from_utf8_lossy(payload)),
                (Leaf::Telemetry, _) => match Envelope::decode(payload).unwrap().message {
                    Message::Telemetry(_) => "telemetry".into(),
                    Message::Ping(p) if p.padding.is_empty() => format!("ping {}", p.nonce),
                    Message::Ping(p) => format!("large ping {}", p.nonce),
                    other => panic!("{other:?} on telemetry"),
                },
                (leaf, _) => format!("publish {leaf:?}"),
            },
            Action::SubscribeTasks => "subscribe tasks".into(),
            Action::Subscribe(h) => format!("subscribe module {}", m(h)),
            Action::Unsubscribe(h) => format!("unsubscribe module {}", m(h)),
            Action::Start(job) => format!("start {}", key(&job.key())),
            Action::Load(h) => format!("load module {}", m(h)),
            Action::Prepare { hash, .. } => format!("compile module {}", m(hash)),
            Action::Execute { job, module } => format!("execute {} on {module}", key(&job.key())),
            Action::Reject { job, .. } => format!("reject {}", key(&job.key())),
            Action::Refuse {
                key: k,
                refusal,
                admitted,
            } => format!("refuse {} {refusal:?} admitted={admitted}", key(k)),
            Action::Sample { running } => format!("sample running={running}"),
            Action::Sampled(s) => format!("sampled {:?}", s.breaker),
            Action::Outbox(Op::Write(seq, _)) => format!("write #{seq}"),
            Action::Outbox(Op::Remove(seq)) => format!("remove #{seq}"),
            Action::PinKey { .. } => "pin key".into(),
            Action::Disconnect => "disconnect".into(),
            Action::Finish => "finish".into(),
        }
    }

    fn reading(temp_c: i32) -> Input<Module> {
        Input::Reading(Reading {
            temp_millic: Some(temp_c * 1000),
            ..Reading::default()
        })
    }

    #[test]
    fn connecting_subscribes_says_online_announces_and_asks_for_a_sample() {
        let mut h = Harness::new(1, None, vec![]);
        assert_eq!(
            h.said(Duration::ZERO, Input::Connected),
            [
                "subscribe tasks",
                "status online",
                "publish Announce",
                "sample running=0"
            ]
        );
    }

    #[test]
    fn the_first_coordinator_to_sign_an_assignment_is_pinned_and_no_other_is_obeyed() {
        let mut h = Harness::new(4, None, vec![]);
        h.step(Duration::ZERO, Input::Connected);
        let first = h.assign("t1", 1, 1);
        assert_eq!(h.said(SECOND, first), ["pin key", "start t1/1"]);
        let stranger = Identity::from_secret(&[0xEE; 32]);
        let forged = Input::Tasks(assignment(&h.id, "t2", 1, 1, &stranger));
        assert!(h.said(SECOND, forged).is_empty());
        assert_eq!(h.node.dropped_frames, 1);
    }

    #[test]
    fn garbage_and_assignments_for_another_node_are_dropped_without_a_report() {
        let mut h = Harness::online(4);
        let other = Identity::from_secret(&[9; 32]).node_id();
        let misrouted = Input::Tasks(assignment(&other, "t1", 1, 1, &coordinator()));
        assert!(h.said(SECOND, misrouted).is_empty());
        let garbage = Input::Tasks(Bytes::from_static(b"\xff\x00not a frame"));
        assert!(h.said(SECOND, garbage).is_empty());
        assert_eq!(h.node.dropped_frames, 2);
    }

    #[test]
    fn an_assignment_beyond_the_slots_is_refused_as_busy_until_a_report_frees_one() {
        let mut h = Harness::online(1);
        let (a, b, c) = (
            h.assign("a", 1, 1),
            h.assign("b", 1, 1),
            h.assign("c", 1, 1),
        );
        assert_eq!(h.said(SECOND, a), ["start a/1"]);
        assert_eq!(h.said(SECOND, b), ["refuse b/1 Busy admitted=false"]);
        assert_eq!(
            h.said(SECOND, finished("a", 1, true)),
            ["publish report #0"]
        );
        assert_eq!(h.said(SECOND, c), ["start c/1"]);
    }

    #[test]
    fn a_duplicate_assignment_is_answered_from_the_filter_and_never_run_twice() {
        let mut h = Harness::online(4);
        let again = || h.assign("a", 1, 1);
        let (first, second, third) = (again(), again(), again());
        assert_eq!(h.said(SECOND, first), ["start a/1"]);
        // Still running: nothing to send, nothing to run.
        assert!(h.said(SECOND, second).is_empty());
        assert_eq!(
            h.said(SECOND, finished("a", 1, true)),
            ["publish report #0"]
        );
        assert!(h.said(SECOND, Input::Delivered(0)).is_empty());
        // Delivered, yet the coordinator asks again: it lost the report, so send it again.
        assert_eq!(h.said(SECOND, third), ["resend report of a/1"]);
        // A new attempt of the same task is new work.
        let retry = h.assign("a", 2, 1);
        assert_eq!(h.said(SECOND, retry), ["start a/2"]);
    }

    #[test]
    fn a_module_not_in_memory_is_loaded_then_fetched_and_refused_when_it_never_arrives() {
        let mut h = Harness::online(4);
        let (a, b) = (h.assign("a", 1, 5), h.assign("b", 1, 5));
        let job = |actions: Vec<Action<Module>>| match actions.into_iter().next() {
            Some(Action::Start(job)) => job,
            other => panic!("expected a start, got {other:?}"),
        };
        let (ja, jb) = (job(h.step(SECOND, a)), job(h.step(SECOND, b)));
        assert_eq!(h.said(SECOND, Input::NotCached(ja)), ["load module 5"]);
        // One lookup per module, however many jobs wait for it.
        assert!(h.said(SECOND, Input::NotCached(jb)).is_empty());
        let absent = Input::Loaded {
            hash: module(5),
            result: Ok(None),
        };
        assert_eq!(h.said(2 * SECOND, absent), ["subscribe module 5"]);
        assert_eq!(
            h.node.next_deadline(),
            Some(h.t0 + 2 * SECOND + FETCH_TIMEOUT)
        );
        assert!(
            h.said(2 * SECOND + FETCH_TIMEOUT / 2, Input::Timer)
                .is_empty()
        );
        assert_eq!(
            h.said(2 * SECOND + FETCH_TIMEOUT, Input::Timer),
            [
                "unsubscribe module 5",
                "refuse a/1 ModuleUnavailable admitted=true",
                "refuse b/1 ModuleUnavailable admitted=true"
            ]
        );
        assert_eq!(h.node.next_deadline(), None);
    }

    #[test]
    fn fetched_bytes_are_compiled_once_and_every_waiting_job_runs_on_them() {
        let mut h = Harness::online(4);
        for task in ["a", "b"] {
            let Some(Action::Start(job)) = h.step(SECOND, h.assign(task, 1, 5)).pop() else {
                panic!("not started");
            };
            h.step(SECOND, Input::NotCached(job));
        }
        let absent = Input::Loaded {
            hash: module(5),
            result: Ok(None),
        };
        h.step(SECOND, absent);
        let bytes = Input::Module {
            hash: module(5),
            payload: Bytes::from_static(b"\0asm"),
        };
        assert_eq!(
            h.said(SECOND, bytes),
            ["unsubscribe module 5", "compile module 5"]
        );
        // A second copy while compiling is ignored.
        let copy = Input::Module {
            hash: module(5),
            payload: Bytes::from_static(b"\0asm"),
        };
        assert!(h.said(SECOND, copy).is_empty());
        let compiled = Input::Prepared {
            hash: module(5),
            result: Ok("m5"),
        };
        assert_eq!(
            h.said(SECOND, compiled),
            ["execute a/1 on m5", "execute b/1 on m5"]
        );
    }

    #[test]
    fn a_module_that_does_not_match_its_hash_is_unavailable_and_one_that_does_not_compile_is_a_rejected_run()
     {
        let mut h = Harness::online(4);
        for (task, m) in [("a", 5), ("b", 6)] {
            let Some(Action::Start(job)) = h.step(SECOND, h.assign(task, 1, m)).pop() else {
                panic!("not started");
            };
            h.step(SECOND, Input::NotCached(job));
        }
        let mismatch = Input::Prepared {
            hash: module(5),
            result: Err(ExecError::HashMismatch {
                expected: module(5),
                actual: module(9),
            }),
        };
        assert_eq!(
            h.said(SECOND, mismatch),
            ["refuse a/1 ModuleUnavailable admitted=true"]
        );
        let invalid = Input::Loaded {
            hash: module(6),
            result: Err(ExecError::Invalid("no export".into())),
        };
        assert_eq!(h.said(SECOND, invalid), ["reject b/1"]);
    }

    #[test]
    fn a_report_made_offline_is_written_to_disk_then_published_and_deleted_once_delivered() {
        let mut h = Harness::new(4, Some(coordinator().public_key()), vec![]);
        h.step(Duration::ZERO, Input::Connected);
        let a = h.assign("a", 1, 1);
        h.step(SECOND, a);
        let lost = Input::Lost {
            resend: vec![],
            error: "gone".into(),
        };
        assert!(h.said(SECOND, lost).is_empty());
        assert_eq!(h.said(SECOND, finished("a", 1, true)), ["write #0"]);
        assert!(h.said(2 * SECOND, Input::Retry).is_empty());
        let back = h.said(3 * SECOND, Input::Connected);
        assert!(back.contains(&"publish report #0".to_string()), "{back:?}");
        assert_eq!(h.said(3 * SECOND, Input::Delivered(0)), ["remove #0"]);
        assert_eq!(h.node.outbox_len(), 0);
    }

    #[test]
    fn a_report_the_broker_has_not_taken_within_write_after_is_stored_and_one_it_took_never_is() {
        let mut h = Harness::online(4);
        for task in ["a", "b"] {
            let assign = h.assign(task, 1, 1);
            h.step(SECOND, assign);
            h.step(SECOND, finished(task, 1, true));
        }
        assert!(h.said(SECOND, Input::Delivered(1)).is_empty());
        let early = SECOND + outbox::WRITE_AFTER / 2;
        assert!(h.said(early, Input::Retry).is_empty());
        assert_eq!(
            h.said(SECOND + outbox::WRITE_AFTER, Input::Retry),
            ["write #0"]
        );
    }

    #[test]
    fn a_report_the_client_could_not_queue_or_lost_with_the_connection_goes_again() {
        let mut h = Harness::online(4);
        let a = h.assign("a", 1, 1);
        h.step(SECOND, a);
        assert_eq!(
            h.said(SECOND, finished("a", 1, true)),
            ["publish report #0"]
        );
        assert!(h.said(SECOND, Input::Unqueued(0)).is_empty());
        assert_eq!(h.said(SECOND, Input::Retry), ["publish report #0"]);
        let lost = Input::Lost {
            resend: vec![0],
            error: "reset".into(),
        };
        assert_eq!(h.said(SECOND, lost), ["write #0"]);
        let back = h.said(2 * SECOND, Input::Connected);
        assert!(back.contains(&"publish report #0".to_string()), "{back:?}");
    }

    #[test]
    fn reports_left_on_disk_by_an_earlier_run_go_first_and_new_ones_number_after_them() {
        let stored = vec![(7, b"old".to_vec())];
        let mut h = Harness::new(4, Some(coordinator().public_key()), stored);
        let connected = h.said(Duration::ZERO, Input::Connected);
        assert!(connected.contains(&"publish report #7".to_string()));
        let a = h.assign("a", 1, 1);
        h.step(SECOND, a);
        assert_eq!(
            h.said(SECOND, finished("a", 1, true)),
            ["publish report #8"]
        );
        // Already on disk: delivered means deleted.
        assert_eq!(h.said(SECOND, Input::Delivered(7)), ["remove #7"]);
    }

    #[test]
    fn shutdown_refuses_new_work_waits_for_running_tasks_then_says_offline_flushes_and_disconnects()
    {
        let mut h = Harness::online(4);
        h.step(SECOND, reading(50));
        let (a, b) = (h.assign("a", 1, 1), h.assign("b", 1, 1));
        h.step(SECOND, a);
        assert!(h.said(SECOND, Input::Shutdown).is_empty());
        assert_eq!(
            h.node.phase(),
            Phase::Draining {
                until: h.t0 + SECOND + GRACE
            }
        );
        assert_eq!(
            h.said(SECOND, b),
            ["refuse b/1 ShuttingDown admitted=false"]
        );
        assert!(
            h.said(SECOND, Input::Tick).is_empty(),
            "no telemetry while stopping"
        );
        // The refusal's report keeps the outbox busy, so flushing waits for the broker.
        assert_eq!(
            h.said(SECOND, finished("b", 1, false)),
            ["publish report #0"]
        );
        assert_eq!(
            h.said(2 * SECOND, finished("a", 1, true)),
            ["publish report #1", "status offline"]
        );
        assert!(matches!(h.node.phase(), Phase::Flushing { .. }));
        assert!(h.said(2 * SECOND, Input::Delivered(0)).is_empty());
        assert_eq!(h.said(2 * SECOND, Input::Delivered(1)), ["disconnect"]);
        assert_eq!(h.said(2 * SECOND, Input::Closed), ["finish"]);
        assert_eq!(h.node.phase(), Phase::Finished);
        assert!(
            h.said(3 * SECOND, Input::Connected).is_empty(),
            "finished is final"
        );
    }

    #[test]
    fn shutdown_abandons_tasks_after_the_grace_and_leaves_undelivered_reports_on_disk() {
        let mut h = Harness::online(4);
        let (a, b) = (h.assign("a", 1, 1), h.assign("b", 1, 1));
        h.step(SECOND, a);
        h.step(SECOND, b);
        h.step(SECOND, finished("b", 1, true));
        h.step(SECOND, Input::Shutdown);
        assert!(h.said(SECOND + GRACE / 2, Input::Timer).is_empty());
        assert_eq!(h.said(SECOND + GRACE, Input::Timer), ["status offline"]);
        let Some(Phase::Flushing { until }) = Some(h.node.phase()) else {
            panic!("{:?}", h.node.phase());
        };
        assert_eq!(h.node.next_deadline(), Some(until));
        assert_eq!(h.said(until - h.t0, Input::Timer), ["disconnect"]);
        // The disconnect never completes: after its wait, leave.
        let closing = h.node.next_deadline().unwrap() - h.t0;
        assert_eq!(h.said(closing, Input::Timer), ["write #0", "finish"]);
    }

    #[test]
    fn an_idle_node_says_offline_and_disconnects_as_soon_as_it_is_asked_to_stop() {
        let mut h = Harness::online(4);
        assert_eq!(
            h.said(SECOND, Input::Shutdown),
            ["status offline", "disconnect"]
        );
        assert_eq!(h.said(SECOND, Input::Closed), ["finish"]);
    }

    #[test]
    fn a_connection_that_ends_before_the_outbox_empties_leaves_the_reports_on_disk() {
        let mut h = Harness::online(4);
        let a = h.assign("a", 1, 1);
        h.step(SECOND, a);
        h.step(SECOND, finished("a", 1, true));
        assert_eq!(h.said(SECOND, Input::Shutdown), ["status offline"]);
        let flush = h.node.next_deadline().unwrap() - h.t0;
        assert_eq!(h.said(flush, Input::Timer), ["disconnect"]);
        assert_eq!(h.said(flush, Input::Closed), ["write #0", "finish"]);
    }

    #[test]
    fn losing_the_broker_while_flushing_ends_with_the_reports_on_disk() {
        let mut h = Harness::online(4);
        let a = h.assign("a", 1, 1);
        h.step(SECOND, a);
        h.step(SECOND, finished("a", 1, true));
        h.step(SECOND, Input::Shutdown);
        let lost = Input::Lost {
            resend: vec![0],
            error: "gone".into(),
        };
        assert_eq!(h.said(SECOND, lost), ["write #0", "finish"]);
    }

    #[test]
    fn a_fetch_started_offline_subscribes_to_its_module_when_the_broker_returns() {
        let mut h = Harness::online(4);
        let Some(Action::Start(job)) = h.step(SECOND, h.assign("a", 1, 5)).pop() else {
            panic!("not started");
        };
        let lost = Input::Lost {
            resend: vec![],
            error: "gone".into(),
        };
        h.step(SECOND, lost);
        h.step(SECOND, Input::NotCached(job));
        let absent = Input::Loaded {
            hash: module(5),
            result: Ok(None),
        };
        assert!(
            h.said(SECOND, absent).is_empty(),
            "offline: nothing to subscribe yet"
        );
        let back = h.said(2 * SECOND, Input::Connected);
        assert!(back.contains(&"subscribe module 5".to_string()), "{back:?}");
    }

    #[test]
    fn a_module_found_on_disk_runs_at_once() {
        let mut h = Harness::online(4);
        let Some(Action::Start(job)) = h.step(SECOND, h.assign("a", 1, 5)).pop() else {
            panic!("not started");
        };
        h.step(SECOND, Input::NotCached(job));
        let found = Input::Loaded {
            hash: module(5),
            result: Ok(Some("m5")),
        };
        assert_eq!(h.said(SECOND, found), ["execute a/1 on m5"]);
    }

    #[test]
    fn modules_the_node_cannot_get_count_against_its_breaker_until_it_opens() {
        let mut h = Harness::online(64);
        let max = SafetyPolicy::default().max_errors;
        for i in 0..=max {
            let task = format!("t{i}");
            let a = h.assign(&task, 1, 1);
            h.step(SECOND, a);
            let Input::Finished(mut f) = finished(&task, 1, true) else {
                unreachable!()
            };
            f.outcome = refusal_outcome(Refusal::ModuleUnavailable);
            h.step(SECOND, Input::Finished(f));
        }
        let next = h.assign("next", 1, 1);
        let refused = h.step(SECOND, next);
        assert!(
            matches!(
                refused.as_slice(),
                [Action::Refuse {
                    refusal: Refusal::Breaker(TripReason::TooManyErrors { .. }),
                    ..
                }]
            ),
            "{refused:?}"
        );
    }

    #[test]
    fn a_probe_stopped_by_the_wall_clock_frees_the_probe_slot_for_the_next_task() {
        let mut h = Harness::online(4);
        let cooldown = Duration::from_millis(SafetyPolicy::default().cooldown_ms);
        h.step(SECOND, reading(95));
        h.step(SECOND, Input::Tick);
        h.step(2 * SECOND, reading(50));
        let after = 2 * SECOND + cooldown;
        let probe = h.assign("probe", 1, 1);
        assert_eq!(h.said(after, probe), ["start probe/1"]);
        let Input::Finished(mut timed_out) = finished("probe", 1, true) else {
            unreachable!()
        };
        timed_out.outcome = device_outcome(Exit::TimedOut);
        h.step(after, Input::Finished(timed_out));
        let next = h.assign("next", 1, 1);
        assert_eq!(h.said(after, next), ["start next/1"], "probes again");
    }

    #[test]
    fn a_shutdown_refuses_the_jobs_waiting_for_a_module() {
        let mut h = Harness::online(4);
        let Some(Action::Start(job)) = h.step(SECOND, h.assign("a", 1, 5)).pop() else {
            panic!("not started");
        };
        h.step(SECOND, Input::NotCached(job));
        h.step(
            SECOND,
            Input::Loaded {
                hash: module(5),
                result: Ok(None),
            },
        );
        assert_eq!(
            h.said(SECOND, Input::Shutdown),
            [
                "unsubscribe module 5",
                "refuse a/1 ShuttingDown admitted=true"
            ]
        );
    }

    #[test]
    fn an_overheated_reading_opens_the_breaker_and_work_is_refused_with_the_reason() {
        let mut h = Harness::online(4);
        let said = h.said(SECOND, reading(95));
        assert_eq!(said[0], "sampled Open");
        let a = h.assign("a", 1, 1);
        let refused = h.step(SECOND, a);
        assert!(
            matches!(
                refused.as_slice(),
                [Action::Refuse {
                    refusal: Refusal::Breaker(TripReason::Overheated { .. }),
                    admitted: false,
                    ..
                }]
            ),
            "{refused:?}"
        );
    }

    #[test]
    fn telemetry_is_followed_by_a_ping_and_every_third_one_by_a_large_ping() {
        let mut h = Harness::online(4);
        let mut pings = Vec::new();
        for i in 0..4u32 {
            let at = SECOND * (i + 1);
            if i > 0 {
                assert_eq!(h.said(at, Input::Tick), ["sample running=0"]);
                assert!(h.said(at, Input::Tick).is_empty(), "one sample at a time");
            }
            let said = h.said(at, reading(50));
            assert_eq!(said[..2], ["sampled Closed", "telemetry"]);
            pings.push(said[2].clone());
        }
        assert_eq!(
            pings,
            ["ping 100", "large ping 101", "ping 102", "ping 103"]
        );
    }

    #[test]
    fn a_pong_from_the_pinned_coordinator_gives_the_latency_the_next_telemetry_reports() {
        let mut h = Harness::online(4);
        h.step(SECOND, reading(50));
        let pong = Pong::sign(&coordinator(), &h.id, 100);
        let pong = Input::Tasks(Envelope::new(Message::Pong(pong)).to_vec().into());
        assert!(h.said(SECOND + Duration::from_millis(3), pong).is_empty());
        h.step(2 * SECOND, Input::Tick);
        let sampled = h.step(2 * SECOND, reading(50));
        let Some(Action::Sampled(sample)) = sampled.first() else {
            panic!("{sampled:?}");
        };
        assert_eq!(sample.latency_us, Some(3000));
    }

    #[test]
    fn a_failing_program_is_no_device_error_and_a_timeout_counts_neither_way() {
        for exit in [
            Exit::Ok,
            Exit::Trapped,
            Exit::OutOfFuel,
            Exit::OutOfMemory,
            Exit::ExitStatus(1),
            Exit::Rejected,
        ] {
            assert_eq!(device_outcome(exit), Some(true), "{exit:?}");
        }
        assert_eq!(device_outcome(Exit::TimedOut), None);
        assert_eq!(refusal_outcome(Refusal::ModuleUnavailable), Some(false));
        assert_eq!(refusal_outcome(Refusal::Busy), None);
    }
}
