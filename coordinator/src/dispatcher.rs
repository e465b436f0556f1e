//! The coordinator's decisions as a pure state machine: intake, placement, retries,
//! verification, settlement, delivery.
//!
//! [`Dispatcher::handle`] takes the time ([`Now`]), one [`Input`] (a submission, a frame from a
//! node, a module upload, a broker connection, a tick) and a read-only view of the journal
//! ([`Journal`]), and appends what to do to [`Effects`]. It opens no socket or file and reads no
//! clock; randomness (spot checks) comes from a seeded RNG. The service
//! (`service.rs`) owns the I/O and applies each loop turn's effects in this order:
//!
//! 1. [`Effects::modules`] and [`Effects::dispatch`]: module copies and assignments. They may
//!    leave before the commit: execution is at-least-once (agents deduplicate by task and
//!    attempt), so a crash before the commit only means a task runs again.
//! 2. [`Effects::journal`]: every write of the turn, in one SQLite transaction (one fsync).
//! 3. Only after the commit: [`Effects::events`] (the `accepted`, `completed`, `failed` and
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
//! At most [`MAX_LATE`] finished tasks are kept for this.
//!
//! # Results found suspect later
//!
//! A result accepted on one node's receipt alone (a credible node's unchecked run, or a check
//! that found no second node) is only as good as that node. When the node is later shown to
//! return wrong results (it loses a vote, or signs a receipt that does not verify), the
//! coordinator publishes a [`Notice`] with code `suspect_result` on [`topics::NOTICES`] for
//! each such result of the last [`MAX_UNCHECKED`], so their clients can run them again. The
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

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambient_core::topics::{self, NodeTopic};
use ambient_core::{
    Assignment, CONTESTED_LEAD, Digest, Envelope, Exit, Expected, Identity, Message, ModuleError,
    ModuleInfo, NodeId, Pong, Quorum, Refusal, Refusals, Report, ReportBody, SignedReceipt,
    SignedRefusal, Tariff, TaskId, quorum, result_doubt, sha3_256, verify_receipt,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tracing::{debug, info, warn};

use crate::intake::{self, MAX_REPLICAS, Policy, TaskSpec};
use crate::results::{EventStatus, Notice, ReceiptJson, TaskEvent, Verdict};
use crate::store::{JournaledTask, Known, NewTask, Op, StoreError, TaskStatus};
use crate::{Outcome, Registry, RegistryError, Strategy};

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
    /// Reports whose signature does not prove they come from the node they name, for the
    /// attempt they answer (forged, replayed, or with output bytes the receipt does not cover).
    /// Never held against that node.
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

/// One input to [`Dispatcher::handle`].
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// A submission's JSON from `ambient/v1/tasks/submit`.
    Submit(&'a [u8]),
    /// A frame on `ambient/v1/nodes/{node}/{leaf}`.
    Frame {
        /// The node named by the topic.
        node: NodeId,
        /// The topic's leaf.
        leaf: NodeTopic,
        /// The payload.
        frame: &'a [u8],
    },
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
    /// Publishes that may leave before the commit: assignments and inline module copies.
    pub dispatch: Vec<Publish>,
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

/// Replicas of a finished task kept for comparison: at most this many tasks.
const MAX_LATE: usize = 4_096;

/// Results accepted on one node's receipt alone, remembered so that their clients can be told
/// if the node is caught later (see "Results found suspect later"); the oldest are forgotten.
const MAX_UNCHECKED: usize = 65_536;

/// The last [`MAX_UNCHECKED`] tasks whose accepted result rested on one node alone.
#[derive(Default)]
struct Unchecked(VecDeque<(NodeId, TaskId)>);

impl Unchecked {
    fn remember(&mut self, node: NodeId, task: TaskId) {
        if self.0.len() == MAX_UNCHECKED {
            self.0.pop_front();
        }
        self.0.push_back((node, task));
    }

    /// `node` was shown to return wrong results: a notice for each result that rested on it.
    /// O([`MAX_UNCHECKED`]), once per dispute.
    fn caught(&mut self, node: NodeId, fx: &mut Effects) {
        let mut suspect = Vec::new();
        self.0.retain(|(n, task)| {
            let keep = *n != node;
            if !keep {
                suspect.push(task.clone());
            }
            keep
        });
        for task in suspect {
            let notice = Notice {
                task_id: task.to_string(),
                code: "suspect_result".into(),
                node: node.to_hex().to_string(),
                message: format!(
                    "the accepted result rested on node {node} alone, and that node has since \
                     returned a wrong result; submit the task again under a new id to be sure"
                ),
            };
            let json = serde_json::to_vec(&notice).unwrap_or_default();
            fx.events.push(Publish::reliable(topics::NOTICES, json));
        }
    }
}

/// An accepted task's replicas that were still running when it was accepted.
struct Late {
    spec: Arc<TaskSpec>,
    input_hash: Digest,
    accepted: (Digest, u64, Exit),
    /// Every vote so far, the late ones included, to decide whether a late dissent is
    /// outvoted decisively.
    votes: Vec<(Digest, u64, Exit)>,
    /// The nodes that voted or were asked to: how many more could vote is counted besides.
    voters: Vec<NodeId>,
    outstanding: Vec<Dispatch>,
    /// When none of them can report any more.
    expires: Instant,
}

/// Which of `outstanding` `report` answers; `None`, counted as stale, when none (a replay, a
/// duplicate, an attempt given up on).
fn answered(outstanding: &[Dispatch], report: &Report<'_>, dropped: &mut Dropped) -> Option<usize> {
    let pos = outstanding
        .iter()
        .position(|d| d.attempt == report.attempt && d.node == report.node);
    if pos.is_none() {
        dropped.stale_reports += 1;
        debug!(task = %report.task_id, attempt = report.attempt, node = %report.node, "report for an attempt not outstanding dropped");
    }
    pos
}

/// Authenticates a report against its task: `Err` when it does not prove it comes from the
/// node it names for that attempt (never held against the node), `Ok(Some(e))` when the node
/// signed a receipt whose claims are false (a dispute), `Ok(None)` when it holds.
fn authenticate(
    registry: &Registry,
    report: &Report<'_>,
    spec: &TaskSpec,
    input_hash: Digest,
) -> Result<Option<ambient_core::VerifyError>, String> {
    let node = report.node;
    match (&report.body, registry.public_key(&node)) {
        (_, None) => Err("the node is not registered".to_owned()),
        (ReportBody::Refused(r), Some(key)) => r
            .verify(key, &report.task_id, report.attempt, &node)
            .map(|()| None)
            .map_err(|e| format!("refusal signature: {e}")),
        (
            ReportBody::Executed {
                receipt, output, ..
            },
            Some(key),
        ) => {
            let expected = Expected {
                task_id: &spec.task_id,
                attempt: report.attempt,
                node,
                public_key: key,
                module: spec.module,
                input: input_hash,
                limits: spec.limits,
            };
            match verify_receipt(receipt, output, &expected) {
                Err(e) if !e.is_attributable() => Err(e.to_string()),
                other => Ok(other.err()),
            }
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
            Input::Submit(json) => self.on_submission(now, json, journal, fx),
            Input::Frame { node, leaf, frame } => self.on_node_frame(now, node, leaf, frame, fx),
            Input::Module { hash, bytes } => self.on_module(hash, bytes, fx),
            Input::Verdict {
                public_key,
                admit,
                announce,
            } => self.on_verdict(now, public_key, admit, announce, fx),
            Input::Connected => self.on_connected(fx),
            Input::Tick => self.on_tick(now, fx),
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
                    fx.dispatch
                        .push(assignment(&self.identity, job, d.attempt, d.node));
                    sent += 1;
                }
            }
        }
        sent
    }

    fn on_submission(&mut self, now: Now, json: &[u8], journal: &impl Journal, fx: &mut Effects) {
        let next = &mut self.next_id;
        let (modules, refused) = (&self.modules, &self.refused_modules);
        let parsed = intake::parse(
            json,
            |h| modules.contains_key(h) || refused.get(h).is_some(),
            || {
                *next += 1;
                generated_id(now.unix_ms, *next)
            },
        );
        let p = match parsed {
            Ok(p) => p,
            Err(r) => {
                debug!(code = r.code, "submission rejected: {}", r.message);
                reject(submission_id(json), r.code, r.message, fx);
                return;
            }
        };
        // A module that cannot run this call is refused here, free of charge.
        let inspected = match self.check_module(&p.spec, p.inline_module.as_deref()) {
            Ok(info) => info,
            Err(e) => {
                let id = p.spec.task_id.as_str().to_owned();
                debug!(task = %id, error = %e, "submission rejected: module cannot run");
                reject(Some(id), "bad_module", e.to_string(), fx);
                return;
            }
        };
        let spec_json = serde_json::to_string(&p.spec).unwrap_or_default();
        let submitted = fingerprint(&spec_json);
        let id = p.spec.task_id.clone();
        // Seen before? Running here, finished in this turn, or in the journal.
        let earlier: Option<(Digest, Option<String>)> = if let Some(job) = self.jobs.get(&id) {
            Some((job.fingerprint, None))
        } else if let Some((fp, at)) = fx.finished.get(&id) {
            let result = match &fx.journal[*at] {
                Op::Finish { result_json, .. } => Some(result_json.clone()),
                _ => None,
            };
            Some((*fp, result))
        } else {
            match journal.known(&id) {
                Ok(known) => known.map(|k| (fingerprint(&k.spec_json), k.result_json)),
                Err(e) => {
                    // Not journaled, so not acknowledged as accepted: the client resubmits.
                    warn!(task = %id, error = %e, "journal lookup failed; rejecting");
                    let message =
                        format!("the coordinator could not read its journal ({e}); resubmit later");
                    reject(Some(id.as_str().into()), "journal_unavailable", message, fx);
                    return;
                }
            }
        };
        if let Some((earlier_fp, result)) = earlier {
            if earlier_fp != submitted {
                let message = format!(
                    "task_id {id} was already submitted with different content; choose a new task_id"
                );
                reject(Some(id.as_str().into()), "conflict", message, fx);
                return;
            }
            // Idempotent resubmission: answer with where the first copy stands.
            fx.event(
                &id,
                TaskEvent::new(id.as_str(), EventStatus::Accepted).to_json(),
            );
            if let Some(result) = result {
                fx.event(&id, result.into_bytes());
            }
            return;
        }
        if let Some(bytes) = p.inline_module
            && self.modules.insert(p.spec.module, inspected).is_none()
        {
            fx.dispatch.push(Publish {
                topic: topics::module(&p.spec.module).to_string(),
                payload: bytes.clone(),
                retain: true,
                reliable: true,
            });
            fx.journal.push(Op::PutModule {
                hash: p.spec.module,
                bytes,
            });
        }
        fx.journal.push(Op::Insert(NewTask {
            task_id: id.clone(),
            client: p.spec.client.clone(),
            spec_json,
            submitted_ms: now.unix_ms,
        }));
        fx.event(
            &id,
            TaskEvent::new(id.as_str(), EventStatus::Accepted).to_json(),
        );
        let job = self.new_job(p.spec, submitted, now.at);
        self.jobs.insert(id.clone(), job);
        self.pump(now, &id, fx);
    }

    /// Whether the call `spec` asks for can run its module, by the module's inspection:
    /// remembered, or made now from `inline` bytes not seen before (returned, to be kept with
    /// the module). A module recovered from the journal is not inspected here; the agent does.
    fn check_module(
        &mut self,
        spec: &TaskSpec,
        inline: Option<&[u8]>,
    ) -> Result<Option<ModuleInfo>, ModuleError> {
        if let Some(e) = self.refused_modules.get(&spec.module) {
            return Err(e.clone());
        }
        let (info, fresh) = match (self.modules.get(&spec.module), inline) {
            (Some(info), _) => (info.clone(), false),
            (None, Some(bytes)) => match ambient_core::inspect(bytes) {
                Ok(info) => (Some(info), true),
                Err(e) => {
                    self.refused_modules.remember(spec.module, e.clone());
                    return Err(e);
                }
            },
            (None, None) => (None, false),
        };
        if let Some(info) = &info {
            info.check_call(spec.abi, &spec.entry)?;
        }
        Ok(if fresh { info } else { None })
    }

    fn on_module(&mut self, hash: Digest, bytes: &[u8], fx: &mut Effects) {
        if bytes.is_empty()
            || self.modules.contains_key(&hash)
            || self.refused_modules.get(&hash).is_some()
        {
            return;
        }
        if sha3_256(bytes) != hash {
            self.dropped.bad_modules += 1;
            warn!(module = %hash, "module upload does not match its topic's hash; ignored");
            return;
        }
        match ambient_core::inspect(bytes) {
            Ok(info) => {
                self.modules.insert(hash, Some(info));
            }
            Err(e) => {
                self.dropped.bad_modules += 1;
                warn!(module = %hash, error = %e, "module upload refused");
                self.refused_modules.remember(hash, e);
                return;
            }
        }
        fx.journal.push(Op::PutModule {
            hash,
            bytes: bytes.to_vec(),
        });
    }

    fn on_node_frame(
        &mut self,
        now: Now,
        node: NodeId,
        leaf: NodeTopic,
        frame: &[u8],
        fx: &mut Effects,
    ) {
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
            Message::Report(r) if r.node == node && leaf == NodeTopic::Results => {
                self.on_report(now, r, fx);
                // The report freed a slot: queued tasks should not wait for the next tick.
                self.pump_queue(now, fx);
            }
            _ => {
                self.dropped.malformed += 1;
                debug!(%node, leaf = leaf.as_str(), "message on the wrong topic dropped");
            }
        }
    }

    fn on_report(&mut self, now: Now, report: Report<'_>, fx: &mut Effects) {
        let node = report.node;
        let Some(job) = self.jobs.get_mut(&report.task_id) else {
            self.on_late_report(now, &report, fx);
            return;
        };
        let Some(pos) = answered(&job.outstanding, &report, &mut self.dropped) else {
            return;
        };
        // Authenticate before anything changes: a frame anyone on the broker could have sent
        // must neither cancel the attempt nor count against the node it names.
        let verdict = authenticate(&self.registry, &report, &job.spec, job.input_hash);
        let disputed = match verdict {
            Ok(disputed) => disputed,
            Err(why) => {
                self.dropped.unauthenticated += 1;
                debug!(task = %report.task_id, attempt = report.attempt, %node, %why, "unauthenticated report dropped");
                return;
            }
        };
        let sent = job.outstanding.swap_remove(pos).sent;
        self.registry.task_finished(&node);
        let task_id = report.task_id.clone();
        match report.body {
            ReportBody::Refused(SignedRefusal {
                refusal: Refusal::Busy | Refusal::Breaker(_) | Refusal::ShuttingDown,
                ..
            }) => {
                // Not the task's failure: the node is full, unwell or leaving, which the registry
                // did not know yet. It rests until its next report or sample, and the task goes
                // elsewhere or waits in the queue (whose timeout still ends it).
                self.registry.rest(&node);
                job.avoided.push(node);
                self.pump(now, &task_id, fx);
            }
            ReportBody::Refused(SignedRefusal { refusal, .. }) => {
                let why = match refusal {
                    Refusal::Breaker(r) => format!("node {node} refused: breaker open ({r})"),
                    Refusal::Busy => format!("node {node} refused: busy"),
                    Refusal::ModuleUnavailable => {
                        format!("node {node} could not fetch module {}", job.spec.module)
                    }
                    Refusal::ShuttingDown => format!("node {node} is shutting down"),
                };
                if refusal == Refusal::ModuleUnavailable {
                    // The broker may have lost its retained copy (restart): publish it again.
                    fx.modules.push(job.spec.module);
                }
                job.avoided.push(node);
                self.fail_attempt(now, &task_id, why, fx);
            }
            ReportBody::Executed {
                receipt,
                output,
                message,
            } => {
                if let Some(e) = disputed {
                    self.dropped.bad_receipts += 1;
                    warn!(task = %task_id, %node, error = %e, "receipt rejected");
                    job.barred.push(node);
                    self.registry.record(now.at, &node, Outcome::Disputed);
                    self.unchecked.caught(node, fx);
                    self.fail_attempt(
                        now,
                        &task_id,
                        format!("node {node} sent a receipt that does not verify: {e}"),
                        fx,
                    );
                    return;
                }
                self.registry.touch(now.at, node);
                let exit = receipt.receipt.exit;
                if exit == Exit::TimedOut {
                    // Wall-clock limits are not deterministic: another node may finish in time.
                    job.avoided.push(node);
                    self.registry.record(now.at, &node, Outcome::Failed);
                    self.fail_attempt(
                        now,
                        &task_id,
                        format!("timed out on node {node}: {message}"),
                        fx,
                    );
                    return;
                }
                self.registry.record(now.at, &node, Outcome::Completed);
                job.barred.push(node);
                let key = (receipt.receipt.output, receipt.receipt.fuel_used, exit);
                job.votes.push(Vote {
                    node,
                    elapsed: sent.map(|sent| now.at.saturating_duration_since(sent)),
                    key,
                    output: output.to_vec(),
                    receipt,
                    message: message.to_string(),
                });
                self.tally(now, &task_id, fx);
            }
        }
    }

    /// A report for a task that is no longer running: stale, unless it answers a replica
    /// still outstanding when the task was accepted. Those are compared with the accepted
    /// result when they come: agreeing counts as verified for the node, disagreeing as a
    /// dispute when the accepted result still leads decisively (see "Contested votes"). The
    /// accepted result stands either way: it had its majority.
    fn on_late_report(&mut self, now: Now, report: &Report<'_>, fx: &mut Effects) {
        let node = report.node;
        let Some(late) = self.late.get_mut(&report.task_id) else {
            self.dropped.stale_reports += 1;
            debug!(task = %report.task_id, %node, "report for a finished or unknown task dropped");
            return;
        };
        let Some(pos) = answered(&late.outstanding, report, &mut self.dropped) else {
            return;
        };
        let disputed = match authenticate(&self.registry, report, &late.spec, late.input_hash) {
            Ok(disputed) => disputed,
            Err(why) => {
                self.dropped.unauthenticated += 1;
                debug!(task = %report.task_id, attempt = report.attempt, %node, %why, "unauthenticated late report dropped");
                return;
            }
        };
        late.outstanding.swap_remove(pos);
        let accepted = late.accepted;
        let ReportBody::Executed { receipt, .. } = &report.body else {
            if late.outstanding.is_empty() {
                self.late.remove(&report.task_id);
            }
            return;
        };
        let key = (
            receipt.receipt.output,
            receipt.receipt.fuel_used,
            receipt.receipt.exit,
        );
        let dissents = disputed.is_none() && key.2 != Exit::TimedOut && key != accepted;
        if disputed.is_none() && key.2 != Exit::TimedOut {
            late.votes.push(key);
        }
        // A dissent is outvoted when the votes, its own included, still decide for the
        // accepted result as a running task's would (see "Contested votes").
        let decisive = dissents && {
            let pool = electorate(
                &self.registry,
                now.at,
                &late.spec,
                (late.votes.len(), late.outstanding.len()),
                &late.voters,
            );
            matches!(
                quorum(&late.votes, late.votes.len(), pool),
                Quorum::Accepted { index, .. } if late.votes[index] == accepted
            )
        };
        if late.outstanding.is_empty() {
            self.late.remove(&report.task_id);
        }
        let outcome = if let Some(e) = disputed {
            self.dropped.bad_receipts += 1;
            warn!(task = %report.task_id, %node, error = %e, "late receipt rejected");
            Outcome::Disputed
        } else if key.2 == Exit::TimedOut {
            Outcome::Failed
        } else if key == accepted {
            Outcome::Agreed
        } else if decisive {
            warn!(task = %report.task_id, %node, "a late replica disagrees with the accepted result; disputed");
            Outcome::Disputed
        } else {
            // Outvoted by less than the contested lead: as likely the honest one as a liar.
            info!(task = %report.task_id, %node, "a late replica disagrees with a narrow majority; not disputed");
            self.registry.touch(now.at, node);
            return;
        };
        self.registry.touch(now.at, node);
        self.registry.record(now.at, &node, outcome);
        if outcome == Outcome::Disputed {
            self.unchecked.caught(node, fx);
        }
    }

    /// Forgets replicas of finished tasks that can no longer report, and the oldest past
    /// [`MAX_LATE`].
    fn expire_late(&mut self, now: Instant) {
        while let Some(id) = self.late_order.front() {
            let expired = self
                .late
                .get(id)
                .is_none_or(|l| l.expires <= now || self.late.len() > MAX_LATE);
            if !expired {
                break;
            }
            let id = self.late_order.pop_front().expect("front exists");
            self.late.remove(&id);
        }
    }

    fn tally(&mut self, now: Now, task_id: &TaskId, fx: &mut Effects) {
        let Some(job) = self.jobs.get_mut(task_id) else {
            return;
        };
        let keys: Vec<_> = job.votes.iter().map(|v| v.key).collect();
        job.provisional = None;
        let mut verdict = quorum(&keys, job.replicas, usize::MAX);
        let mut pool = usize::MAX;
        if matches!(verdict, Quorum::Split { .. }) {
            // Only a disagreement depends on how many nodes could still vote (O(n)).
            let mut voters: Vec<NodeId> = job.outstanding.iter().map(|d| d.node).collect();
            voters.extend_from_slice(&job.barred);
            pool = electorate(
                &self.registry,
                now.at,
                &job.spec,
                (keys.len(), job.outstanding.len()),
                &voters,
            );
            verdict = quorum(&keys, job.replicas, pool);
        }
        match verdict {
            Quorum::Accepted { index, .. } => {
                let Policy::Target(target) = job.policy else {
                    return self.finish(now, task_id, Some(keys[index]), fx);
                };
                if doubt_of(&self.registry, &job.votes, keys[index]) <= target {
                    return self.finish(now, task_id, Some(keys[index]), fx);
                }
                job.provisional = Some(keys[index]);
                if !job.outstanding.is_empty() {
                    return; // a replica still running may add its agreement
                }
                // Not yet as sure as the target: one more replica, while the pool may have
                // one. The result stands if none can be had after all (see `Job::standing`).
                let voters = &job.barred;
                let more = keys.len() < MAX_REPLICAS
                    && self.registry.any_ready(now.at, &job.spec.requires, voters);
                if more {
                    job.replicas = keys.len() + 1;
                    self.pump(now, task_id, fx);
                } else {
                    self.finish(now, task_id, Some(keys[index]), fx);
                }
            }
            Quorum::Pending => self.pump(now, task_id, fx),
            Quorum::Split { decidable_at } if decidable_at <= MAX_REPLICAS => {
                // Disagreement escalates, at once, to as many replicas as could decide.
                job.replicas = decidable_at;
                info!(task = %task_id, replicas = job.replicas, "replicas disagree; escalating");
                self.pump(now, task_id, fx);
            }
            Quorum::Split { .. } | Quorum::Undecidable => {
                let n = job.votes.len();
                let why = if pool < MAX_REPLICAS {
                    format!(
                        "{n} replicas disagreed and no majority is possible: only {pool} \
                         nodes can run the task"
                    )
                } else {
                    format!(
                        "{n} replicas disagreed: no result can lead the others by \
                         {CONTESTED_LEAD} within {MAX_REPLICAS} replicas"
                    )
                };
                job.errors.push(why);
                self.finish(now, task_id, None, fx);
            }
        }
    }

    fn fail_attempt(&mut self, now: Now, task_id: &TaskId, why: String, fx: &mut Effects) {
        let Some(job) = self.jobs.get_mut(task_id) else {
            return;
        };
        debug!(task = %task_id, "{why}");
        job.failures += 1;
        job.errors.push(why);
        if job.failures > self.config.max_failures {
            // Failed checking runs do not undo the result they were checking.
            let verified = job.standing();
            if verified.is_some() {
                job.spot_missed = Some(format!("the checking runs failed: {}", job.fail_reason()));
            }
            self.finish(now, task_id, verified, fx);
        } else {
            self.pump(now, task_id, fx);
        }
    }

    fn deadline(&self, job: &Job, now: Instant) -> Instant {
        now + Duration::from_millis(job.spec.limits.timeout_ms) + self.config.dispatch_grace
    }

    /// Places as many dispatches as the task still needs; queues it when no node is eligible.
    fn pump(&mut self, now: Now, task_id: &TaskId, fx: &mut Effects) {
        let Some(job) = self.jobs.get(task_id) else {
            return;
        };
        let strategy = job.spec.strategy.unwrap_or(self.config.default_strategy);
        let deadline = self.deadline(job, now.at);
        loop {
            let Some(job) = self.jobs.get_mut(task_id) else {
                return;
            };
            if job.wanted() == 0 {
                break;
            }
            // Never a node already running or done with it; nodes that failed it only when
            // nothing else is eligible.
            let mut exclude: Vec<NodeId> = job.outstanding.iter().map(|d| d.node).collect();
            exclude.extend_from_slice(&job.barred);
            let strict_len = exclude.len();
            exclude.extend_from_slice(&job.avoided);
            let requires = &job.spec.requires;
            // A spot check of a verified receipt never goes back to a node that failed the
            // task: it would only fail again, and the receipt already stands. (A `target:E`
            // task's further replicas may: a node that was busy a moment ago is worth the
            // wait for the target.)
            let checking_only = job.spot_check && job.votes.len() == 1;
            // The first run goes where the strategy says; checks and further replicas to a
            // node drawn uniformly, so no node can steer who checks it (see "Colluders").
            let first = job.votes.is_empty() && job.outstanding.is_empty();
            let draw = rand::Rng::random::<u64>(&mut self.rng);
            let registry = &mut self.registry;
            let mut select = |exclude: &[NodeId]| {
                if first {
                    registry.select(now.at, requires, strategy, exclude)
                } else {
                    registry.select_uniform(now.at, requires, exclude, draw)
                }
            };
            let chosen = select(&exclude).or_else(|| {
                (!checking_only && exclude.len() > strict_len)
                    .then(|| select(&exclude[..strict_len]))?
            });
            let Some(node) = chosen else {
                // A spot check waits for a distinct free node like any task, unless no other
                // registered node could ever run it: then the verified receipt stands, and
                // the event says why it was not checked.
                if checking_only && job.outstanding.is_empty() {
                    let unable = &exclude[..];
                    if let Some(why) =
                        self.registry
                            .unmet_without(now.at, &job.spec.requires, unable)
                    {
                        job.spot_missed = Some(why);
                        let key = job.votes[0].key;
                        self.finish(now, task_id, Some(key), fx);
                        return;
                    }
                }
                self.enqueue(now.at, task_id);
                return;
            };
            // A node not yet proven (`receipt`), or whose results could be wrong more often
            // than the target (`target:ε`), runs no task unchecked: its first run is checked
            // on a second node (the next turn of this loop places it).
            let doubtful = match job.policy {
                Policy::Receipt => !self.registry.proven(&node),
                Policy::Target(target) => self.registry.doubt(&node) > target,
                Policy::Replicate(_) => false,
            };
            if doubtful && !job.spot_check && job.votes.is_empty() && job.outstanding.is_empty() {
                job.spot_check = true;
                job.replicas = 2;
            }
            let attempt = job.next_attempt;
            job.next_attempt = job.next_attempt.saturating_add(1);
            job.outstanding.push(Dispatch {
                attempt,
                node,
                sent: Some(now.at),
            });
            self.deadlines
                .push(Reverse((deadline, task_id.clone(), attempt)));
            self.registry.task_started(&node);
            fx.journal.push(Op::Dispatch {
                task_id: task_id.clone(),
                attempt,
                node,
                at_ms: now.unix_ms,
            });
            fx.dispatch
                .push(assignment(&self.identity, job, attempt, node));
        }
        if let Some(job) = self.jobs.get_mut(task_id) {
            job.queued_since = None;
        }
    }

    /// Marks a task as waiting for a node, from now unless it already waits.
    fn enqueue(&mut self, now: Instant, task_id: &TaskId) {
        if let Some(job) = self.jobs.get_mut(task_id)
            && job.queued_since.is_none()
        {
            job.queued_since = Some(now);
            job.ticket = self.next_ticket;
            self.next_ticket += 1;
            let started = !job.votes.is_empty() || !job.outstanding.is_empty();
            self.queue[usize::from(!started)].push_back((job.ticket, task_id.clone()));
        }
    }

    /// Tries to place queued tasks, those already started first, then oldest first, while some
    /// node has a free slot. A task
    /// whose requirements no free node meets is passed over, not waited on, so it cannot hold
    /// up the ones behind it.
    ///
    /// Cost: the tasks examined, not the queue's length; this runs on every report and sample,
    /// and the queue holds a whole batch while the nodes are saturated.
    fn pump_queue(&mut self, now: Now, fx: &mut Effects) {
        for q in 0..self.queue.len() {
            let mut passed_over = Vec::new();
            while self.registry.available() > 0 {
                let Some(entry) = self.queue[q].pop_front() else {
                    break;
                };
                if !self.is_live(&entry) {
                    continue;
                }
                self.pump(now, &entry.1, fx);
                // Still waiting under the same ticket: it keeps its place.
                if self.is_live(&entry) {
                    passed_over.push(entry);
                }
            }
            for entry in passed_over.into_iter().rev() {
                self.queue[q].push_front(entry);
            }
        }
    }

    /// Whether a queue entry is its task's current one.
    fn is_live(&self, (ticket, id): &(u64, TaskId)) -> bool {
        self.jobs
            .get(id)
            .is_some_and(|j| j.queued_since.is_some() && j.ticket == *ticket)
    }

    fn reassign_from(&mut self, now: Now, node: NodeId, why: &str, fx: &mut Effects) {
        let affected: Vec<(TaskId, u16)> = self
            .jobs
            .iter()
            .flat_map(|(id, j)| {
                j.outstanding
                    .iter()
                    .filter(|d| d.node == node)
                    .map(move |d| (id.clone(), d.attempt))
            })
            .collect();
        for (id, attempt) in affected {
            self.drop_dispatch(&id, attempt);
            self.registry.record(now.at, &node, Outcome::Failed);
            self.fail_attempt(now, &id, format!("node {node}: {why}"), fx);
        }
    }

    /// Forgets an outstanding dispatch, marking its node as one to avoid for this task.
    fn drop_dispatch(&mut self, task_id: &TaskId, attempt: u16) -> Option<NodeId> {
        let job = self.jobs.get_mut(task_id)?;
        let pos = job.outstanding.iter().position(|d| d.attempt == attempt)?;
        let d = job.outstanding.swap_remove(pos);
        job.avoided.push(d.node);
        self.registry.task_finished(&d.node);
        Some(d.node)
    }

    /// Advances time: expires dispatches past their deadline and tasks that waited too long
    /// for a node, then places what it can.
    fn on_tick(&mut self, now: Now, fx: &mut Effects) {
        self.expire_late(now.at);
        for node in self.registry.went_silent(now.at) {
            self.reassign_from(now, node, "went silent (no signed traffic in time)", fx);
        }
        while let Some(Reverse((deadline, _, _))) = self.deadlines.peek() {
            if *deadline > now.at {
                break;
            }
            let Some(Reverse((_, id, attempt))) = self.deadlines.pop() else {
                break;
            };
            if let Some(node) = self.drop_dispatch(&id, attempt) {
                self.registry.record(now.at, &node, Outcome::Failed);
                self.fail_attempt(
                    now,
                    &id,
                    format!("node {node} did not answer attempt {attempt} in time"),
                    fx,
                );
            }
        }
        let jobs = &self.jobs;
        for q in &mut self.queue {
            q.retain(|(ticket, id)| {
                jobs.get(id)
                    .is_some_and(|j| j.queued_since.is_some() && j.ticket == *ticket)
            });
        }
        // Live entries are in the order they queued, so the expired ones lead each queue.
        let expired: Vec<TaskId> = self
            .queue
            .iter()
            .flat_map(|q| {
                q.iter().map_while(|(_, id)| {
                    let since = self.jobs.get(id)?.queued_since?;
                    (now.at.duration_since(since) >= self.config.queue_timeout).then(|| id.clone())
                })
            })
            .collect();
        for id in expired {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            let waited = self.config.queue_timeout.as_secs_f64();
            let why = match self.registry.unmet(&job.spec.requires, job.replicas) {
                Some(unmet) => format!("no eligible node within {waited} s: {unmet}"),
                None => format!(
                    "no eligible node within {waited} s (online, breaker closed, a free slot, enough free memory)"
                ),
            };
            // A check that found no free node leaves the result it was checking standing.
            let verified = job.standing().filter(|_| job.outstanding.is_empty());
            if verified.is_some() {
                job.spot_missed = Some(format!(
                    "no distinct node was free to check it within {waited} s"
                ));
            } else {
                job.errors.push(why);
            }
            self.finish(now, &id, verified, fx);
        }
        self.pump_queue(now, fx);
    }

    /// Ends a task: with the winning vote key settled and delivered, or failed.
    fn finish(
        &mut self,
        now: Now,
        task_id: &TaskId,
        winner: Option<(Digest, u64, Exit)>,
        fx: &mut Effects,
    ) {
        let Some(mut job) = self.jobs.remove(task_id) else {
            return;
        };
        for d in &job.outstanding {
            self.registry.task_finished(&d.node);
        }
        if let Some(accepted) = winner
            && !job.outstanding.is_empty()
        {
            self.late.insert(
                task_id.clone(),
                Late {
                    spec: Arc::clone(&job.spec),
                    input_hash: job.input_hash,
                    accepted,
                    votes: job.votes.iter().map(|v| v.key).collect(),
                    voters: job
                        .barred
                        .iter()
                        .chain(job.outstanding.iter().map(|d| &d.node))
                        .copied()
                        .collect(),
                    outstanding: std::mem::take(&mut job.outstanding),
                    expires: self.deadline(&job, now.at),
                },
            );
            self.late_order.push_back(task_id.clone());
            self.expire_late(now.at);
        }
        let latency_ms = now.at.duration_since(job.submitted).as_secs_f64() * 1e3;
        let mut spot_check = None;
        let mut event = match winner {
            None => TaskEvent::new(task_id.as_str(), EventStatus::Failed)
                .with_error("no_verified_result", job.fail_reason()),
            Some(key) => {
                let error_bound = doubt_of(&self.registry, &job.votes, key);
                let winners: Vec<&Vote> = job.votes.iter().filter(|v| v.key == key).collect();
                let losers: Vec<&Vote> = job.votes.iter().filter(|v| v.key != key).collect();
                // Agreement between distinct nodes is what proves a node; a receipt alone
                // proves who ran what, not that the output is right.
                let agreed = if winners.len() >= 2 {
                    Outcome::Agreed
                } else {
                    Outcome::Verified
                };
                for v in &winners {
                    self.registry.record(now.at, &v.node, agreed);
                    // A run's time says how fast the node is once another node has confirmed
                    // its fuel (the vote key holds it); a receipt alone could claim any fuel.
                    if let (Outcome::Agreed, Exit::Ok, Some(elapsed)) = (agreed, key.2, v.elapsed) {
                        self.registry.observe_run(&v.node, key.1, elapsed);
                    }
                }
                for v in &losers {
                    self.registry.record(now.at, &v.node, Outcome::Disputed);
                    self.unchecked.caught(v.node, fx);
                }
                if let [alone] = winners.as_slice() {
                    self.unchecked.remember(alone.node, task_id.clone());
                    if self.registry.blacklisted(&alone.node) {
                        // Caught while this task was still running.
                        self.unchecked.caught(alone.node, fx);
                    }
                }
                let n = winners.len() as u64;
                // A module the nodes refused before running it cost no work: nothing is paid.
                let each = if key.2 == Exit::Rejected {
                    0
                } else {
                    self.config.tariff.reward(key.1)
                };
                let each = match job.spec.max_fee {
                    Some(max) if each.saturating_mul(n) > max => max / n,
                    _ => each,
                };
                let payees: Vec<(NodeId, u64)> = winners.iter().map(|v| (v.node, each)).collect();
                let reward = payees.iter().map(|(_, a)| a).sum::<u64>();
                if reward > 0 {
                    fx.journal.push(Op::Settle {
                        task_id: task_id.clone(),
                        client: job.spec.client.clone(),
                        payees,
                    });
                }
                let first = winners[0];
                let status = if key.2 == Exit::Ok {
                    EventStatus::Completed
                } else {
                    EventStatus::Failed
                };
                let mut ev = TaskEvent::new(task_id.as_str(), status);
                if status == EventStatus::Completed {
                    ev.output_b64 = Some(B64.encode(&first.output));
                } else {
                    ev = ev.with_error(key.2.as_str(), first.message.clone());
                }
                ev.exit = Some(key.2.as_str().into());
                ev.exit_status = key.2.status();
                ev.receipts = winners
                    .iter()
                    .map(|v| ReceiptJson::from(&v.receipt))
                    .collect();
                ev.nodes = winners
                    .iter()
                    .map(|v| v.node.to_hex().to_string())
                    .collect();
                ev.reward = Some(reward);
                let mut spot_check_missed = None;
                if job.spot_check {
                    spot_check = Some(if !losers.is_empty() {
                        SpotCheck::Disagreed
                    } else if winners.len() >= 2 {
                        SpotCheck::Agreed
                    } else {
                        spot_check_missed = Some(job.spot_missed.clone().unwrap_or_else(|| {
                            "the run it was checking was lost; the check's result stands alone"
                                .into()
                        }));
                        SpotCheck::Missed
                    });
                }
                ev.verdict = Some(Verdict {
                    policy: job.policy.to_string(),
                    replicas: job.replicas,
                    agreeing: winners.len(),
                    spot_checked: job.spot_check,
                    spot_check_missed,
                    error_bound: Some(error_bound),
                    disputed: losers.iter().map(|v| v.node.to_hex().to_string()).collect(),
                });
                ev
            }
        };
        event.latency_ms = Some(latency_ms);
        let status = if event.status == EventStatus::Completed {
            TaskStatus::Completed
        } else {
            TaskStatus::Failed
        };
        if job.spot_check && spot_check.is_none() {
            // The task failed: no result to check.
            spot_check = Some(SpotCheck::Missed);
        }
        fx.outcomes.push(Ended {
            status,
            latency_ms,
            spot_check,
        });
        let json = event.to_json();
        fx.finished
            .insert(task_id.clone(), (job.fingerprint, fx.journal.len()));
        fx.journal.push(Op::Finish {
            task_id: task_id.clone(),
            status,
            result_json: String::from_utf8_lossy(&json).into_owned(),
            at_ms: now.unix_ms,
        });
        fx.event(task_id, json);
    }

    fn new_job(&mut self, mut spec: TaskSpec, fingerprint: Digest, now: Instant) -> Job {
        use rand::Rng;
        // Placement's view of the task's size; not journaled, so set for recovered tasks too.
        spec.requires.fuel = spec.limits.fuel;
        let policy = spec.policy.unwrap_or(self.config.default_policy);
        let (replicas, spot_check) = match policy {
            Policy::Replicate(k) => (k, false),
            Policy::Receipt | Policy::Target(_) => {
                let spot = self.rng.random_range(0..1000) < self.config.spot_check_permille;
                (if spot { 2 } else { 1 }, spot)
            }
        };
        Job {
            input_hash: sha3_256(&spec.input),
            policy,
            spec: Arc::new(spec),
            fingerprint,
            submitted: now,
            replicas,
            spot_check,
            spot_missed: None,
            next_attempt: 1,
            failures: 0,
            errors: Vec::new(),
            outstanding: Vec::new(),
            votes: Vec::new(),
            barred: Vec::new(),
            avoided: Vec::new(),
            queued_since: None,
            provisional: None,
            ticket: 0,
        }
    }
}

/// What resubmissions are compared by: the sha3-256 of the validated submission's JSON as
/// journaled, with a policy left to the coordinator (`"policy":null`) counted as `receipt`.
/// Journals written before the default became configurable recorded a submission with no
/// `verify` as `receipt`, and resubmitting it unchanged must still find it (so `receipt` named
/// and no `verify` count as the same submission). The key cannot occur inside a string value:
/// JSON escapes the quotes there.
fn fingerprint(spec_json: &str) -> Digest {
    const LEFT: &str = r#""policy":null"#;
    match spec_json.split_once(LEFT) {
        Some((head, tail)) => sha3_256(format!(r#"{head}"policy":"Receipt"{tail}"#).as_bytes()),
        None => sha3_256(spec_json.as_bytes()),
    }
}

/// How many nodes could vote on a task: the `votes` cast, the replicas still `running`, and
/// every other node able to run it (`voters`: the nodes that voted, run it or may not run it
/// again). O(n): only when replicas disagree.
fn electorate(
    registry: &Registry,
    now: Instant,
    spec: &TaskSpec,
    (votes, running): (usize, usize),
    voters: &[NodeId],
) -> usize {
    votes + running + registry.able(now, &spec.requires, voters)
}

/// The chance that the result `key` is wrong, from the doubt of each node that returned it and
/// of each that returned something else ([`result_doubt`]).
fn doubt_of(registry: &Registry, votes: &[Vote], key: (Digest, u64, Exit)) -> f64 {
    let doubt = |v: &Vote| registry.doubt(&v.node);
    let (agreeing, dissenting): (Vec<&Vote>, Vec<&Vote>) = votes.iter().partition(|v| v.key == key);
    result_doubt(
        agreeing.into_iter().map(doubt),
        dissenting.into_iter().map(doubt),
    )
}

/// The `Assign` frame for `attempt` of a task, addressed to `node` and signed by `identity`.
fn assignment(identity: &Identity, job: &Job, attempt: u16, node: NodeId) -> Publish {
    let spec = &job.spec;
    let entry = heapless::String::try_from(spec.entry.as_str()).unwrap_or_default();
    let mut a = Assignment {
        task_id: spec.task_id.clone(),
        attempt,
        module: spec.module,
        abi: spec.abi,
        entry,
        limits: spec.limits,
        input: &spec.input,
        coordinator: [0; 32],
        signature: [0; 64],
    };
    a.sign(identity, &node, &job.input_hash);
    let frame = Envelope::new(Message::Assign(a)).to_vec();
    Publish::reliable(topics::node(&node, NodeTopic::Tasks).as_str(), frame)
}

/// Publishes a `rejected` event on [`topics::REJECTED`], and on the task's own result topic
/// when a valid task id could be read.
fn reject(id: Option<String>, code: &str, message: String, fx: &mut Effects) {
    let valid = id.as_deref().and_then(TaskId::new);
    let json = TaskEvent::new(id.unwrap_or_default(), EventStatus::Rejected)
        .with_error(code, message)
        .to_json();
    if let Some(id) = valid {
        fx.event(&id, json.clone());
    }
    fx.events.push(Publish::reliable(topics::REJECTED, json));
}

fn generated_id(unix_ms: u64, n: u64) -> TaskId {
    let text = format!("t{unix_ms}-{n}");
    TaskId::new(&text).unwrap_or_else(|| TaskId::new("t").expect("static id is valid"))
}

/// The task id a submission names, read as far as the submission allows: from valid JSON, or
/// by scanning malformed JSON for `"task_id": "..."`, so a client can still be told.
fn submission_id(json: &[u8]) -> Option<String> {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) {
        return v.get("task_id")?.as_str().map(str::to_owned);
    }
    let text = String::from_utf8_lossy(json);
    let rest = &text[text.find("\"task_id\"")? + "\"task_id\"".len()..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let id = &rest[..rest.find('"')?];
    TaskId::new(id).map(|_| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Enrollment, RegistryConfig};
    use ambient_core::{
        Engine, Identity, Ping, Receipt, SafetyPolicy, ScoreConfig, SignedTelemetry, Telemetry,
        TelemetrySample, sign_message,
    };
    use std::cell::RefCell;
    use std::collections::HashSet;

    use crate::sim::{MODULE, announce_frame, report_frame, telemetry_frame};

    /// The journal in memory: what `Store::apply` would have committed.
    #[derive(Default)]
    struct Mem {
        tasks: RefCell<HashMap<TaskId, Known>>,
        paid: RefCell<HashMap<TaskId, Vec<(NodeId, u64)>>>,
        dispatches: RefCell<Vec<(TaskId, u16, NodeId)>>,
        pending: RefCell<Vec<([u8; 32], Vec<u8>)>>,
    }

    impl Journal for Mem {
        fn known(&self, task_id: &TaskId) -> Result<Option<Known>, StoreError> {
            Ok(self.tasks.borrow().get(task_id).cloned())
        }
    }

    impl Mem {
        fn commit(&self, ops: &[Op]) {
            for op in ops {
                match op {
                    Op::Insert(t) => {
                        self.tasks
                            .borrow_mut()
                            .entry(t.task_id.clone())
                            .or_insert(Known {
                                spec_json: t.spec_json.clone(),
                                result_json: None,
                            });
                    }
                    Op::Dispatch {
                        task_id,
                        attempt,
                        node,
                        ..
                    } => self
                        .dispatches
                        .borrow_mut()
                        .push((task_id.clone(), *attempt, *node)),
                    Op::Settle {
                        task_id, payees, ..
                    } => {
                        let mut paid = self.paid.borrow_mut();
                        assert!(!paid.contains_key(task_id), "{task_id} settled twice");
                        paid.insert(task_id.clone(), payees.clone());
                    }
                    Op::Finish {
                        task_id,
                        result_json,
                        ..
                    } => {
                        let mut tasks = self.tasks.borrow_mut();
                        let known = tasks.get_mut(task_id).expect("finished task was inserted");
                        assert!(known.result_json.is_none(), "{task_id} finished twice");
                        known.result_json = Some(result_json.clone());
                    }
                    Op::Pending {
                        public_key, frame, ..
                    } => self.pending.borrow_mut().push((*public_key, frame.clone())),
                    Op::PutModule { .. } | Op::SaveNodes { .. } => {}
                }
            }
        }

        fn recovered(&self) -> Recovered {
            let tasks = self.tasks.borrow();
            let mut unfinished: Vec<JournaledTask> = tasks
                .iter()
                .filter(|(_, k)| k.result_json.is_none())
                .map(|(id, k)| {
                    let dispatches: Vec<(u16, NodeId)> = self
                        .dispatches
                        .borrow()
                        .iter()
                        .filter(|(t, _, _)| t == id)
                        .map(|(_, a, n)| (*a, *n))
                        .collect();
                    JournaledTask {
                        task_id: id.clone(),
                        client: "anonymous".into(),
                        spec_json: k.spec_json.clone(),
                        attempts: dispatches.iter().map(|d| d.0).max().unwrap_or(0),
                        submitted_ms: 1,
                        dispatches,
                    }
                })
                .collect();
            unfinished.sort_by(|a, b| a.task_id.as_str().cmp(b.task_id.as_str()));
            Recovered {
                tasks: unfinished,
                modules: vec![sha3_256(MODULE)],
                finished: Vec::new(),
            }
        }
    }

    struct Fixture {
        d: Dispatcher,
        now: Now,
        nodes: Vec<Identity>,
        journal: Mem,
    }

    /// The coordinator's signing key in these tests.
    fn coordinator() -> Identity {
        Identity::from_secret(&[0xC0; 32])
    }

    fn registry() -> Registry {
        Registry::new(RegistryConfig {
            // Long enough that nodes stay live across the simulated timeouts below.
            liveness: Duration::from_secs(3600),
            score: ScoreConfig::default(),
            safety: SafetyPolicy::default(),
            enrollment: Enrollment::Open,
            // Every node proven from the start: tests of trust use `trusting` below.
            trust_after: 0,
            ..RegistryConfig::default()
        })
    }

    /// `n` nodes that must agree with others `trust_after` times before running unchecked.
    fn trusting(n: u8, trust_after: u32, spot_check_permille: u16) -> Fixture {
        let registry = Registry::new(RegistryConfig {
            liveness: Duration::from_secs(3600),
            trust_after,
            ..RegistryConfig::default()
        });
        fixture_in(
            registry,
            n,
            DispatchConfig {
                spot_check_permille,
                ..config()
            },
        )
    }

    fn config() -> DispatchConfig {
        DispatchConfig {
            spot_check_permille: 0,
            queue_timeout: Duration::from_secs(10),
            ..DispatchConfig::default()
        }
    }

    fn fixture(n: u8) -> Fixture {
        fixture_with(n, config())
    }

    fn fixture_with(n: u8, config: DispatchConfig) -> Fixture {
        fixture_in(registry(), n, config)
    }

    fn fixture_in(registry: Registry, n: u8, config: DispatchConfig) -> Fixture {
        let now = Now {
            at: Instant::now(),
            unix_ms: 1_700_000_000_000,
        };
        let d = Dispatcher::recover(
            config,
            registry,
            coordinator(),
            Recovered::default(),
            now,
            7,
        );
        let mut f = Fixture {
            d,
            now,
            nodes: Vec::new(),
            journal: Mem::default(),
        };
        for i in 1..=n {
            f.join(Identity::from_secret(&[i; 32]), "aarch64");
        }
        f
    }

    impl Fixture {
        /// One loop turn: handle, commit, return what was decided.
        fn step(&mut self, input: Input<'_>) -> Effects {
            let mut fx = Effects::default();
            self.d.handle(self.now, input, &self.journal, &mut fx);
            self.journal.commit(&fx.journal);
            fx
        }

        fn advance(&mut self, by: Duration) -> Effects {
            self.now.at += by;
            self.now.unix_ms += by.as_millis() as u64;
            self.step(Input::Tick)
        }

        fn join(&mut self, id: Identity, arch: &str) {
            let node = id.node_id();
            let i = self.nodes.len() as u32;
            self.frame(node, NodeTopic::Status, b"online");
            self.frame(node, NodeTopic::Announce, &announce_frame(&id, arch, 4));
            // Distinct latencies make the weighted order deterministic: node 0 is best.
            let sample = TelemetrySample {
                latency_us: Some(1_000 * (i + 1)),
                cpu_load_permille: Some(100),
                mem_free_bytes: Some(4 << 30),
                ..TelemetrySample::default()
            };
            self.frame(node, NodeTopic::Telemetry, &telemetry_frame(&id, 1, sample));
            self.nodes.push(id);
        }

        fn frame(&mut self, node: NodeId, leaf: NodeTopic, frame: &[u8]) -> Effects {
            self.step(Input::Frame { node, leaf, frame })
        }

        fn submit_json(&mut self, json: serde_json::Value) -> Effects {
            let bytes = json.to_string().into_bytes();
            self.step(Input::Submit(&bytes))
        }

        fn submit(&mut self, id: &str, verify: &str) -> Effects {
            self.submit_json(serde_json::json!({"task_id": id, "module_b64": B64.encode(MODULE), "input": "in", "verify": verify}))
        }

        fn identity(&self, node: NodeId) -> &Identity {
            self.nodes.iter().find(|i| i.node_id() == node).unwrap()
        }

        /// A report for (task, attempt) on `node`, signed by `signer`.
        fn report(
            &self,
            task: &str,
            sent: (NodeId, u16),
            output: &[u8],
            exit: Exit,
            signer: &Identity,
        ) -> Vec<u8> {
            self.report_claiming(task, sent, output, exit, signer, |_| {})
        }

        /// As [`Fixture::report`], with the receipt changed by `lie` before it is signed.
        fn report_claiming(
            &self,
            task: &str,
            (node, attempt): (NodeId, u16),
            output: &[u8],
            exit: Exit,
            signer: &Identity,
            lie: impl FnOnce(&mut Receipt),
        ) -> Vec<u8> {
            let mut receipt = Receipt {
                task_id: TaskId::new(task).unwrap(),
                attempt,
                node,
                module: sha3_256(MODULE),
                input: sha3_256(b"in"),
                output: sha3_256(output),
                fuel_used: 100,
                limits: ambient_core::Limits::default(),
                engine: Engine::Wasmtime,
                exit,
            };
            lie(&mut receipt);
            report_frame(signer, receipt, output)
        }

        fn answer(&mut self, task: &str, sent: (NodeId, u16), output: &[u8]) -> Effects {
            self.answer_with(task, sent, output, Exit::Ok)
        }

        fn answer_with(
            &mut self,
            task: &str,
            sent: (NodeId, u16),
            output: &[u8],
            exit: Exit,
        ) -> Effects {
            let frame = self.report(task, sent, output, exit, self.identity(sent.0));
            self.frame(sent.0, NodeTopic::Results, &frame)
        }

        /// The node's signed refusal of (task, attempt).
        fn refusal(&self, task: &str, (node, attempt): (NodeId, u16), why: Refusal) -> Vec<u8> {
            let task_id = TaskId::new(task).unwrap();
            let body = ReportBody::Refused(SignedRefusal::sign(
                self.identity(node),
                &task_id,
                attempt,
                &node,
                why,
            ));
            Envelope::new(Message::Report(Report {
                task_id,
                attempt,
                node,
                body,
            }))
            .to_vec()
        }
    }

    /// The assignments among `fx.dispatch`, as (node, attempt).
    fn assignments(fx: &Effects) -> Vec<(NodeId, u16)> {
        fx.dispatch
            .iter()
            .filter_map(|p| {
                let (node, leaf) = topics::parse_node(&p.topic)?;
                match (leaf, Envelope::decode(&p.payload).ok()?.message) {
                    (NodeTopic::Tasks, Message::Assign(a)) => Some((node, a.attempt)),
                    _ => None,
                }
            })
            .collect()
    }

    /// The task events among `fx.events` (notices are not task events).
    fn events(fx: &Effects) -> Vec<(String, TaskEvent)> {
        fx.events
            .iter()
            .filter(|p| p.topic != topics::NOTICES)
            .map(|p| (p.topic.clone(), serde_json::from_slice(&p.payload).unwrap()))
            .collect()
    }

    fn finals(fx: &Effects) -> Vec<TaskEvent> {
        events(fx)
            .into_iter()
            .filter(|(topic, e)| topic.ends_with("/result") && e.status.is_final())
            .map(|(_, e)| e)
            .collect()
    }

    fn error_message(ev: &TaskEvent) -> String {
        ev.error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default()
    }

    #[test]
    fn an_accepted_event_waits_for_the_commit_while_the_assignment_may_leave_at_once() {
        let mut f = fixture(1);
        let fx = f.submit("t0", "receipt");
        assert_eq!(assignments(&fx).len(), 1, "dispatch goes before the commit");
        assert!(matches!(
            fx.journal[..],
            [Op::PutModule { .. }, Op::Insert(_), Op::Dispatch { .. }]
        ));
        let evs = events(&fx);
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].1.status, EventStatus::Accepted);
        assert!(
            fx.dispatch.iter().all(|p| !p.topic.ends_with("/result")),
            "no task event leaves before the commit"
        );
    }

    #[test]
    fn a_verified_result_is_delivered_and_paid_once_and_its_replay_is_dropped() {
        let mut f = fixture(1);
        let sent = assignments(&f.submit("t1", "receipt"));
        assert_eq!(sent.len(), 1);
        let done = finals(&f.answer("t1", sent[0], b"out"));
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].status, EventStatus::Completed);
        assert_eq!(
            done[0].output_b64.as_deref(),
            Some(B64.encode(b"out").as_str())
        );
        assert!(finals(&f.answer("t1", sent[0], b"out")).is_empty());
        assert_eq!(f.d.dropped().stale_reports, 1);
        let paid = f.journal.paid.borrow();
        assert_eq!(paid[&TaskId::new("t1").unwrap()].len(), 1);
        assert_eq!(done[0].reward, Some(paid[&TaskId::new("t1").unwrap()][0].1));
    }

    #[test]
    fn every_assignment_is_signed_by_the_coordinator_for_its_node() {
        let mut f = fixture(2);
        let fx = f.submit("signed", "replicate:2");
        assert_eq!(assignments(&fx).len(), 2);
        for p in &fx.dispatch {
            let Some((node, NodeTopic::Tasks)) = topics::parse_node(&p.topic) else {
                continue;
            };
            let Message::Assign(a) = Envelope::decode(&p.payload).unwrap().message else {
                panic!("not an assignment");
            };
            assert_eq!(a.coordinator, coordinator().public_key());
            assert_eq!(a.verify(&node, &sha3_256(a.input)), Ok(()));
        }
    }

    #[test]
    fn a_report_forged_with_another_key_changes_nothing_and_the_real_one_is_accepted() {
        let mut f = fixture(2);
        let first = assignments(&f.submit("t2", "receipt"))[0];
        let forger = Identity::from_secret(&[0xEE; 32]);
        let forged = f.report("t2", first, b"forged", Exit::Ok, &forger);
        let refusal = {
            let mut honest = f.refusal("t2", first, Refusal::ModuleUnavailable);
            let n = honest.len();
            honest[n - 1] ^= 1;
            honest
        };
        for frame in [&forged, &refusal] {
            let fx = f.frame(first.0, NodeTopic::Results, frame);
            assert!(fx.dispatch.is_empty() && fx.events.is_empty(), "{fx:?}");
        }
        assert_eq!(f.d.dropped().unauthenticated, 2);
        let view = f.d.registry().view(f.now.at, &first.0).unwrap();
        assert_eq!(
            (view.reputation.disputed, view.reputation.failed),
            (0, 0),
            "nothing held against the node the forger named"
        );
        let done = finals(&f.answer("t2", first, b"out"));
        assert_eq!(done.len(), 1, "the attempt was still outstanding");
        assert_eq!(done[0].status, EventStatus::Completed);
    }

    #[test]
    fn a_receipt_the_node_signed_with_false_claims_is_a_dispute_and_the_task_moves_on() {
        let mut f = fixture(2);
        let first = assignments(&f.submit("t2b", "receipt"))[0];
        let signer = f.identity(first.0);
        let frame = f.report_claiming("t2b", first, b"out", Exit::Ok, signer, |r| {
            r.input = sha3_256(b"another input");
        });
        let next = assignments(&f.frame(first.0, NodeTopic::Results, &frame));
        assert_eq!(f.d.dropped().bad_receipts, 1);
        let view = f.d.registry().view(f.now.at, &first.0).unwrap();
        assert_eq!(view.reputation.disputed, 1);
        assert_eq!(next.len(), 1);
        assert_ne!(next[0].0, first.0, "retried on another node");
        assert_eq!(next[0].1, first.1 + 1, "with the next attempt number");
    }

    #[test]
    fn a_node_that_sent_a_bad_receipt_is_never_asked_again_for_that_task() {
        let mut f = fixture(1);
        let first = assignments(&f.submit("t2c", "receipt"))[0];
        let signer = f.identity(first.0);
        let frame = f.report_claiming("t2c", first, b"out", Exit::Ok, signer, |r| {
            r.fuel_used = u64::MAX;
        });
        assert!(assignments(&f.frame(first.0, NodeTopic::Results, &frame)).is_empty());
        assert_eq!(f.d.queued(), 1);
    }

    #[test]
    fn a_dispatch_that_times_out_is_reassigned_with_the_next_attempt() {
        let mut f = fixture(2);
        let first = assignments(&f.submit("t3", "receipt"))[0];
        let wait = Duration::from_millis(ambient_core::Limits::default().timeout_ms)
            + Duration::from_secs(16);
        let next = assignments(&f.advance(wait));
        assert_eq!(next.len(), 1);
        assert_ne!(next[0].0, first.0);
        // The slow node's answer to the old attempt now arrives: it is stale.
        assert!(finals(&f.answer("t3", first, b"out")).is_empty());
        assert_eq!(f.d.dropped().stale_reports, 1);
    }

    #[test]
    fn a_task_whose_attempts_all_time_out_fails_with_every_reason() {
        let mut f = fixture(1);
        let mut sent = assignments(&f.submit("loop", "receipt"))[0];
        let mut done = Vec::new();
        for round in 0..10 {
            let fx = f.answer_with("loop", sent, b"", Exit::TimedOut);
            done = finals(&fx);
            if !done.is_empty() {
                assert_eq!(round, 3, "max_failures 3: the fourth failure ends it");
                break;
            }
            let next = assignments(&fx);
            assert_eq!(next.len(), 1, "the only node is reused after a timeout");
            assert_eq!(next[0].0, sent.0);
            sent = next[0];
        }
        assert_eq!(done.len(), 1, "the task ended");
        assert_eq!(done[0].status, EventStatus::Failed);
        let message = error_message(&done[0]);
        assert!(message.starts_with("4 attempts failed"), "{message}");
        assert_eq!(message.matches("timed out on node").count(), 4, "{message}");
        assert_eq!(f.d.unfinished(), 0);
    }

    #[test]
    fn disagreeing_replicas_escalate_and_the_minority_is_disputed() {
        let mut f = fixture(5);
        let sent = assignments(&f.submit("t4", "replicate:2"));
        assert_eq!(sent.len(), 2, "two distinct nodes");
        assert_ne!(sent[0].0, sent[1].0);
        assert!(finals(&f.answer("t4", sent[0], b"right")).is_empty());
        let more = assignments(&f.answer("t4", sent[1], b"wrong"));
        assert_eq!(
            more.len(),
            3,
            "a 1-1 split escalates to five: four to one would decide"
        );
        assert!(finals(&f.answer("t4", more[0], b"right")).is_empty());
        assert!(
            finals(&f.answer("t4", more[1], b"right")).is_empty(),
            "3 to 1 is contested"
        );
        let done = finals(&f.answer("t4", more[2], b"right"));
        assert_eq!(done.len(), 1, "4 to 1 leads by three");
        let verdict = done[0].verdict.clone().unwrap();
        assert_eq!((verdict.replicas, verdict.agreeing), (5, 4));
        assert_eq!(verdict.disputed, vec![sent[1].0.to_hex().to_string()]);
        assert_eq!(
            f.journal.paid.borrow()[&TaskId::new("t4").unwrap()].len(),
            4
        );
    }

    /// Answers every assignment of `task` until it ends, each node with `answer(node, n)`
    /// where `n` counts the assignments so far; returns the final event.
    fn run_to_end(
        f: &mut Fixture,
        task: &str,
        verify: &str,
        mut answer: impl FnMut(NodeId, usize) -> &'static [u8],
    ) -> TaskEvent {
        let mut sent = assignments(&f.submit(task, verify));
        let mut n = 0;
        while let Some(s) = sent.pop() {
            let fx = f.answer(task, s, answer(s.0, n));
            n += 1;
            if let Some(done) = finals(&fx).pop() {
                return done;
            }
            sent.extend(assignments(&fx));
        }
        panic!("{task} did not end after {n} answers");
    }

    #[test]
    fn a_split_vote_in_a_pool_of_two_fails_at_once_naming_the_pool() {
        let mut f = fixture(2);
        let sent = assignments(&f.submit("pair", "replicate:2"));
        f.answer("pair", sent[0], b"x");
        let done = finals(&f.answer("pair", sent[1], b"y"));
        assert_eq!(
            done.len(),
            1,
            "no third node will come: no waiting out the queue"
        );
        let message = error_message(&done[0]);
        assert!(
            message.contains("only 2 nodes can run the task"),
            "{message}"
        );
    }

    #[test]
    fn in_a_pool_of_three_a_liar_is_outvoted_two_to_one() {
        let mut f = fixture(3);
        let sent = assignments(&f.submit("shelf", "replicate:2"));
        f.answer("shelf", sent[0], b"right");
        let third = assignments(&f.answer("shelf", sent[1], b"wrong"));
        assert_eq!(
            third.len(),
            1,
            "three nodes: a third replica is all there is"
        );
        let done = finals(&f.answer("shelf", third[0], b"right"));
        let verdict = done[0].verdict.clone().unwrap();
        assert_eq!((verdict.replicas, verdict.agreeing), (3, 2));
        assert_eq!(verdict.disputed, vec![sent[1].0.to_hex().to_string()]);
    }

    #[test]
    fn two_colluders_outvoting_an_honest_node_two_to_one_do_not_get_it_disputed() {
        let mut f = fixture(7);
        let mut colluders = Vec::new();
        let mut honest = Vec::new();
        // The first two runs disagree, the first escalation lands on a second colluder.
        let done = run_to_end(&mut f, "c", "replicate:2", |node, n| {
            if n == 0 || n == 2 {
                colluders.push(node);
                b"lie"
            } else {
                honest.push(node);
                b"right"
            }
        });
        assert_eq!(
            done.output_b64.as_deref(),
            Some(B64.encode(b"right").as_str())
        );
        let verdict = done.verdict.clone().unwrap();
        assert_eq!(
            (verdict.replicas, verdict.agreeing),
            (7, 5),
            "5 to 2 leads by three"
        );
        let mut disputed = verdict.disputed.clone();
        let mut liars: Vec<String> = colluders.iter().map(|c| c.to_hex().to_string()).collect();
        disputed.sort();
        liars.sort();
        assert_eq!(disputed, liars);
        for h in honest {
            let view = f.d.registry.view(f.now.at, &h).unwrap();
            assert_eq!(view.blacklisted_for_ms, None);
        }
    }

    #[test]
    fn a_vote_seven_replicas_can_no_longer_decide_fails_and_disputes_no_one() {
        let mut f = fixture(9);
        let done = run_to_end(&mut f, "split", "replicate:2", |_, n| {
            if n % 2 == 0 { b"a" } else { b"b" }
        });
        assert_eq!(done.status, EventStatus::Failed);
        let message = error_message(&done);
        assert!(message.contains("6 replicas disagreed"), "{message}");
        assert!(message.contains("within 7 replicas"), "{message}");
        assert!(f.journal.paid.borrow().is_empty(), "nothing paid");
        for n in &f.nodes {
            let view = f.d.registry.view(f.now.at, &n.node_id()).unwrap();
            assert_eq!(view.blacklisted_for_ms, None, "no one disputed");
        }
    }

    fn reputation(f: &Fixture, node: NodeId) -> ambient_core::Reputation {
        f.d.registry.view(f.now.at, &node).unwrap().reputation
    }

    #[test]
    fn a_new_nodes_receipt_tasks_are_checked_until_it_has_agreed_enough_times_in_a_row() {
        let mut f = trusting(2, 3, 0);
        for i in 0..3 {
            let id = format!("prove{i}");
            let sent = assignments(&f.submit(&id, "receipt"));
            assert_eq!(sent.len(), 2, "task {i}: an unproven node's run is checked");
            f.answer(&id, sent[0], b"same");
            let done = finals(&f.answer(&id, sent[1], b"same"));
            assert_eq!(done[0].verdict.as_ref().unwrap().agreeing, 2);
        }
        let sent = assignments(&f.submit("proven", "receipt"));
        assert_eq!(sent.len(), 1, "proven after 3 agreements: runs unchecked");
        assert_eq!(
            f.d.registry
                .view(f.now.at, &sent[0].0)
                .unwrap()
                .agreed_in_a_row,
            3
        );
    }

    #[test]
    fn under_an_error_rate_target_new_nodes_replicate_until_their_agreement_reaches_it() {
        let mut f = trusting(6, 40, 0);
        let mut answers = 0;
        let done = run_to_end(&mut f, "sure", "target:1e-3", |_, _| {
            answers += 1;
            b"same"
        });
        // Assumed one in five faulty: 2, 3 and 4 never-checked nodes agreeing leave 5.9e-2,
        // 1.5e-2 and 3.9e-3; five leave 9.7e-4.
        assert_eq!(answers, 5);
        let verdict = done.verdict.unwrap();
        assert_eq!(
            (verdict.agreeing, verdict.policy.as_str()),
            (5, "target:1e-3")
        );
        let bound = verdict.error_bound.unwrap();
        assert!(bound <= 1e-3 && bound > 9e-4, "{bound}");
    }

    #[test]
    fn under_an_error_rate_target_runs_per_task_fall_as_nodes_agree_until_one_runs_alone() {
        let mut f = trusting(3, 40, 0);
        let mut runs = Vec::new();
        for i in 0..12 {
            let mut n = 0;
            let done = run_to_end(&mut f, &format!("t{i}"), "target:1e-2", |_, _| {
                n += 1;
                b"same"
            });
            runs.push(n);
            let bound = done.verdict.unwrap().error_bound.unwrap();
            if i == 0 {
                // Three never-checked nodes leave 1.5e-2: the pool has no fourth, so the
                // result is accepted with the bound it reached, above the target.
                assert!(bound > 1e-2 && bound < 2e-2, "{bound}");
            } else {
                assert!(bound <= 1e-2, "task {i}: {bound}");
            }
        }
        assert_eq!(runs[0], 3, "{runs:?}");
        assert!(runs.windows(2).all(|w| w[1] <= w[0]), "{runs:?}");
        // Alone once 0.2 / (0.8 · k · e) ≤ 1e-2, k ≥ 10.
        assert_eq!(*runs.last().unwrap(), 1, "{runs:?}");
    }

    #[test]
    fn under_an_error_rate_target_a_result_two_nodes_agreed_on_stands_when_no_third_run_can_be_had()
    {
        let mut f = trusting(3, 40, 0);
        let sent = assignments(&f.submit("short", "target:1e-3"));
        assert_eq!(sent.len(), 2);
        f.answer("short", sent[0], b"same");
        let third = assignments(&f.answer("short", sent[1], b"same"));
        assert_eq!(
            third.len(),
            1,
            "two new nodes agreeing leave 5.9e-2: a third runs"
        );
        // The third node never answers: its run times out, and no other node is left.
        let mut done = Vec::new();
        for _ in 0..10 {
            done.extend(finals(&f.advance(Duration::from_secs(60))));
        }
        assert_eq!(done.len(), 1, "{done:?}");
        assert_eq!(done[0].status, EventStatus::Completed);
        let verdict = done[0].verdict.as_ref().unwrap();
        assert_eq!(verdict.agreeing, 2);
        assert!(
            verdict.error_bound.unwrap() > 1e-3,
            "the bound it reached, above the target"
        );
    }

    #[test]
    fn under_an_error_rate_target_a_lie_is_outvoted_and_its_node_disputed() {
        let mut f = trusting(7, 40, 0);
        let liar = f.nodes[0].node_id();
        let done = run_to_end(&mut f, "lie", "target:1e-2", |node, _| {
            if node == liar { b"wrong" } else { b"right" }
        });
        assert_eq!(
            done.output_b64.as_deref(),
            Some(B64.encode(b"right").as_str())
        );
        let verdict = done.verdict.unwrap();
        assert_eq!(verdict.disputed, vec![liar.to_hex().to_string()]);
        // A never-checked dissenter weighs: 4–1 leaves 1.9e-2, 5–1 4.9e-3.
        assert_eq!(verdict.agreeing, 5);
        assert!(verdict.error_bound.unwrap() <= 1e-2);
    }

    #[test]
    fn a_node_caught_lying_gets_a_notice_published_for_each_result_that_rested_on_it_alone() {
        let mut f = fixture(3);
        let sent = assignments(&f.submit("solo", "receipt"));
        let liar = sent[0].0;
        assert!(
            finals(&f.answer("solo", sent[0], b"wrong"))[0]
                .verdict
                .is_some()
        );
        let sent = assignments(&f.submit("vote", "replicate:3"));
        let mut notices = Vec::new();
        for s in sent {
            let out: &[u8] = if s.0 == liar { b"lie" } else { b"right" };
            let fx = f.answer("vote", s, out);
            notices.extend(
                fx.events
                    .iter()
                    .filter(|p| p.topic == topics::NOTICES)
                    .map(|p| serde_json::from_slice::<Notice>(&p.payload).unwrap()),
            );
        }
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert_eq!(notices[0].task_id, "solo");
        assert_eq!(notices[0].code, "suspect_result");
        assert_eq!(notices[0].node, liar.to_hex().to_string());
        // Told once: the list no longer holds it.
        let sent = assignments(&f.submit("again", "replicate:3"));
        for s in sent {
            let out: &[u8] = if s.0 == liar { b"lie" } else { b"right" };
            let fx = f.answer("again", s, out);
            assert!(fx.events.iter().all(|p| p.topic != topics::NOTICES));
        }
    }

    #[test]
    fn a_result_that_rests_on_a_node_caught_while_it_ran_gets_its_notice_at_once() {
        let mut f = fixture(3);
        let solo = assignments(&f.submit("solo", "receipt"))[0];
        let liar = solo.0;
        for s in assignments(&f.submit("vote", "replicate:3")) {
            let out: &[u8] = if s.0 == liar { b"lie" } else { b"right" };
            f.answer("vote", s, out);
        }
        assert!(f.d.registry.blacklisted(&liar));
        let fx = f.answer("solo", solo, b"out");
        assert_eq!(finals(&fx).len(), 1);
        let notices: Vec<Notice> = fx
            .events
            .iter()
            .filter(|p| p.topic == topics::NOTICES)
            .map(|p| serde_json::from_slice(&p.payload).unwrap())
            .collect();
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert_eq!(notices[0].task_id, "solo");
    }

    #[test]
    fn a_node_caught_with_a_wrong_result_is_blacklisted_and_starts_proving_again() {
        let mut f = trusting(5, 0, 1000);
        let liar = f.nodes[0].node_id();
        let sent = assignments(&f.submit("caught", "receipt"));
        assert_eq!(sent.len(), 2, "spot-checked");
        let (on_liar, on_other) = if sent[0].0 == liar {
            (sent[0], sent[1])
        } else {
            (sent[1], sent[0])
        };
        f.answer("caught", on_liar, b"wrong");
        let third = assignments(&f.answer("caught", on_other, b"right"));
        assert_eq!(third.len(), 3, "disagreement escalates");
        f.answer("caught", third[0], b"right");
        f.answer("caught", third[1], b"right");
        let done = finals(&f.answer("caught", third[2], b"right"));
        assert_eq!(
            done[0].output_b64.as_deref(),
            Some(B64.encode(b"right").as_str())
        );
        let view = f.d.registry.view(f.now.at, &liar).unwrap();
        assert_eq!(view.agreed_in_a_row, 0);
        assert_eq!(view.blacklisted_for_ms, Some(3_600_000));
        for i in 0..5 {
            let sent = assignments(&f.submit(&format!("after{i}"), "receipt"));
            assert!(
                sent.iter().all(|(node, _)| *node != liar),
                "no work for a blacklisted node"
            );
            for s in sent {
                f.answer(&format!("after{i}"), s, b"ok");
            }
        }
    }

    /// The measurement that opened the trust work: 4 honest nodes and 1 that answers every
    /// task at once with a validly signed receipt over a wrong output. With 5% random spot
    /// checks alone it had a third of 400 results accepted; proving every node first catches
    /// it on its first task.
    #[test]
    fn a_node_that_always_lies_gets_no_wrong_result_accepted() {
        let mut f = trusting(5, 10, 50);
        let liar = f.nodes[0].node_id();
        let mut wrong_accepted = 0;
        let mut executions = 0;
        for i in 0..400 {
            let id = format!("t{i}");
            let mut pending = assignments(&f.submit(&id, "receipt"));
            let mut done = Vec::new();
            while let Some(sent) = pending.pop() {
                executions += 1;
                let out: &[u8] = if sent.0 == liar { b"wrong" } else { b"right" };
                let fx = f.answer(&id, sent, out);
                pending.extend(assignments(&fx));
                done.extend(finals(&fx));
            }
            assert_eq!(done.len(), 1, "task {i} ended");
            if done[0].output_b64.as_deref() != Some(B64.encode(b"right").as_str()) {
                wrong_accepted += 1;
            }
        }
        println!(
            "400 tasks, 1 liar in 5: {wrong_accepted} wrong accepted, {executions} executions ({:.3}x)",
            f64::from(executions) / 400.0
        );
        assert_eq!(wrong_accepted, 0);
        // Each node's first 10 results are checked, then 5% at random.
        assert!(
            executions < 400 * 13 / 10,
            "{executions} executions for 400 tasks"
        );
        assert!(
            f.d.registry
                .view(f.now.at, &liar)
                .unwrap()
                .blacklisted_for_ms
                .is_some()
        );
    }

    #[test]
    fn a_late_replica_that_disagrees_with_a_decisive_majority_is_disputed() {
        let mut f = fixture(7);
        let sent = assignments(&f.submit("late7", "replicate:7"));
        assert_eq!(sent.len(), 7);
        for s in &sent[..3] {
            assert!(finals(&f.answer("late7", *s, b"right")).is_empty());
        }
        let done = finals(&f.answer("late7", sent[3], b"right"));
        assert_eq!(done.len(), 1, "four of seven is a majority: accepted");
        let before = reputation(&f, sent[4].0);
        assert!(finals(&f.answer("late7", sent[4], b"wrong")).is_empty());
        assert_eq!(
            reputation(&f, sent[4].0).disputed,
            before.disputed + 1,
            "4 to 1 leads by three: compared, not dropped as stale"
        );
        assert_eq!(f.d.dropped().stale_reports, 0);
        // The same report again is a duplicate: stale, and not held against the node twice.
        f.answer("late7", sent[4], b"wrong");
        assert_eq!(f.d.dropped().stale_reports, 1);
        assert_eq!(reputation(&f, sent[4].0).disputed, before.disputed + 1);
        // A second dissent leaves a lead of two: contested, let go.
        let before = reputation(&f, sent[5].0);
        f.answer("late7", sent[5], b"wrong");
        assert_eq!(reputation(&f, sent[5].0).disputed, before.disputed);
    }

    #[test]
    fn a_late_replica_outvoted_two_to_one_is_not_disputed() {
        let mut f = fixture(7);
        let sent = assignments(&f.submit("late3", "replicate:3"));
        f.answer("late3", sent[0], b"lie");
        let done = finals(&f.answer("late3", sent[1], b"lie"));
        assert_eq!(done.len(), 1, "two of three, unanimous so far: accepted");
        f.answer("late3", sent[2], b"right");
        let view = f.d.registry.view(f.now.at, &sent[2].0).unwrap();
        assert_eq!(view.reputation.disputed, 0);
        assert_eq!(view.blacklisted_for_ms, None);
    }

    #[test]
    fn a_late_replica_that_agrees_counts_as_verified_for_its_node() {
        let mut f = fixture(3);
        let sent = assignments(&f.submit("late-ok", "replicate:3"));
        f.answer("late-ok", sent[0], b"same");
        assert_eq!(finals(&f.answer("late-ok", sent[1], b"same")).len(), 1);
        let before = reputation(&f, sent[2].0);
        f.answer("late-ok", sent[2], b"same");
        let after = reputation(&f, sent[2].0);
        assert_eq!(after.verified, before.verified + 1);
        assert_eq!(after.disputed, before.disputed);
    }

    #[test]
    fn late_replicas_are_forgotten_once_they_can_no_longer_report() {
        let mut f = fixture(3);
        let sent = assignments(&f.submit("gone", "replicate:3"));
        f.answer("gone", sent[0], b"x");
        f.answer("gone", sent[1], b"x");
        assert_eq!(f.d.late.len(), 1);
        let wait = Duration::from_millis(ambient_core::Limits::default().timeout_ms)
            + config().dispatch_grace;
        f.advance(wait);
        assert!(f.d.late.is_empty(), "expired with its deadline");
        f.answer("gone", sent[2], b"y");
        assert_eq!(f.d.dropped().stale_reports, 1, "too late to compare: stale");
    }

    #[test]
    fn a_program_that_exits_with_a_status_fails_with_that_status_and_is_paid_for() {
        let mut f = fixture(1);
        let sent = assignments(&f.submit("exits", "receipt"))[0];
        let done = finals(&f.answer_with("exits", sent, b"", Exit::ExitStatus(3)));
        assert_eq!(done[0].status, EventStatus::Failed);
        assert_eq!(done[0].exit.as_deref(), Some("exit_status"));
        assert_eq!(done[0].exit_status, Some(3));
        assert_eq!(done[0].receipts[0].exit_status, Some(3));
        assert_eq!(done[0].error.as_ref().unwrap().code, "exit_status");
        assert!(
            f.journal
                .paid
                .borrow()
                .contains_key(&TaskId::new("exits").unwrap()),
            "the node did the work"
        );
    }

    #[test]
    fn a_module_the_node_refused_before_running_costs_the_client_nothing() {
        let mut f = fixture(1);
        let sent = assignments(&f.submit("refused", "receipt"))[0];
        let done = finals(&f.answer_with("refused", sent, b"", Exit::Rejected));
        assert_eq!(done[0].status, EventStatus::Failed);
        assert_eq!(done[0].reward, Some(0));
        assert!(
            !f.journal
                .paid
                .borrow()
                .contains_key(&TaskId::new("refused").unwrap())
        );
    }

    #[test]
    fn a_module_that_cannot_run_the_call_is_rejected_at_intake_and_never_journaled() {
        let mut f = fixture(1);
        let cases = [
            (
                B64.encode(MODULE),
                "classify",
                "module does not export a function `classify`",
            ),
            (B64.encode(b"(module)"), "run", "compile it first (wat2wasm"),
            (B64.encode(b"hello"), "run", "not WebAssembly"),
        ];
        for (i, (module, entry, why)) in cases.into_iter().enumerate() {
            let id = format!("bad-{i}");
            let fx = f.submit_json(
                serde_json::json!({"task_id": id, "module_b64": module, "entry": entry}),
            );
            let ev: Vec<_> = events(&fx);
            assert!(
                ev.iter().all(|(_, e)| e.status == EventStatus::Rejected),
                "{ev:?}"
            );
            let error = ev[0].1.error.as_ref().unwrap();
            assert_eq!(error.code, "bad_module");
            assert!(error.message.contains(why), "{}", error.message);
            assert!(
                fx.journal.is_empty() && fx.dispatch.is_empty(),
                "nothing kept, nothing run"
            );
        }
    }

    #[test]
    fn an_uploaded_module_that_cannot_run_is_not_stored_and_a_task_naming_it_hears_why() {
        let mut f = fixture(1);
        let bytes = b"\0asm\x01\0\0\0\x01\x04\x01\x60\0\0\x02\x0d\x01\x03env\x05abort\0\0";
        let hash = sha3_256(bytes);
        let fx = f.step(Input::Module { hash, bytes });
        assert!(fx.journal.is_empty());
        assert_eq!(f.d.dropped().bad_modules, 1);
        let fx = f.submit_json(
            serde_json::json!({"task_id": "uses-it", "module": hash.to_hex().as_str()}),
        );
        let ev = events(&fx);
        let error = ev[0].1.error.as_ref().unwrap();
        assert_eq!(error.code, "bad_module");
        assert!(error.message.contains("env.abort"), "{}", error.message);
    }

    #[test]
    fn an_unlisted_node_waits_for_approval_and_joins_with_its_stored_announce() {
        let listed = Identity::from_secret(&[1; 32]);
        let registry = Registry::new(RegistryConfig {
            enrollment: Enrollment::Allowlist(HashSet::from([listed.public_key()])),
            ..RegistryConfig::default()
        });
        let mut f = fixture_in(registry, 2, config());
        assert_eq!(f.d.registry().len(), 1);
        let pending = f.journal.pending.borrow().clone();
        let stranger = f.nodes[1].public_key();
        assert_eq!(pending.len(), 1, "the unlisted key waits for a verdict");
        assert_eq!(pending[0].0, stranger);

        f.step(Input::Verdict {
            public_key: stranger,
            admit: true,
            announce: Some(&pending[0].1),
        });
        assert_eq!(f.d.registry().len(), 2, "admitted with its stored announce");
        assert!(
            f.d.registry()
                .view(f.now.at, &NodeId::from_public_key(&stranger))
                .is_some()
        );
    }

    #[test]
    fn a_revoked_node_leaves_at_once_and_its_task_completes_elsewhere() {
        let mut f = fixture(2);
        let first = assignments(&f.submit("t-rev", "receipt"))[0];
        let key = f.identity(first.0).public_key();
        let fx = f.step(Input::Verdict {
            public_key: key,
            admit: false,
            announce: None,
        });
        let next = assignments(&fx);
        assert_eq!(next.len(), 1, "the task moves at once");
        assert_ne!(next[0].0, first.0);
        assert_eq!(f.d.registry().len(), 1);

        assert!(
            finals(&f.answer("t-rev", first, b"out")).is_empty(),
            "the revoked node's answer counts for nothing"
        );
        let done = finals(&f.answer("t-rev", next[0], b"out"));
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].status, EventStatus::Completed);
        assert_eq!(
            f.journal.paid.borrow()[&TaskId::new("t-rev").unwrap()],
            [(next[0].0, 1_000)],
            "only the node that ran it is paid"
        );
    }

    #[test]
    fn a_node_that_goes_offline_and_stays_silent_hands_its_tasks_to_another() {
        let mut f = fixture(2);
        let first = assignments(&f.submit("t5", "receipt"))[0];
        let fx = f.frame(first.0, NodeTopic::Status, b"offline");
        assert!(
            assignments(&fx).is_empty(),
            "an unsigned presence cancels nothing"
        );
        assert!(assignments(&f.advance(Duration::from_secs(9))).is_empty());
        let next = assignments(&f.advance(Duration::from_secs(1)));
        assert_eq!(
            next.len(),
            1,
            "silent for the offline grace: the task moves"
        );
        assert_ne!(next[0].0, first.0);
    }

    #[test]
    fn a_spot_check_whose_original_run_is_lost_completes_on_the_checks_receipt_alone() {
        let mut f = fixture_with(
            2,
            DispatchConfig {
                spot_check_permille: 1000,
                ..config()
            },
        );
        let sent = assignments(&f.submit("spot", "receipt"));
        assert_eq!(sent.len(), 2, "the run and its spot check");
        assert!(finals(&f.answer("spot", sent[1], b"out")).is_empty());
        // The other node dies mid-run; nothing else could take the check.
        f.frame(sent[0].0, NodeTopic::Status, b"offline");
        let done = finals(&f.advance(Duration::from_secs(10)));
        assert_eq!(
            done.len(),
            1,
            "not left waiting for a node that never comes"
        );
        assert_eq!(done[0].status, EventStatus::Completed);
        assert_eq!(done[0].nodes, vec![sent[1].0.to_hex().to_string()]);
        let verdict = done[0].verdict.as_ref().unwrap();
        assert!(verdict.spot_checked);
        assert!(
            verdict.spot_check_missed.is_some(),
            "the event says the check was missed"
        );
    }

    /// Two nodes of 4 slots, every receipt task spot-checked: four tasks fill both nodes, and
    /// node 0 finishes its four, so it is free while node 1 is still full.
    fn second_node_busy() -> (Fixture, Vec<(NodeId, u16)>) {
        let mut f = fixture_with(
            2,
            DispatchConfig {
                spot_check_permille: 1000,
                ..config()
            },
        );
        let mut on_second = Vec::new();
        for i in 0..4 {
            let id = format!("fill{i}");
            let sent = assignments(&f.submit(&id, "receipt"));
            assert_eq!(sent.len(), 2, "a run and its check");
            let (first, second) = if sent[0].0 == f.nodes[0].node_id() {
                (sent[0], sent[1])
            } else {
                (sent[1], sent[0])
            };
            assert!(finals(&f.answer(&id, first, b"out")).is_empty());
            on_second.push(second);
        }
        (f, on_second)
    }

    #[test]
    fn a_queued_check_is_placed_before_a_new_task_that_queued_earlier() {
        let mut f = fixture_with(
            1,
            DispatchConfig {
                spot_check_permille: 1000,
                ..config()
            },
        );
        f.join(Identity::from_secret(&[2; 32]), "riscv64");
        let (a, b) = (f.nodes[0].node_id(), f.nodes[1].node_id());
        // Node b's four slots taken by checks of runs node a has answered.
        let mut on_b = Vec::new();
        for i in 0..4 {
            let id = format!("fill{i}");
            let sent = assignments(&f.submit(&id, "receipt"));
            let run = |node| sent.iter().copied().find(|s| s.0 == node).unwrap();
            f.answer(&id, run(a), b"out");
            on_b.push((id, run(b)));
        }
        let fresh = f.submit_json(serde_json::json!({
            "task_id": "fresh", "module_b64": B64.encode(MODULE), "input": "in",
            "requires": {"arch": "riscv64"},
        }));
        assert!(
            assignments(&fresh).is_empty(),
            "only node b can run it, and b is full"
        );
        let late = assignments(&f.submit("late", "receipt"));
        assert_eq!(late, vec![(a, 1)], "its check waits for node b");
        let (id, sent) = &on_b[0];
        let next = assignments(&f.answer(id, *sent, b"out"));
        assert_eq!(
            next,
            vec![(b, 2)],
            "node b's free slot goes to the check, queued last: work started finishes first"
        );
    }

    #[test]
    fn a_spot_check_waits_for_a_distinct_busy_node_instead_of_being_dropped() {
        let (mut f, on_second) = second_node_busy();
        let sent = assignments(&f.submit("late", "receipt"));
        assert_eq!(sent, vec![(f.nodes[0].node_id(), 1)], "only node 0 is free");
        let fx = f.answer("late", sent[0], b"late-out");
        assert!(
            finals(&fx).is_empty(),
            "the verified run waits for its check rather than ending unchecked"
        );
        // Node 1 finishes one task: its free slot goes to the waiting check.
        let fx = f.answer("fill0", on_second[0], b"out");
        let check = assignments(&fx);
        assert_eq!(check, vec![(f.nodes[1].node_id(), 2)]);
        let done = finals(&f.answer("late", check[0], b"late-out"));
        assert_eq!(done.len(), 1);
        let verdict = done[0].verdict.as_ref().unwrap();
        assert_eq!(verdict.agreeing, 2, "checked on two distinct nodes");
        assert_eq!(verdict.spot_check_missed, None);
    }

    #[test]
    fn a_spot_check_that_finds_no_free_node_within_the_queue_timeout_ends_on_its_receipt_and_says_so()
     {
        let (mut f, _) = second_node_busy();
        let sent = assignments(&f.submit("late", "receipt"));
        assert!(finals(&f.answer("late", sent[0], b"late-out")).is_empty());
        let mut fx = f.advance(config().queue_timeout);
        let done = finals(&fx);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].task_id, "late");
        assert_eq!(done[0].status, EventStatus::Completed, "the receipt stands");
        let missed = done[0].verdict.as_ref().unwrap().spot_check_missed.clone();
        assert!(
            missed
                .as_deref()
                .is_some_and(|m| m.contains("no distinct node was free")),
            "{missed:?}"
        );
        let ended: Vec<Ended> = fx.outcomes.drain(..).collect();
        assert_eq!(
            ended.iter().map(|e| e.spot_check).collect::<Vec<_>>(),
            vec![Some(SpotCheck::Missed)],
            "counted as missed"
        );
    }

    #[test]
    fn a_nodes_speed_is_observed_from_runs_another_node_agreed_with_never_from_a_receipt_alone() {
        let mut f = fixture(3);
        let observed = |f: &Fixture, node: NodeId| {
            f.d.registry
                .view(f.now.at, &node)
                .unwrap()
                .observed_fuel_per_s
        };
        // 5·10^7 fuel answered 100 ms after the assignment.
        let answer = |f: &mut Fixture, task: &str, sent: (NodeId, u16)| {
            let frame = f.report_claiming(task, sent, b"out", Exit::Ok, f.identity(sent.0), |r| {
                r.fuel_used = 50_000_000
            });
            f.frame(sent.0, NodeTopic::Results, &frame)
        };
        // Alone, a receipt could claim any fuel: its time says nothing of the node's speed.
        let sent = assignments(&f.submit("alone", "receipt"));
        assert_eq!(sent.len(), 1);
        f.advance(Duration::from_millis(100));
        assert_eq!(finals(&answer(&mut f, "alone", sent[0])).len(), 1);
        assert_eq!(observed(&f, sent[0].0), None);
        // Two nodes agreeing on the output and the fuel: each one's time counts.
        let sent = assignments(&f.submit("pair", "replicate:2"));
        assert_eq!(sent.len(), 2);
        f.advance(Duration::from_millis(100));
        answer(&mut f, "pair", sent[0]);
        assert_eq!(finals(&answer(&mut f, "pair", sent[1])).len(), 1);
        for (node, _) in sent {
            assert_eq!(observed(&f, node), Some(500_000_000));
        }
    }

    #[test]
    fn a_spot_check_agreed_on_two_nodes_is_counted_as_agreed() {
        let mut f = fixture_with(
            2,
            DispatchConfig {
                spot_check_permille: 1000,
                ..config()
            },
        );
        let sent = assignments(&f.submit("both", "receipt"));
        assert!(finals(&f.answer("both", sent[0], b"out")).is_empty());
        let fx = f.answer("both", sent[1], b"out");
        assert_eq!(finals(&fx).len(), 1);
        assert_eq!(fx.outcomes.len(), 1);
        assert_eq!(fx.outcomes[0].spot_check, Some(SpotCheck::Agreed));
        assert_eq!(fx.outcomes[0].status, TaskStatus::Completed);
    }

    #[test]
    fn a_spot_check_never_returns_to_a_node_that_timed_out_and_the_receipt_stands() {
        let mut f = fixture_with(
            2,
            DispatchConfig {
                spot_check_permille: 1000,
                ..config()
            },
        );
        let sent = assignments(&f.submit("check", "receipt"));
        assert_eq!(sent.len(), 2);
        assert!(finals(&f.answer("check", sent[1], b"out")).is_empty());
        // The other node never answers: its attempt times out.
        let wait = Duration::from_millis(ambient_core::Limits::default().timeout_ms)
            + Duration::from_secs(16);
        let fx = f.advance(wait);
        assert!(
            assignments(&fx).is_empty(),
            "the check is not sent back to the node that timed out"
        );
        let done = finals(&fx);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].status, EventStatus::Completed);
        assert_eq!(done[0].nodes, vec![sent[1].0.to_hex().to_string()]);
    }

    #[test]
    fn a_spoofed_offline_is_disproved_by_the_nodes_telemetry_and_its_task_completes() {
        let mut f = fixture(2);
        let first = assignments(&f.submit("t5b", "receipt"))[0];
        f.frame(first.0, NodeTopic::Status, b"offline");
        let telemetry = Telemetry {
            node: first.0,
            seq: 2,
            boot_id: 1,
            sample: TelemetrySample::default(),
        };
        let signature =
            sign_message(f.identity(first.0), SignedTelemetry::TAG, &telemetry).unwrap();
        let frame = Envelope::new(Message::Telemetry(SignedTelemetry {
            telemetry,
            signature,
        }))
        .to_vec();
        f.frame(first.0, NodeTopic::Telemetry, &frame);
        assert!(assignments(&f.advance(Duration::from_secs(20))).is_empty());
        let view = f.d.registry().view(f.now.at, &first.0).unwrap();
        assert_eq!(view.reputation.failed, 0);
        let done = finals(&f.answer("t5b", first, b"out"));
        assert_eq!(done[0].status, EventStatus::Completed);
    }

    #[test]
    fn a_task_no_node_can_take_fails_after_the_queue_timeout_naming_the_requirement() {
        let mut f = fixture(2);
        let fx = f.submit_json(serde_json::json!({"task_id": "sparc", "module_b64": B64.encode(MODULE), "requires": {"arch": "sparc"}}));
        assert_eq!(
            events(&fx)[0].1.status,
            EventStatus::Accepted,
            "nodes may still join"
        );
        assert!(assignments(&fx).is_empty());
        // Node traffic re-tries the queue; it must not restart the clock.
        for _ in 0..9 {
            assert!(finals(&f.advance(Duration::from_secs(1))).is_empty());
            f.frame(f.nodes[0].node_id(), NodeTopic::Status, b"online");
        }
        let done = finals(&f.advance(Duration::from_secs(1)));
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].status, EventStatus::Failed);
        let message = error_message(&done[0]);
        assert!(
            message.contains("no registered node has arch \"sparc\""),
            "{message}"
        );
        assert!(
            message.contains("aarch64"),
            "names what is registered: {message}"
        );
    }

    #[test]
    fn replicas_above_the_node_count_fail_naming_the_count() {
        let mut f = fixture(3);
        let sent = assignments(&f.submit("seven", "replicate:7"));
        assert_eq!(sent.len(), 3);
        for s in sent {
            assert!(finals(&f.answer("seven", s, b"same")).is_empty());
        }
        let done = finals(&f.advance(Duration::from_secs(11)));
        assert_eq!(done.len(), 1);
        let message = error_message(&done[0]);
        assert!(
            message.contains("needs 7 distinct nodes and 3"),
            "{message}"
        );
        assert!(
            f.journal.paid.borrow().is_empty(),
            "no majority of 7, nothing paid"
        );
    }

    #[test]
    fn a_task_queued_behind_one_no_node_can_take_is_still_placed() {
        let mut f = fixture(1);
        f.submit_json(serde_json::json!({"task_id": "sparc", "module_b64": B64.encode(MODULE), "requires": {"arch": "sparc"}}));
        let sent = assignments(&f.submit("after", "receipt"));
        assert_eq!(sent.len(), 1);
    }

    #[test]
    fn the_same_task_id_with_the_same_content_is_answered_with_where_it_stands() {
        let mut f = fixture(1);
        let sent = assignments(&f.submit("dup", "receipt"))[0];
        let again = f.submit("dup", "receipt");
        assert!(assignments(&again).is_empty(), "not run twice");
        assert!(again.journal.is_empty());
        assert_eq!(events(&again)[0].1.status, EventStatus::Accepted);
        let done = finals(&f.answer("dup", sent, b"out"));
        let after = f.submit("dup", "receipt");
        assert_eq!(
            finals(&after),
            done,
            "a finished task answers with its stored result"
        );
    }

    #[test]
    fn a_resubmission_in_the_same_turn_as_its_result_gets_that_result() {
        let mut f = fixture(1);
        let sent = assignments(&f.submit("same-turn", "receipt"))[0];
        let report = f.report("same-turn", sent, b"out", Exit::Ok, f.identity(sent.0));
        let json = serde_json::json!({"task_id": "same-turn", "module_b64": B64.encode(MODULE), "input": "in", "verify": "receipt"}).to_string();
        let mut fx = Effects::default();
        f.d.handle(
            f.now,
            Input::Frame {
                node: sent.0,
                leaf: NodeTopic::Results,
                frame: &report,
            },
            &f.journal,
            &mut fx,
        );
        f.d.handle(f.now, Input::Submit(json.as_bytes()), &f.journal, &mut fx);
        let done = finals(&fx);
        assert_eq!(done.len(), 2);
        assert_eq!(done[0], done[1]);
    }

    #[test]
    fn the_same_task_id_with_other_content_is_rejected_as_a_conflict() {
        let mut f = fixture(1);
        let sent = assignments(&f.submit("c", "receipt"))[0];
        let check = |fx: &Effects| {
            let evs = events(fx);
            assert!(
                evs.iter().any(|(t, e)| t.ends_with("/c/result")
                    && e.status == EventStatus::Rejected
                    && e.error.as_ref().unwrap().code == "conflict"),
                "{evs:?}"
            );
            assert!(fx.journal.is_empty() && assignments(fx).is_empty());
        };
        check(&f.submit("c", "replicate:2"));
        f.answer("c", sent, b"out");
        check(&f.submit("c", "replicate:2"));
    }

    #[test]
    fn a_task_journaled_before_the_default_policy_was_configurable_is_found_by_its_resubmission() {
        let mut f = fixture(1);
        let json =
            serde_json::json!({"task_id": "old", "module_b64": B64.encode(MODULE), "input": "in"});
        let sent = assignments(&f.submit_json(json.clone()))[0];
        f.answer("old", sent, b"out");
        // What an older coordinator journaled for a submission with no `verify`.
        for known in f.journal.tasks.borrow_mut().values_mut() {
            assert!(
                known.spec_json.contains(r#""policy":null"#),
                "{}",
                known.spec_json
            );
            known.spec_json = known
                .spec_json
                .replace(r#""policy":null"#, r#""policy":"Receipt""#);
        }
        let evs = events(&f.submit_json(json));
        let statuses: Vec<EventStatus> = evs.iter().map(|(_, e)| e.status).collect();
        assert_eq!(
            statuses,
            [EventStatus::Accepted, EventStatus::Completed],
            "the stored result, not a conflict"
        );
        // A different policy is still different content.
        let other = serde_json::json!({"task_id": "old", "module_b64": B64.encode(MODULE), "input": "in", "verify": "target:1e-4"});
        let evs = events(&f.submit_json(other));
        assert_eq!(evs[0].1.status, EventStatus::Rejected, "{evs:?}");
    }

    #[test]
    fn malformed_json_is_rejected_on_the_rejected_topic_with_the_id_it_could_read() {
        let mut f = fixture(1);
        let fx = f.step(Input::Submit(br#"{"task_id": "half", "module": "#));
        let evs = events(&fx);
        assert_eq!(evs.len(), 2, "{evs:?}");
        assert_eq!(evs[0].0, "ambient/v1/tasks/half/result");
        assert_eq!(evs[1].0, topics::REJECTED);
        assert_eq!(evs[1].1.task_id, "half");
        assert_eq!(evs[1].1.error.as_ref().unwrap().code, "bad_json");
        let fx = f.step(Input::Submit(b"\xff not json at all"));
        let evs = events(&fx);
        assert_eq!(evs.len(), 1);
        assert_eq!(
            (evs[0].0.as_str(), evs[0].1.task_id.as_str()),
            (topics::REJECTED, "")
        );
    }

    #[test]
    fn a_reconnect_sends_every_outstanding_assignment_and_module_again() {
        let mut f = fixture(2);
        let mut sent = assignments(&f.submit("r1", "receipt"));
        sent.extend(assignments(&f.submit("r2", "replicate:2")));
        let fx = f.step(Input::Connected);
        let mut again = assignments(&fx);
        sent.sort();
        again.sort();
        assert_eq!(again, sent);
        assert_eq!(fx.modules, vec![sha3_256(MODULE)]);
        assert!(fx.journal.is_empty(), "nothing new to journal");
    }

    #[test]
    fn a_busy_refusal_is_not_a_failure_and_the_node_rests_until_it_reports_again() {
        let mut f = fixture(1);
        let sent = assignments(&f.submit("busy", "receipt"))[0];
        let refusal = f.refusal("busy", sent, Refusal::Busy);
        for _ in 0..5 {
            let fx = f.frame(sent.0, NodeTopic::Results, &refusal);
            assert!(finals(&fx).is_empty(), "busy refusals do not fail the task");
            assert!(assignments(&fx).is_empty(), "the busy node rests");
        }
        // Its next sample makes it available again, and the task goes out.
        let telemetry = Telemetry {
            node: sent.0,
            seq: 2,
            boot_id: 1,
            sample: TelemetrySample {
                latency_us: Some(1_000),
                mem_free_bytes: Some(4 << 30),
                ..TelemetrySample::default()
            },
        };
        let signature = sign_message(&f.nodes[0], SignedTelemetry::TAG, &telemetry).unwrap();
        let frame = Envelope::new(Message::Telemetry(SignedTelemetry {
            telemetry,
            signature,
        }))
        .to_vec();
        let fx = f.frame(sent.0, NodeTopic::Telemetry, &frame);
        assert_eq!(
            assignments(&fx),
            vec![(sent.0, sent.1 + 1)],
            "placed once the node reported"
        );
    }

    #[test]
    fn a_node_coming_back_online_gets_its_outstanding_assignments_again() {
        let mut f = fixture(2);
        let sent = assignments(&f.submit("back", "receipt"))[0];
        let fx = f.frame(sent.0, NodeTopic::Status, b"online");
        assert_eq!(assignments(&fx), vec![sent]);
        let other = f
            .nodes
            .iter()
            .map(Identity::node_id)
            .find(|n| *n != sent.0)
            .unwrap();
        assert!(assignments(&f.frame(other, NodeTopic::Status, b"online")).is_empty());
    }

    #[test]
    fn recovered_dispatches_are_sent_again_under_their_attempt_numbers_and_their_reports_count() {
        let mut f = fixture(1);
        let sent = assignments(&f.submit("crash", "receipt"))[0];
        // The coordinator dies here: the journal has the task and its dispatch.
        let mut d = Dispatcher::recover(
            config(),
            registry(),
            coordinator(),
            f.journal.recovered(),
            f.now,
            1,
        );
        std::mem::swap(&mut f.d, &mut d);
        let ids = std::mem::take(&mut f.nodes);
        for id in ids {
            f.join(id, "aarch64");
        }
        assert_eq!(f.d.unfinished(), 1);
        let fx = f.step(Input::Connected);
        assert_eq!(assignments(&fx), vec![sent], "same node, same attempt");
        let done = finals(&f.answer("crash", sent, b"out"));
        assert_eq!(
            done.len(),
            1,
            "the report of the adopted attempt is not stale"
        );
        assert_eq!(done[0].status, EventStatus::Completed);
        assert_eq!(f.journal.paid.borrow().len(), 1);
    }

    #[test]
    fn final_events_finished_just_before_a_crash_are_published_again_once() {
        let now = Now {
            at: Instant::now(),
            unix_ms: 1,
        };
        let id = TaskId::new("done").unwrap();
        let recovered = Recovered {
            finished: vec![(
                id.clone(),
                "{\"task_id\":\"done\",\"status\":\"completed\"}".into(),
            )],
            ..Recovered::default()
        };
        let mut d = Dispatcher::recover(config(), registry(), coordinator(), recovered, now, 1);
        let mut fx = Effects::default();
        d.handle(now, Input::Connected, &Mem::default(), &mut fx);
        assert_eq!(fx.events.len(), 1);
        assert_eq!(fx.events[0].topic, topics::task_result(&id).as_str());
        fx.clear();
        d.handle(now, Input::Connected, &Mem::default(), &mut fx);
        assert!(fx.events.is_empty(), "only after the restart");
    }

    #[test]
    fn a_ping_is_answered_with_its_nonce_signed_only_on_its_own_node_topic() {
        let node = Identity::from_secret(&[1; 32]).node_id();
        let other = Identity::from_secret(&[2; 32]).node_id();
        let frame = Envelope::new(Message::Ping(Ping {
            node,
            nonce: 42,
            padding: &[0; 8],
        }))
        .to_vec();
        let me = coordinator();
        let p = pong(&me, node, NodeTopic::Telemetry, &frame).unwrap();
        assert_eq!(p.topic, topics::node(&node, NodeTopic::Tasks).as_str());
        let Message::Pong(answer) = Envelope::decode(&p.payload).unwrap().message else {
            panic!("not a pong");
        };
        assert_eq!(answer.nonce, 42);
        assert_eq!(answer.coordinator, me.public_key());
        assert_eq!(answer.verify(&node), Ok(()));
        assert_eq!(pong(&me, other, NodeTopic::Telemetry, &frame), None);
        assert_eq!(pong(&me, node, NodeTopic::Results, &frame), None);
    }
}
