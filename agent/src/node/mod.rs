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
//! - **Link**: the ping/pong probe that measures latency and bandwidth to the coordinator, and
//!   the answers to the coordinator's own probes (held back by a simulated board's link).
//! - **Phase**: running, then on shutdown draining (running tasks finish, up to the grace),
//!   flushing (the outbox empties, bounded), closing (the disconnect goes out), finished.
//!
//! # What the inputs decide
//!
//! | input | decision |
//! |---|---|
//! | [`Input::Tasks`] | an assignment verified against the pinned key is run, refused (busy, breaker, shutting down) or answered from the duplicate filter; a pong updates the link; the coordinator's probe is answered with a signed pong; anything else is dropped and counted |
//! | [`Input::NotCached`], [`Input::Loaded`], [`Input::Module`], [`Input::Prepared`] | a job waits for its module: disk, then the broker until the fetch deadline, then compile; a module that never comes or does not match its hash is refused as unavailable, one that does not compile is a rejected run |
//! | [`Input::Finished`] | a report enters the outbox, frees its slot and tells the breaker what the run said about the device |
//! | [`Input::Connected`], [`Input::Lost`], [`Input::Delivered`], [`Input::Unqueued`], [`Input::Retry`] | reports are (re)published oldest first and written to disk when they must outlive the process |
//! | [`Input::Tick`], [`Input::Reading`] | signed telemetry with the breaker's state, then a ping |
//! | [`Input::Shutdown`], [`Input::Timer`], [`Input::Closed`] | the shutdown phases; expired module fetches; held pongs whose delay is over |
//!
//! # Layout
//!
//! This file holds the types, the state, [`Node::handle`], admission (assignments and pongs),
//! the outbox and shutdown; `modules.rs` the module lookups and fetches, `telemetry.rs` the
//! signed samples and pings, `tests.rs` the unit tests.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambient_core::{
    Abi, Admission, Assignment, Breaker, Digest, Envelope, Exit, Identity, LARGE_PADDING, Limits,
    LinkProbe, MAX_BATCH, Message, NodeId, Ping, Pong, PublicKey, Refusal, SafetyPolicy,
    SignedTelemetry, TaskId, Telemetry, TelemetrySample, Transition, sha3_256, sign_message,
    topics,
};
use bytes::Bytes;
use rumqttc::QoS;

use crate::dedup::{Dedup, Seen, TaskKey};
use crate::engine::ExecError;
use crate::outbox::{self, Op, Stored};
use crate::telemetry::Reading;

mod modules;
mod telemetry;

use modules::{Fetch, FetchState};
use telemetry::telemetry_frame;

/// Bytes of finished reports kept in memory to answer a duplicate assignment.
const REPORT_MEMORY: usize = 16 << 20;
/// Longest shutdown waits for the outbox to drain once tasks are done.
const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// Longest shutdown waits for the disconnect to go out.
const DISCONNECT_WAIT: Duration = Duration::from_secs(2);
/// Probes closer together than this are not answered. The coordinator probes every few
/// seconds; probes are unsigned, so this bounds the pongs anyone who can publish on the tasks
/// topic can make the node sign.
const PROBE_SPACING: Duration = Duration::from_millis(50);
/// Pongs held back for a simulated link's delay, at most.
const MAX_HELD_PONGS: usize = 8;
/// Longest a pong is held back, whatever the probe's size and the simulated link.
const MAX_PONG_DELAY: Duration = Duration::from_secs(1);

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
    /// Reading the host failed (a panic in the sampler): no telemetry this time, so a node
    /// that cannot read its sensors goes silent rather than claiming it is cool, and one
    /// device error.
    SampleFailed,
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
    /// The key of the last assignment that verified, decompressed: every assignment is signed
    /// by the one pinned key, and decompressing it is a tenth of each check.
    assigner: Option<PublicKey>,
    /// The last batch of assignments whose signature `assigner` was checked against.
    signed_batch: Option<(heapless::Vec<Digest, MAX_BATCH>, [u8; 64])>,
    fetches: HashMap<Digest, Fetch>,
    outbox: BTreeMap<u64, Pending>,
    next_seq: u64,
    link: LinkProbe,
    next_nonce: u64,
    /// Pongs to the coordinator's probes, with when they go out (a simulated link's delay).
    held_pongs: Vec<(Instant, Bytes)>,
    /// When the coordinator's last probe was answered.
    last_probe: Option<Instant>,
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
            assigner: None,
            signed_batch: None,
            fetches: HashMap::new(),
            outbox,
            next_seq,
            link: LinkProbe::default(),
            next_nonce: start.first_nonce,
            held_pongs: Vec::new(),
            last_probe: None,
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
        let pong = self.held_pongs.iter().map(|(at, _)| *at).min();
        fetch.into_iter().chain(phase).chain(pong).min()
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
            Input::SampleFailed => {
                self.sampling = false;
                if let Some(t) = self.breaker.record(self.now_ms(now), false) {
                    log_transition(t);
                }
            }
            Input::Retry => {
                self.send_reports(out);
                self.store_reports(now, false, out);
            }
            Input::Shutdown => self.begin_shutdown(now, out),
            Input::Timer => {
                self.expire_fetches(now, out);
                self.release_pongs(now, out);
            }
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
        self.held_pongs.clear();
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

    /// Checks that the pinned coordinator signed `a` for this node, `input` being its input's
    /// sha3-256. One signature covers every assignment of a batch, so it is checked once: the
    /// batch's other assignments need only be listed in it.
    fn check_assignment(
        &mut self,
        a: &Assignment<'_>,
        input: &Digest,
        out: &mut Vec<Action<M>>,
    ) -> Result<(), String> {
        a.verify_claim(&self.node, input)
            .map_err(|e| format!("assignment signature: {e} (not in its signed batch)"))?;
        let checked = self
            .assigner
            .is_some_and(|key| *key.as_bytes() == a.coordinator)
            && self
                .signed_batch
                .as_ref()
                .is_some_and(|(batch, signature)| *signature == a.signature && *batch == a.batch);
        if checked {
            return Ok(());
        }
        let key = match self.assigner {
            Some(key) if key.to_bytes() == a.coordinator => Ok(key),
            _ => PublicKey::from_bytes(&a.coordinator),
        };
        let key = key
            .and_then(|key| a.verify_batch_by(&key).map(|()| key))
            .map_err(|e| format!("assignment signature: {e}"))?;
        self.check_coordinator("assignment", a.coordinator, out)?;
        self.assigner = Some(key);
        self.signed_batch = Some((a.batch.clone(), a.signature));
        Ok(())
    }

    fn on_task_frame(&mut self, now: Instant, payload: Bytes, out: &mut Vec<Action<M>>) {
        let envelope = match Envelope::decode(&payload) {
            Ok(e) => e,
            Err(e) => return self.drop_frame(&e.to_string()),
        };
        match envelope.message {
            Message::Assign(a) => {
                let input_hash = sha3_256(a.input);
                if let Err(why) = self.check_assignment(&a, &input_hash, out) {
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
                    .and_then(|()| self.check_coordinator("pong", p.signer, out));
                if let Err(why) = checked {
                    return self.drop_frame(&why);
                }
                self.link.pong(p.nonce, self.micros(now));
            }
            Message::Probe(p) if p.node == self.node => {
                self.on_probe(now, p.nonce, p.padding.len(), out);
            }
            _ => self.drop_frame("not an assignment, a pong or a probe for this node"),
        }
    }

    /// Answers the coordinator's probe with a pong this node signs, on its telemetry topic. A
    /// simulated board holds the pong back by its link: its round-trip latency, plus the
    /// padding's travel time at its bandwidth (at most [`MAX_PONG_DELAY`]), so the coordinator
    /// measures that board's link. Probes closer than [`PROBE_SPACING`], or beyond
    /// [`MAX_HELD_PONGS`] held back, are dropped.
    fn on_probe(&mut self, now: Instant, nonce: u64, padding: usize, out: &mut Vec<Action<M>>) {
        let too_soon = self
            .last_probe
            .is_some_and(|at| now.saturating_duration_since(at) < PROBE_SPACING);
        let dropped = if too_soon {
            Some("closer than 50 ms to the last")
        } else if self.held_pongs.len() >= MAX_HELD_PONGS {
            Some("too many pongs held back")
        } else if !self.connected {
            Some("not connected")
        } else {
            None
        };
        if let Some(why) = dropped {
            self.dropped_frames += 1;
            tracing::debug!(dropped_frames = self.dropped_frames, "probe dropped: {why}");
            return;
        }
        self.last_probe = Some(now);
        let pong = Pong::sign(&self.identity, &self.node, nonce);
        let frame = Bytes::from(Envelope::new(Message::Pong(pong)).to_vec());
        let delay = self.settings.link_offset.map_or(0, |(latency_us, kbps)| {
            let travel_us = padding as u64 * 8 * 1_000 / u64::from(kbps.max(1));
            u64::from(latency_us) + travel_us
        });
        if delay == 0 {
            out.push(telemetry_frame(frame));
        } else {
            let at = now + Duration::from_micros(delay).min(MAX_PONG_DELAY);
            self.held_pongs.push((at, frame));
        }
    }

    /// Sends the held pongs whose delay is over. (A lost connection drops them: after a
    /// reconnect they would only measure the outage.)
    fn release_pongs(&mut self, now: Instant, out: &mut Vec<Action<M>>) {
        self.held_pongs.retain(|(at, frame)| {
            if *at > now {
                return true;
            }
            out.push(telemetry_frame(frame.clone()));
            false
        });
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
mod tests;
