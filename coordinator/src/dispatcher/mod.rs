//! The coordinator's decisions as a pure state machine: intake, placement, retries,
//! verification, settlement, delivery.
//!
//! [`Dispatcher::handle`] takes the time ([`Now`]), one [`Input`] (a submission, a frame from a
//! node, a module upload, a broker connection, a tick) and a read-only view of the journal
//! ([`Journal`]), and appends what to do to [`Effects`]. It opens no socket or file and reads no
//! clock; randomness (spot checks) comes from a seeded RNG. The service
//! (`service.rs`) owns the I/O and applies each loop turn's effects in this order:
//!
//! 1. [`Effects::modules`] and [`Effects::dispatch`]: module copies and assignments (signed by
//!    [`Dispatcher::seal`] once the turn's inputs are handled, one signature for those of
//!    each node; placed attempts reach [`Effects::dispatch`] only then). They may leave
//!    before the commit: execution is at-least-once (agents deduplicate by task and
//!    attempt), so a crash before the commit only means a task runs again.
//! 2. [`Effects::journal`]: every write of the turn, in one SQLite transaction, made durable by
//!    one fsync that may cover several turns.
//! 3. Only after that fsync: [`Effects::events`] (the `accepted`, `completed`, `failed` and
//!    `rejected` events) and the MQTT acknowledgements of the turn's inputs. A failed commit
//!    stops the coordinator: nothing that depends on it leaves, and the next start recovers
//!    from the journal.
//!
//! # The delivery contract
//!
//! - A submission is acknowledged only once journaled. Every accepted task ends with exactly
//!   one final event: `completed`, `failed` (with the reasons) or `rejected`.
//! - Resubmitting a task id is idempotent: a running task answers `accepted` again, a finished
//!   one its stored final event. A different submission under the same id is rejected with code
//!   `conflict` (submissions are compared by the sha3-256 of their validated form).
//! - Settlement is exactly-once: the settlement and the outcome commit in the same transaction,
//!   and the ledger pays a task at most once.
//! - A task waits in the queue for an eligible node at most
//!   [`DispatchConfig::queue_timeout`], counted from when it first could not be placed; it then
//!   fails, naming the requirement no registered node meets when there is one. A dispatch that
//!   fails (times out, is refused, does not verify) counts against
//!   [`DispatchConfig::max_failures`]; retries prefer nodes not tried yet, may reuse a node
//!   that timed out or refused when no other is eligible, and never reuse one that returned a
//!   result that did not verify.
//!
//! # Spot checks
//!
//! A `receipt` or `target:E` task is drawn for a spot check with probability
//! [`DispatchConfig::spot_check_permille`]: it runs on two distinct nodes and their results
//! must agree (a disagreement escalates: see "Contested votes"). The node
//! cannot tell a check from any other assignment. A drawn check is never dropped silently:
//!
//! - while no distinct node is free, the task waits for one in the queue like any other task
//!   (so a check costs latency under load, never the check);
//! - it ends without a second result only when no other registered node can run the task at
//!   all, when the checking runs fail [`DispatchConfig::max_failures`] times, or when no
//!   distinct node was free within [`DispatchConfig::queue_timeout`]. The verified receipt then
//!   stands, and the final event says why the check was missed (`verdict.spot_check_missed`);
//! - every drawn check is counted by outcome ([`SpotCheck`]): `ambient_spot_checks_total`.
//!
//! # Targeting an error rate
//!
//! Under `target:ε` a result is accepted once the chance that it is wrong is at most ε, judged
//! from what the coordinator has seen of the nodes that returned it:
//!
//! - a node's doubt is Sarmenta's bound for a node that agreed with others k times in a row,
//!   `f / ((1 − f) · k · e)`, and `f` for a node never checked ([`ambient_core::doubt`], `f`
//!   is [`RegistryConfig::assumed_faulty_permille`](crate::RegistryConfig));
//! - a result several nodes agreed on is wrong only if all of them are faulty and colluded:
//!   its doubt is [`result_doubt`], the product of theirs weighed against all being right
//!   and any dissenting nodes all being faulty.
//!
//! The first run goes where the strategy says. If that node's doubt is above ε the task is
//! checked on a second node, and while the result's doubt is still above ε, one more replica
//! runs (drawn at random, as every check), up to [`MAX_REPLICAS`]. A disagreement is a
//! contested vote as below; the result it accepts must reach ε too. The result the nodes agreed
//! on stands (`Job::standing`; a single node's, when its check found no second node) when no
//! further replica can be had: no node left that could take it (online, breakers admitting),
//! or the further runs fail [`DispatchConfig::max_failures`] times, or none comes free within
//! [`DispatchConfig::queue_timeout`]. Every result says what it reached in
//! `verdict.error_bound` (reported under every policy). Tasks drawn for a spot check
//! ([`DispatchConfig::spot_check_permille`]) run on two nodes even when one would do, so a
//! node that became credible is still checked now and then, for as long as it runs: a patient
//! cheater is caught by these alone.
//!
//! What it costs: with one node in five assumed faulty, a pool of new nodes runs a
//! `target:1e-4` task on seven of them; the cost falls as nodes agree (a never-checked node and
//! one that agreed 40 times leave 5.8e-4, two that agreed 10 times each 8.6e-5), and a node
//! runs alone after about 920 agreements in a row. The bound is a worst case over every
//! sabotage rate, and assumes colluders: random liars never agree on a wrong output.
//!
//! # Contested votes
//!
//! When replicas disagree, a strict majority is not enough: the result must lead the next
//! most common one by [`CONTESTED_LEAD`] (why, in numbers: its docs). Until it does, the task
//! escalates, at once, to as many replicas as could decide it (three more after a 1–1 split),
//! at most [`MAX_REPLICAS`], each on a node drawn at random; only then are the losers
//! disputed. Two colluders outvoting one honest node 2–1
//! would otherwise blacklist the honest node and accept their lie. A vote that
//! [`MAX_REPLICAS`] replicas can no longer decide fails the task, naming the split, and
//! disputes no one.
//!
//! Replicas still running when their task is accepted (the third of `replicate:3` after two
//! agreed) are compared when they report, until their deadline: agreeing counts as verified
//! for the node; disagreeing is a dispute when the accepted result still leads by
//! [`CONTESTED_LEAD`], counting every late dissent against it, and is let go otherwise (two
//! against one is as likely two colluders against an honest node). The accepted result had
//! its majority and stands.
//! At most [`MAX_LATE`](results::MAX_LATE) finished tasks are kept for this.
//!
//! # Results found suspect later
//!
//! A result accepted on one node's receipt alone (a credible node's unchecked run, or a check
//! that found no second node) is only as good as that node. When the node is later shown to
//! return wrong results (it loses a vote, or signs a receipt that does not verify), the
//! coordinator publishes a [`Notice`] with code `suspect_result` on [`topics::NOTICES`] for
//! each such result of the last [`MAX_UNCHECKED`](results::MAX_UNCHECKED), so their clients can run them again. The
//! result itself stays delivered and paid: a notice says the evidence weakened, not that the
//! result is wrong. The list is kept in memory: a restart forgets it.
//!
//! # Recovery
//!
//! [`Dispatcher::recover`] rebuilds the state from what the journal returns: every unfinished
//! task, with each `(attempt, node)` it was dispatched as. Those dispatches are adopted as
//! outstanding and sent again under the same attempt numbers when the broker connection comes
//! up and whenever their node says it is `online` again (a node that reconnects may have lost
//! its session, and the assignments queued in it, with a restarted broker), so an agent that already ran one answers with its stored report instead of running it
//! again, and its report is accepted rather than dropped as stale. Votes received before a
//! restart are not journaled; the agents' stored reports bring them back.
//!
//! # Layout
//!
//! This file holds the types, the state and [`Dispatcher::handle`], which routes each input;
//! `submission.rs` is intake (submissions, resubmissions, module uploads), `placement.rs` the
//! queue, retries and dispatch deadlines, `results.rs` verification, voting and settlement,
//! and `tests.rs` the unit tests.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambient_core::topics::{self, NodeTopic};
use ambient_core::{
    Assignment, CONTESTED_LEAD, Digest, Envelope, Exit, Expected, Identity, Message, ModuleError,
    ModuleInfo, NodeId, Pong, Quorum, Refusal, Refusals, Report, ReportBody, SignedReceipt,
    SignedRefusal, Tariff, TaskId, quorum, result_doubt, sha3_256, verify_receipt,
    verify_receipt_claims,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tracing::{debug, info, warn};

use crate::intake::{self, MAX_REPLICAS, Policy, TaskSpec};
use crate::results::{EventStatus, Notice, ReceiptJson, TaskEvent, Verdict};
use crate::store::{JournaledTask, Known, NewTask, Op, StoreError, TaskStatus};
use crate::{Outcome, Registry, RegistryError, Strategy};

mod placement;
mod results;
mod signers;
mod submission;

pub use signers::{Checked, Signers};

use results::{Late, Unchecked};
use submission::fingerprint;

/// An MQTT publish the service should make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Whether the broker keeps it for late subscribers.
    pub retain: bool,
    /// `true` for QoS 1, `false` for QoS 0.
    pub reliable: bool,
}

impl Publish {
    fn reliable(topic: impl Into<String>, payload: Vec<u8>) -> Self {
        Self {
            topic: topic.into(),
            payload,
            retain: false,
            reliable: true,
        }
    }
}

/// The answer to a node's latency probe, signed by `coordinator`, if `frame` on `node`'s
/// telemetry topic is a [`Ping`](ambient_core::Ping) from that node.
///
/// The service answers pings in its MQTT task, beside the socket, so what a node measures is
/// its own round trip to the gateway and not the dispatcher's backlog: a busy coordinator must
/// not open the breakers of healthy nodes.
pub fn pong(
    coordinator: &Identity,
    node: NodeId,
    leaf: NodeTopic,
    frame: &[u8],
) -> Option<Publish> {
    if leaf != NodeTopic::Telemetry {
        return None;
    }
    match Envelope::decode(frame).ok()?.message {
        Message::Ping(p) if p.node == node => Some(Publish {
            topic: topics::node(&node, NodeTopic::Tasks).to_string(),
            payload: Envelope::new(Message::Pong(Pong::sign(coordinator, &node, p.nonce))).to_vec(),
            retain: false,
            reliable: false,
        }),
        _ => None,
    }
}

/// How many refused modules the dispatcher remembers by hash.
const REMEMBERED_REFUSALS: usize = 256;

/// Tunables of the dispatcher.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// Strategy for tasks that name none.
    pub default_strategy: Strategy,
    /// Verification policy for tasks that name none. Defaults to `target:1e-4` (see
    /// "Targeting an error rate").
    pub default_policy: Policy,
    /// Pricing of verified work.
    pub tariff: Tariff,
    /// Share of `receipt` and `target:E` tasks re-run on a second node as a spot check, in
    /// permille.
    pub spot_check_permille: u16,
    /// Dispatches of one task that may fail (time out, be refused, fail verification) before
    /// the task fails; the next failure ends it. Defaults to 3.
    pub max_failures: u16,
    /// Added to a task's own time limit to allow for module fetch and transit. Defaults to 15 s.
    pub dispatch_grace: Duration,
    /// How long a task may wait for an eligible node, counted from when it first could not be
    /// placed, before it fails. Defaults to 60 s.
    pub queue_timeout: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            default_strategy: Strategy::Weighted,
            default_policy: Policy::Target(1e-4),
            tariff: Tariff::default(),
            spot_check_permille: 50,
            max_failures: 3,
            dispatch_grace: Duration::from_secs(15),
            queue_timeout: Duration::from_secs(60),
        }
    }
}

/// Counts of inputs that were dropped, logged at info once a minute when they changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Dropped {
    /// Frames that did not decode, or arrived on the wrong topic.
    pub malformed: u64,
    /// Frames from nodes the registry does not know or refused.
    pub unknown_node: u64,
    /// Announces from new nodes refused by the enrollment bounds (`max_nodes`, `joins_per_s`).
    pub refused_joins: u64,
    /// Announces from keys waiting for approval (allowlist mode) or revoked.
    pub not_enrolled: u64,
    /// Reports for tasks already finished, or attempts not outstanding (replays, duplicates).
    pub stale_reports: u64,
    /// Pongs to no outstanding probe of the coordinator's (late, replayed).
    #[serde(default)]
    pub stale_pongs: u64,
    /// Reports and pongs whose signature does not prove they come from the node they name, for
    /// the attempt or probe they answer (forged, replayed, or with output bytes the receipt
    /// does not cover). Never held against that node.
    pub unauthenticated: u64,
    /// Receipts the node signed for the attempt whose claims are false (a dispute).
    pub bad_receipts: u64,
    /// Module uploads whose bytes did not match their topic hash, or that cannot run
    /// (not WASM, invalid, importing what the sandbox does not offer).
    pub bad_modules: u64,
    /// Telemetry and announces in a registered node's name dropped unchecked because forgeries
    /// in that name exceeded `enrollment.bad_frames_per_s`.
    pub rate_limited: u64,
}

impl Dropped {
    /// Every counter by name, as `ambient nodes` shows them.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("malformed", self.malformed),
            ("unknown_node", self.unknown_node),
            ("refused_joins", self.refused_joins),
            ("not_enrolled", self.not_enrolled),
            ("stale_reports", self.stale_reports),
            ("stale_pongs", self.stale_pongs),
            ("unauthenticated", self.unauthenticated),
            ("bad_receipts", self.bad_receipts),
            ("bad_modules", self.bad_modules),
            ("rate_limited", self.rate_limited),
        ]
    }
}

/// The time, passed in: a monotonic instant for deadlines and the wall clock for the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time, for deadlines, liveness and latencies.
    pub at: Instant,
    /// Wall-clock time in Unix milliseconds, for journal timestamps and generated task ids.
    pub unix_ms: u64,
}

impl Now {
    /// Reads both clocks (for the service; tests build `Now` themselves).
    pub fn read() -> Self {
        Self {
            at: Instant::now(),
            unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

/// A frame from a node, and what the service learned of it beside the socket.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// The node named by the topic.
    pub node: NodeId,
    /// The topic's leaf.
    pub leaf: NodeTopic,
    /// The payload.
    pub frame: &'a [u8],
    /// When the service read it off the socket: a pong's round trip ends here, not when the
    /// dispatcher got to it.
    pub received: Instant,
    /// The service's evidence that it already checked the signature of the receipt the frame
    /// carries ([`Signers::check`]); the dispatcher checks it itself unless this names the
    /// node's registered key and that receipt's signature.
    pub signed_by: Option<Checked>,
}

/// One input to [`Dispatcher::handle`].
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// A message from `ambient/v1/tasks/submit`: one submission's JSON, or a JSON array of them
    /// ([`split_submissions`](crate::split_submissions)).
    Submit(&'a [u8]),
    /// A frame on `ambient/v1/nodes/{node}/{leaf}`.
    Frame(Frame<'a>),
    /// A module upload on `ambient/v1/modules/{hash}`.
    Module {
        /// The hash named by the topic.
        hash: Digest,
        /// The payload.
        bytes: &'a [u8],
    },
    /// The operator's verdict on a node's key (`ambient nodes approve`/`revoke`), read from
    /// the store.
    Verdict {
        /// The node's ed25519 public key.
        public_key: [u8; 32],
        /// Approved (`true`) or revoked.
        admit: bool,
        /// The node's stored announce frame, if it sent one: an approved node joins with it at
        /// once instead of waiting for its next connection.
        announce: Option<&'a [u8]>,
    },
    /// The broker connection came up (first time, or again after a loss).
    Connected,
    /// Time passed: dispatch deadlines and queue timeouts are checked.
    Tick,
    /// Time to send the probes that are due ([`Registry::probes`]). The service hands it in
    /// at the start of a loop turn and sends what it places at once, so a probe's round trip
    /// starts when it leaves, not after the turn's inputs.
    Probes,
}

/// A read-only view of the journal: what is stored under a task id.
///
/// [`Store`](crate::store::Store) implements it; tests use a map.
pub trait Journal {
    /// What the journal holds under `task_id`, or `None` if it was never journaled.
    ///
    /// # Errors
    /// When the journal cannot be read.
    fn known(&self, task_id: &TaskId) -> Result<Option<Known>, StoreError>;
}

impl Journal for crate::store::Store {
    fn known(&self, task_id: &TaskId) -> Result<Option<Known>, StoreError> {
        crate::store::Store::known(self, task_id)
    }
}

/// What one loop turn decided: see the module docs for the order the service applies it in.
#[derive(Debug, Default)]
pub struct Effects {
    /// Modules to publish (retained) from the store, before the assignments.
    pub modules: Vec<Digest>,
    /// Publishes that may leave before the commit: inline module copies, probes, and the
    /// assignments [`Dispatcher::seal`] signed.
    pub dispatch: Vec<Publish>,
    /// Attempts placed and not yet signed: (node, task, attempt), for [`Dispatcher::seal`].
    assign: Vec<(NodeId, TaskId, u16)>,
    /// Writes to commit together.
    pub journal: Vec<Op>,
    /// Task events, published only after the commit.
    pub events: Vec<Publish>,
    /// Tasks that ended in this turn (for metrics).
    pub outcomes: Vec<Ended>,
    /// Tasks finished in this turn: id → (fingerprint, index of the `Op::Finish` in `journal`),
    /// so a resubmission in the same turn is answered before the journal holds the outcome.
    finished: HashMap<TaskId, (Digest, usize)>,
}

impl Effects {
    /// Empties every list for the next turn, keeping their allocations.
    pub fn clear(&mut self) {
        self.modules.clear();
        self.dispatch.clear();
        self.assign.clear();
        self.journal.clear();
        self.events.clear();
        self.outcomes.clear();
        self.finished.clear();
    }

    /// Queues `json` (a task event) for the task's result topic, to leave after the commit.
    fn event(&mut self, id: &TaskId, json: Vec<u8>) {
        self.events
            .push(Publish::reliable(topics::task_result(id).as_str(), json));
    }
}

/// What the journal holds for recovery: unfinished tasks and stored module hashes.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Every unfinished task with its dispatches ([`Store::unfinished_tasks`](crate::store::Store::unfinished_tasks)).
    pub tasks: Vec<JournaledTask>,
    /// Every stored module ([`Store::module_hashes`](crate::store::Store::module_hashes)).
    pub modules: Vec<Digest>,
    /// Final events of tasks finished shortly before the restart
    /// ([`Store::finished_since`](crate::store::Store::finished_since)): published again on the
    /// first connection, since the last ones may have been committed but never sent.
    pub finished: Vec<(TaskId, String)>,
}

/// A task that ended, for metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ended {
    /// How it ended.
    pub status: TaskStatus,
    /// Milliseconds from submission to the final event.
    pub latency_ms: f64,
    /// What became of its spot check, when one was drawn.
    pub spot_check: Option<SpotCheck>,
}

/// What became of a drawn spot check (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpotCheck {
    /// Two distinct nodes returned the same output, fuel and exit.
    Agreed,
    /// A node's result disagreed with the accepted one; it was disputed.
    Disagreed,
    /// Only one result was obtained; the event says why.
    Missed,
}

impl SpotCheck {
    /// Its label in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agreed => "agreed",
            Self::Disagreed => "disagreed",
            Self::Missed => "missed",
        }
    }
}

/// One outstanding placement; its deadline lives in `Dispatcher::deadlines`.
struct Dispatch {
    attempt: u16,
    node: NodeId,
    /// When it was decided; `None` for one recovered from the journal. A report's time since
    /// then is what [`Registry::observe_run`] judges the node's speed by.
    sent: Option<Instant>,
}

struct Vote {
    node: NodeId,
    /// From the assignment to this report, when the assignment was made in this run.
    elapsed: Option<Duration>,
    key: (Digest, u64, Exit),
    output: Vec<u8>,
    receipt: SignedReceipt,
    message: String,
}

struct Job {
    spec: Arc<TaskSpec>,
    /// The task's policy, or the coordinator's default when it named none.
    policy: Policy,
    /// sha3-256 of the validated submission's JSON: what resubmissions are compared by.
    fingerprint: Digest,
    input_hash: Digest,
    submitted: Instant,
    replicas: usize,
    spot_check: bool,
    /// Why a drawn spot check got no second result, once that is known.
    spot_missed: Option<String>,
    next_attempt: u16,
    failures: u16,
    /// Why each failed dispatch failed, oldest first (at most `max_failures + 1`).
    errors: Vec<String>,
    outstanding: Vec<Dispatch>,
    votes: Vec<Vote>,
    /// Nodes never to use again for this task: they voted (replicas are distinct) or returned
    /// a receipt that did not verify.
    barred: Vec<NodeId>,
    /// Nodes that timed out, refused or went offline: avoided while another node is eligible.
    avoided: Vec<NodeId>,
    /// When the task first could not be placed; `None` while fully placed. Set means queued.
    queued_since: Option<Instant>,
    /// Under `target:E`, the result the votes accepted while further replicas run because
    /// its agreement does not reach E yet; cleared when a vote leaves it undecided.
    provisional: Option<(Digest, u64, Exit)>,
    /// Which `Dispatcher::queue` entry is this task's, while it is queued.
    ticket: u64,
}

impl Job {
    /// The result that stands if no further run can be had: the verified receipt a spot check
    /// is checking, or the result `target:E` accepted while more replicas raise its agreement.
    fn standing(&self) -> Option<(Digest, u64, Exit)> {
        match self.votes.as_slice() {
            [only] if self.spot_check => Some(only.key),
            _ => self.provisional,
        }
    }

    fn wanted(&self) -> usize {
        self.replicas
            .saturating_sub(self.votes.len() + self.outstanding.len())
    }

    fn fail_reason(&self) -> String {
        match self.errors.as_slice() {
            [] => "no result".into(),
            [one] => one.clone(),
            many => format!("{} attempts failed: {}", many.len(), many.join("; ")),
        }
    }
}

/// The dispatcher: see the module docs.
pub struct Dispatcher {
    config: DispatchConfig,
    registry: Registry,
    /// Signs every assignment.
    identity: Identity,
    jobs: HashMap<TaskId, Job>,
    /// Tasks waiting for an eligible node, by the time they queued, as `(ticket, task)`: first
    /// the tasks that already ran somewhere (a check, a contested vote's further replicas:
    /// work started finishes first, and a liar is found out sooner), then new ones. An entry
    /// is live while its task is queued under that ticket; entries of tasks placed or
    /// finished since are stale and dropped when reached (and at every tick).
    queue: [VecDeque<(u64, TaskId)>; 2],
    /// The ticket the next queued task gets.
    next_ticket: u64,
    /// Dispatch deadlines, earliest first; entries for settled attempts are skipped lazily.
    deadlines: BinaryHeap<Reverse<(Instant, TaskId, u16)>>,
    /// Stored modules, with what inspecting them found when this run saw their bytes (`None`
    /// for modules recovered from the journal: the agents inspect those).
    modules: HashMap<Digest, Option<ModuleInfo>>,
    /// Modules refused at intake or upload, so a resubmission is refused at once.
    refused_modules: Refusals,
    dropped: Dropped,
    /// Replicas of accepted tasks still to report, compared when they do; in finishing order.
    late: HashMap<TaskId, Late>,
    late_order: VecDeque<TaskId>,
    unchecked: Unchecked,
    next_id: u64,
    rng: rand::rngs::StdRng,
    /// [`Recovered::finished`], until the first connection publishes it.
    unsent: Vec<(TaskId, String)>,
}

impl Dispatcher {
    /// Builds the dispatcher from what the journal returned; `seed` seeds the spot-check RNG.
    ///
    /// Every recovered dispatch is adopted as outstanding with a fresh deadline, and sent again
    /// on the first [`Input::Connected`] (see the module docs). A journaled task whose spec
    /// cannot be decoded (written by another version) is logged and left unfinished.
    pub fn recover(
        config: DispatchConfig,
        registry: Registry,
        identity: Identity,
        recovered: Recovered,
        now: Now,
        seed: u64,
    ) -> Self {
        use rand::SeedableRng;
        let mut d = Self {
            config,
            registry,
            identity,
            jobs: HashMap::new(),
            queue: [VecDeque::new(), VecDeque::new()],
            next_ticket: 0,
            deadlines: BinaryHeap::new(),
            modules: recovered.modules.into_iter().map(|m| (m, None)).collect(),
            refused_modules: Refusals::new(REMEMBERED_REFUSALS),
            dropped: Dropped::default(),
            late: HashMap::new(),
            late_order: VecDeque::new(),
            unchecked: Unchecked::default(),
            next_id: 0,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            unsent: recovered.finished,
        };
        for t in recovered.tasks {
            let spec = match serde_json::from_str::<TaskSpec>(&t.spec_json) {
                Ok(spec) => spec,
                Err(e) => {
                    warn!(task = %t.task_id, error = %e, "journaled task cannot be decoded; skipped");
                    continue;
                }
            };
            let mut job = d.new_job(spec, fingerprint(&t.spec_json), now.at);
            job.next_attempt = t.attempts.saturating_add(1);
            let id = job.spec.task_id.clone();
            let deadline = d.deadline(&job, now.at);
            for (attempt, node) in t.dispatches {
                job.outstanding.push(Dispatch {
                    attempt,
                    node,
                    sent: None,
                });
                d.deadlines.push(Reverse((deadline, id.clone(), attempt)));
            }
            // Dispatched more often than it needs replicas (retries): the extra answers are
            // simply more votes, and `tally` decides as soon as a majority agrees.
            job.replicas = job.replicas.max(job.outstanding.len().min(MAX_REPLICAS));
            d.jobs.insert(id.clone(), job);
            if d.jobs[&id].wanted() > 0 {
                d.enqueue(now.at, &id);
            }
        }
        if !d.jobs.is_empty() {
            info!(
                tasks = d.jobs.len(),
                "recovered unfinished tasks from the journal"
            );
        }
        d
    }

    /// Counts of dropped inputs.
    pub fn dropped(&self) -> Dropped {
        self.dropped
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Tasks accepted and not yet finished.
    pub fn unfinished(&self) -> usize {
        self.jobs.len()
    }

    /// Tasks waiting for an eligible node.
    pub fn queued(&self) -> usize {
        self.jobs
            .values()
            .filter(|j| j.queued_since.is_some())
            .count()
    }

    /// The registry as `(node, JSON view)` rows, for [`Op::SaveNodes`].
    pub fn node_rows(&self, now: Now) -> Vec<(NodeId, String)> {
        self.registry
            .views(now.at)
            .into_iter()
            .map(|v| (v.node, serde_json::to_string(&v).unwrap_or_default()))
            .collect()
    }

    /// Handles one input, appending what to do to `fx`.
    pub fn handle(&mut self, now: Now, input: Input<'_>, journal: &impl Journal, fx: &mut Effects) {
        match input {
            Input::Submit(json) => match intake::split(json) {
                Ok(each) => {
                    for json in each {
                        self.on_submission(now, json, journal, fx);
                    }
                }
                Err(r) => submission::reject(None, r.code, r.message, fx),
            },
            Input::Frame(frame) => self.on_node_frame(now, frame, fx),
            Input::Module { hash, bytes } => self.on_module(hash, bytes, fx),
            Input::Verdict {
                public_key,
                admit,
                announce,
            } => self.on_verdict(now, public_key, admit, announce, fx),
            Input::Connected => self.on_connected(fx),
            Input::Tick => self.on_tick(now, fx),
            Input::Probes => self.on_probes(now, fx),
        }
    }

    /// Applies an operator's verdict. A revoked node leaves the pool at once and its
    /// outstanding dispatches move to other nodes; an approved one joins with its stored
    /// announce, and gets work once its next telemetry arrives.
    fn on_verdict(
        &mut self,
        now: Now,
        public_key: [u8; 32],
        admit: bool,
        announce: Option<&[u8]>,
        fx: &mut Effects,
    ) {
        let node = NodeId::from_public_key(&public_key);
        if !admit {
            info!(%node, "node revoked by the operator");
            if self.registry.revoke(public_key).is_some() {
                self.reassign_from(now, node, "revoked by the operator", fx);
            }
            return;
        }
        info!(%node, "node approved by the operator");
        self.registry.approve(public_key);
        let stored = announce.and_then(|frame| match Envelope::decode(frame).ok()?.message {
            Message::Announce(a) if a.announce.public_key == public_key => Some(a),
            _ => None,
        });
        if let Some(a) = stored {
            match self.registry.on_announce(now.at, &a) {
                Ok(_) => self.pump_queue(now, fx),
                Err(e) => debug!(%node, error = %e, "stored announce of an approved node refused"),
            }
        }
    }

    /// After a (re)connection: the broker may have lost retained modules and the assignments
    /// in flight (a restarted broker, a session not kept), so send both again. Agents
    /// deduplicate assignments by task and attempt.
    fn on_connected(&mut self, fx: &mut Effects) {
        for (id, json) in self.unsent.drain(..) {
            fx.event(&id, json.into_bytes());
        }
        fx.modules.extend(self.modules.keys().copied());
        let resent = self.resend(None, fx);
        if resent > 0 {
            info!(
                assignments = resent,
                "broker connected; outstanding assignments sent again"
            );
        }
    }

    /// Sends every outstanding assignment again (to `only` that node, if given) and returns how
    /// many. A node that reconnected may have lost them with its session or a restarted broker;
    /// its agent deduplicates them, or answers with the stored report.
    fn resend(&self, only: Option<NodeId>, fx: &mut Effects) -> usize {
        let mut sent = 0;
        for job in self.jobs.values() {
            for d in &job.outstanding {
                if only.is_none_or(|n| n == d.node) {
                    fx.assign
                        .push((d.node, job.spec.task_id.clone(), d.attempt));
                    sent += 1;
                }
            }
        }
        sent
    }

    fn on_node_frame(&mut self, now: Now, input: Frame<'_>, fx: &mut Effects) {
        let Frame {
            node,
            leaf,
            frame,
            received,
            signed_by,
        } = input;
        if leaf == NodeTopic::Status {
            let online = frame == b"online";
            // Unsigned: it stops new placements, but the node's tasks move only once it goes
            // silent (see `Registry::on_status`), so nobody can cancel a live node's work.
            self.registry.on_status(now.at, node, online);
            if online {
                self.resend(Some(node), fx);
                self.pump_queue(now, fx);
            }
            return;
        }
        let envelope = match Envelope::decode(frame) {
            Ok(e) => e,
            Err(e) => {
                self.dropped.malformed += 1;
                debug!(%node, error = %e, "undecodable frame dropped");
                return;
            }
        };
        match envelope.message {
            // A node speaks only on its own topics: an announce elsewhere registers nobody.
            Message::Announce(a) if leaf == NodeTopic::Announce && a.announce.node == node => {
                match self.registry.on_announce(now.at, &a) {
                    Ok(_) => self.pump_queue(now, fx),
                    Err(e @ (RegistryError::Full(_) | RegistryError::TooManyJoins)) => {
                        self.dropped.refused_joins += 1;
                        debug!(%node, error = %e, "announce refused");
                    }
                    Err(RegistryError::TooFast) => self.dropped.rate_limited += 1,
                    Err(RegistryError::NotAllowed) => {
                        // Signed by the key it names: keep it for the operator's verdict.
                        self.dropped.not_enrolled += 1;
                        fx.journal.push(Op::Pending {
                            public_key: a.announce.public_key,
                            frame: frame.to_vec(),
                            at_ms: now.unix_ms,
                        });
                    }
                    Err(RegistryError::Revoked) => self.dropped.not_enrolled += 1,
                    Err(e) => {
                        self.dropped.unknown_node += 1;
                        debug!(%node, error = %e, "announce refused");
                    }
                }
            }
            Message::Telemetry(t) if t.telemetry.node == node && leaf == NodeTopic::Telemetry => {
                match self.registry.on_telemetry(now.at, &t) {
                    Ok(()) => self.pump_queue(now, fx),
                    Err(RegistryError::TooFast) => self.dropped.rate_limited += 1,
                    Err(e) => {
                        self.dropped.unknown_node += 1;
                        debug!(%node, error = %e, "telemetry refused");
                    }
                }
            }
            // Answered by the service beside the socket (see `pong`).
            Message::Ping(_) if leaf == NodeTopic::Telemetry => {}
            // The answer to one of the coordinator's probes (`on_tick`).
            Message::Pong(p) if leaf == NodeTopic::Telemetry => {
                match self.registry.on_pong(now.at, received, node, &p) {
                    Ok(()) => {}
                    Err(RegistryError::TooFast) => self.dropped.rate_limited += 1,
                    Err(RegistryError::UnknownNode) => self.dropped.unknown_node += 1,
                    Err(RegistryError::UnknownProbe) => self.dropped.stale_pongs += 1,
                    Err(e) => {
                        self.dropped.unauthenticated += 1;
                        debug!(%node, error = %e, "pong refused");
                    }
                }
            }
            Message::Report(r) if r.node == node && leaf == NodeTopic::Results => {
                self.on_report(now, r, signed_by, fx);
                // The report freed a slot: queued tasks should not wait for the next tick.
                self.pump_queue(now, fx);
            }
            _ => {
                self.dropped.malformed += 1;
                debug!(%node, leaf = leaf.as_str(), "message on the wrong topic dropped");
            }
        }
    }
}

#[cfg(test)]
mod tests;
