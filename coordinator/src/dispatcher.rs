//! The coordinator's decisions: intake, placement, retries, verification, settlement, delivery.
//!
//! The dispatcher is synchronous and owns all state. It takes inputs (a submission, a frame
//! from a node, the passage of time) and returns the MQTT publishes to make; the service
//! does the sending. It writes the journal and ledger itself, because a task must be durable
//! before it is acknowledged and a settlement durable before the result is delivered.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambient_core::topics::{self, NodeTopic};
use ambient_core::{
    Assignment, Digest, Envelope, Exit, Expected, Message, NodeId, Pong, Quorum, Refusal, Report,
    ReportBody, SignedReceipt, Tariff, TaskId, quorum, sha3_256, verify_receipt,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tracing::{debug, info, warn};

use crate::intake::{self, MAX_REPLICAS, Policy, TaskSpec};
use crate::results::{EventStatus, ReceiptJson, TaskEvent, Verdict};
use crate::store::{Inserted, NewTask, Settlement, Store, StoreError, TaskStatus};
use crate::{Outcome, Registry, Strategy};

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

/// Tunables of the dispatcher.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// Strategy for tasks that name none.
    pub default_strategy: Strategy,
    /// Pricing of verified work.
    pub tariff: Tariff,
    /// Share of `receipt` tasks re-run on a second node as a spot check, in permille.
    pub spot_check_permille: u16,
    /// Dispatches of one task that may fail (time out, be refused, fail verification) before it fails.
    pub max_failures: u16,
    /// Added to a task's own time limit to allow for module fetch and transit.
    pub dispatch_grace: Duration,
    /// How long a task may wait for an eligible node before it fails.
    pub queue_timeout: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            default_strategy: Strategy::Weighted,
            tariff: Tariff::default(),
            spot_check_permille: 50,
            max_failures: 3,
            dispatch_grace: Duration::from_secs(15),
            queue_timeout: Duration::from_secs(60),
        }
    }
}

/// Counts of inputs that were dropped, for logs and `ambient nodes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Dropped {
    /// Frames that did not decode.
    pub malformed: u64,
    /// Frames from nodes the registry does not know or refused.
    pub unknown_node: u64,
    /// Reports for tasks already finished, or attempts not outstanding (replays, duplicates).
    pub stale_reports: u64,
    /// Receipts that failed verification.
    pub bad_receipts: u64,
    /// Module uploads whose bytes did not match their topic hash.
    pub bad_modules: u64,
}

/// One outstanding placement; its deadline lives in `Dispatcher::deadlines`.
struct Dispatch {
    attempt: u16,
    node: NodeId,
}

struct Vote {
    node: NodeId,
    key: (Digest, u64, Exit),
    output: Vec<u8>,
    receipt: SignedReceipt,
    message: String,
}

struct Job {
    spec: Arc<TaskSpec>,
    input_hash: Digest,
    submitted: Instant,
    replicas: usize,
    spot_check: bool,
    next_attempt: u16,
    failures: u16,
    last_error: Option<String>,
    outstanding: Vec<Dispatch>,
    votes: Vec<Vote>,
    tried: Vec<NodeId>,
    queued_since: Option<Instant>,
}

impl Job {
    fn wanted(&self) -> usize {
        self.replicas
            .saturating_sub(self.votes.len() + self.outstanding.len())
    }
}

/// The dispatcher: see the module docs.
pub struct Dispatcher {
    config: DispatchConfig,
    registry: Registry,
    store: Store,
    jobs: HashMap<TaskId, Job>,
    /// Tasks waiting for an eligible node, oldest first.
    queue: VecDeque<TaskId>,
    /// Dispatch deadlines, earliest first; entries for settled attempts are skipped lazily.
    deadlines: BinaryHeap<Reverse<(Instant, TaskId, u16)>>,
    modules: HashSet<Digest>,
    dropped: Dropped,
    next_id: u64,
    rng: rand::rngs::StdRng,
    started: Instant,
}

/// Why the dispatcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The journal could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Dispatcher {
    /// Builds the dispatcher over an open store, recovering every unfinished task from the
    /// journal. Recovered tasks get fresh attempt numbers, so reports for attempts made before
    /// the restart are recognised as stale.
    ///
    /// # Errors
    /// When the journal cannot be read.
    pub fn new(
        config: DispatchConfig,
        registry: Registry,
        store: Store,
        now: Instant,
    ) -> Result<Self, DispatchError> {
        use rand::SeedableRng;
        let modules = store.module_hashes()?.into_iter().collect();
        let mut d = Self {
            config,
            registry,
            store,
            jobs: HashMap::new(),
            queue: VecDeque::new(),
            deadlines: BinaryHeap::new(),
            modules,
            dropped: Dropped::default(),
            next_id: 0,
            rng: rand::rngs::StdRng::from_os_rng(),
            started: now,
        };
        for t in d.store.unfinished_tasks()? {
            match serde_json::from_str::<TaskSpec>(&t.spec_json) {
                Ok(spec) => {
                    let mut job = d.new_job(spec, now);
                    job.next_attempt = t.attempts.saturating_add(1);
                    d.queue.push_back(job.spec.task_id.clone());
                    d.jobs.insert(job.spec.task_id.clone(), job);
                }
                Err(e) => {
                    warn!(task = %t.task_id, error = %e, "journaled task cannot be decoded; skipped")
                }
            }
        }
        if !d.jobs.is_empty() {
            info!(
                tasks = d.jobs.len(),
                "recovered unfinished tasks from the journal"
            );
        }
        Ok(d)
    }

    /// Publishes that re-establish state on a (possibly new) broker: every stored module, retained.
    pub fn on_connected(&mut self) -> Vec<Publish> {
        let mut out = Vec::new();
        for hash in &self.modules {
            match self.store.module(hash) {
                Ok(Some(bytes)) => out.push(Publish {
                    topic: topics::module(hash).to_string(),
                    payload: bytes,
                    retain: true,
                    reliable: true,
                }),
                Ok(None) => {}
                Err(e) => warn!(module = %hash, error = %e, "stored module cannot be read"),
            }
        }
        out
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

    /// Handles a batch of submissions: validates each, journals the valid ones in one
    /// transaction (one fsync), and only then acknowledges them.
    pub fn on_submissions(&mut self, now: Instant, batch: &[Vec<u8>]) -> Vec<Publish> {
        let mut out = Vec::new();
        let mut accepted = Vec::new();
        for json in batch {
            let next = &mut self.next_id;
            let started = self.started;
            let modules = &self.modules;
            let parsed = intake::parse(
                json,
                |h| modules.contains(h),
                || {
                    *next += 1;
                    generated_id(started, now, *next)
                },
            );
            match parsed {
                Ok(p) => {
                    if let Some(bytes) = p.inline_module {
                        out.extend(self.store_module(p.spec.module, bytes));
                    }
                    accepted.push(p.spec);
                }
                Err(r) => {
                    // A rejection can only be delivered to a task id's topic; without a valid
                    // id there is nowhere to answer, so it is counted and logged.
                    let Some(id) = submission_id(json).and_then(|id| TaskId::new(&id)) else {
                        self.dropped.malformed += 1;
                        warn!(
                            code = r.code,
                            "submission without a valid task_id rejected: {}", r.message
                        );
                        continue;
                    };
                    debug!(task = %id, code = r.code, "submission rejected");
                    let event = TaskEvent::new(id.as_str(), EventStatus::Rejected)
                        .with_error(r.code, r.message);
                    out.push(Publish::reliable(
                        topics::task_result(&id).as_str(),
                        event.to_json(),
                    ));
                }
            }
        }
        if accepted.is_empty() {
            return out;
        }
        let rows: Vec<NewTask> = accepted
            .iter()
            .map(|s| NewTask {
                task_id: s.task_id.clone(),
                client: s.client.clone(),
                spec_json: serde_json::to_string(s).unwrap_or_default(),
                submitted_ms: unix_ms(),
            })
            .collect();
        let inserted = match self.store.insert_tasks(&rows) {
            Ok(i) => i,
            Err(e) => {
                // Not journaled, so not acknowledged: tell the clients to retry.
                warn!(error = %e, "journal write failed; rejecting the batch");
                for s in &accepted {
                    let ev = TaskEvent::new(s.task_id.as_str(), EventStatus::Rejected).with_error(
                        "journal_unavailable",
                        format!("the coordinator could not journal the task ({e}); resubmit later"),
                    );
                    out.push(Publish::reliable(
                        topics::task_result(&s.task_id).as_str(),
                        ev.to_json(),
                    ));
                }
                return out;
            }
        };
        for (spec, ins) in accepted.into_iter().zip(inserted) {
            let topic = topics::task_result(&spec.task_id);
            out.push(Publish::reliable(
                topic.as_str(),
                TaskEvent::new(spec.task_id.as_str(), EventStatus::Accepted).to_json(),
            ));
            if matches!(ins, Inserted::Duplicate) || self.jobs.contains_key(&spec.task_id) {
                // Idempotent resubmission: the first copy is already running or finished.
                if let Ok(Some(row)) = self.store.task(&spec.task_id)
                    && let Some(result) = row.result_json
                {
                    out.push(Publish::reliable(topic.as_str(), result.into_bytes()));
                }
                continue;
            }
            let job = self.new_job(spec, now);
            let id = job.spec.task_id.clone();
            self.jobs.insert(id.clone(), job);
            self.pump(now, &id, &mut out);
        }
        out
    }

    /// Handles a module upload on `ambient/v1/modules/{hash}`.
    pub fn on_module(&mut self, hash: Digest, bytes: Vec<u8>) {
        if bytes.is_empty() || self.modules.contains(&hash) {
            return;
        }
        if sha3_256(&bytes) != hash {
            self.dropped.bad_modules += 1;
            warn!(module = %hash, "module upload does not match its topic's hash; ignored");
            return;
        }
        if let Err(e) = self.store.put_module(&hash, &bytes) {
            warn!(module = %hash, error = %e, "module could not be stored");
            return;
        }
        self.modules.insert(hash);
    }

    fn store_module(&mut self, hash: Digest, bytes: Vec<u8>) -> Option<Publish> {
        if self.modules.contains(&hash) {
            return None;
        }
        if let Err(e) = self.store.put_module(&hash, &bytes) {
            warn!(module = %hash, error = %e, "module could not be stored");
        }
        self.modules.insert(hash);
        Some(Publish {
            topic: topics::module(&hash).to_string(),
            payload: bytes,
            retain: true,
            reliable: true,
        })
    }

    /// Handles a frame on a node topic.
    pub fn on_node_frame(
        &mut self,
        now: Instant,
        node: NodeId,
        leaf: NodeTopic,
        frame: &[u8],
    ) -> Vec<Publish> {
        let mut out = Vec::new();
        if leaf == NodeTopic::Status {
            let online = frame == b"online";
            self.registry.on_status(now, node, online);
            if !online {
                self.reassign_from(now, node, "node went offline", &mut out);
            } else {
                self.pump_queue(now, &mut out);
            }
            return out;
        }
        let envelope = match Envelope::decode(frame) {
            Ok(e) => e,
            Err(e) => {
                self.dropped.malformed += 1;
                debug!(%node, error = %e, "undecodable frame dropped");
                return out;
            }
        };
        match envelope.message {
            Message::Announce(a) if leaf == NodeTopic::Announce => {
                match self.registry.on_announce(now, &a) {
                    Ok(id) if id == node => self.pump_queue(now, &mut out),
                    Ok(_) => self.dropped.unknown_node += 1,
                    Err(e) => {
                        self.dropped.unknown_node += 1;
                        warn!(%node, error = %e, "announce refused");
                    }
                }
            }
            Message::Telemetry(t) if t.telemetry.node == node => {
                match self.registry.on_telemetry(now, &t) {
                    Ok(()) => self.pump_queue(now, &mut out),
                    Err(e) => {
                        self.dropped.unknown_node += 1;
                        debug!(%node, error = %e, "telemetry refused");
                    }
                }
            }
            Message::Ping(p) if p.node == node => {
                let pong = Envelope::new(Message::Pong(Pong { nonce: p.nonce })).to_vec();
                out.push(Publish {
                    topic: topics::node(&node, NodeTopic::Tasks).to_string(),
                    payload: pong,
                    retain: false,
                    reliable: false,
                });
            }
            Message::Report(r) if r.node == node && leaf == NodeTopic::Results => {
                self.on_report(now, r, &mut out);
                // The report freed a slot: queued tasks should not wait for the next tick.
                self.pump_queue(now, &mut out);
            }
            _ => {
                self.dropped.malformed += 1;
                debug!(%node, leaf = leaf.as_str(), "message on the wrong topic dropped");
            }
        }
        out
    }

    fn on_report(&mut self, now: Instant, report: Report<'_>, out: &mut Vec<Publish>) {
        let node = report.node;
        let Some(job) = self.jobs.get_mut(&report.task_id) else {
            self.dropped.stale_reports += 1;
            debug!(task = %report.task_id, %node, "report for a finished or unknown task dropped");
            return;
        };
        let Some(pos) = job
            .outstanding
            .iter()
            .position(|d| d.attempt == report.attempt && d.node == node)
        else {
            self.dropped.stale_reports += 1;
            debug!(task = %report.task_id, attempt = report.attempt, %node, "report for an attempt not outstanding dropped");
            return;
        };
        job.outstanding.swap_remove(pos);
        self.registry.task_finished(&node);
        let task_id = report.task_id.clone();
        match report.body {
            ReportBody::Refused(reason) => {
                let why = match reason {
                    Refusal::Breaker(r) => format!("node {node} refused: breaker open ({r})"),
                    Refusal::Busy => format!("node {node} refused: busy"),
                    Refusal::ModuleUnavailable => {
                        format!("node {node} could not fetch module {}", job.spec.module)
                    }
                    Refusal::ShuttingDown => format!("node {node} is shutting down"),
                };
                if reason == Refusal::ModuleUnavailable {
                    // The broker may have lost its retained copy (restart): publish it again.
                    if let Ok(Some(bytes)) = self.store.module(&job.spec.module) {
                        out.push(Publish {
                            topic: topics::module(&job.spec.module).to_string(),
                            payload: bytes,
                            retain: true,
                            reliable: true,
                        });
                    }
                }
                self.fail_attempt(now, &task_id, why, out);
            }
            ReportBody::Executed {
                receipt,
                output,
                message,
            } => {
                let Some(public_key) = self.registry.public_key(&node).copied() else {
                    self.dropped.unknown_node += 1;
                    self.fail_attempt(now, &task_id, format!("node {node} is not registered"), out);
                    return;
                };
                let expected = Expected {
                    task_id: &job.spec.task_id,
                    attempt: report.attempt,
                    node,
                    public_key: &public_key,
                    module: job.spec.module,
                    input: job.input_hash,
                    limits: job.spec.limits,
                };
                if let Err(e) = verify_receipt(&receipt, output, &expected) {
                    self.dropped.bad_receipts += 1;
                    warn!(task = %task_id, %node, error = %e, "receipt rejected");
                    self.registry.record(now, &node, Outcome::Disputed);
                    self.fail_attempt(
                        now,
                        &task_id,
                        format!("node {node} sent a receipt that does not verify: {e}"),
                        out,
                    );
                    return;
                }
                self.registry.touch(now, node);
                let exit = receipt.receipt.exit;
                if exit == Exit::TimedOut {
                    // Wall-clock limits are not deterministic: another node may finish in time.
                    self.registry.record(now, &node, Outcome::Failed);
                    self.fail_attempt(
                        now,
                        &task_id,
                        format!("timed out on node {node}: {message}"),
                        out,
                    );
                    return;
                }
                self.registry.record(now, &node, Outcome::Completed);
                let key = (receipt.receipt.output, receipt.receipt.fuel_used, exit);
                job.votes.push(Vote {
                    node,
                    key,
                    output: output.to_vec(),
                    receipt,
                    message: message.to_string(),
                });
                self.tally(now, &task_id, out);
            }
        }
    }

    fn tally(&mut self, now: Instant, task_id: &TaskId, out: &mut Vec<Publish>) {
        let Some(job) = self.jobs.get_mut(task_id) else {
            return;
        };
        let keys: Vec<_> = job.votes.iter().map(|v| v.key).collect();
        match quorum(&keys, job.replicas) {
            Quorum::Accepted { index, .. } => self.finish(now, task_id, Some(keys[index]), out),
            Quorum::Pending => {
                self.pump(now, task_id, out);
                // A spot check is best effort: with no second eligible node, the verified
                // receipt stands on its own rather than waiting for a node that may never come.
                let Some(job) = self.jobs.get_mut(task_id) else {
                    return;
                };
                if job.spot_check
                    && job.votes.len() == 1
                    && job.outstanding.is_empty()
                    && job.queued_since.is_some()
                {
                    job.spot_check = false;
                    job.replicas = 1;
                    let key = job.votes[0].key;
                    self.finish(now, task_id, Some(key), out);
                }
            }
            Quorum::Split if job.replicas < MAX_REPLICAS => {
                // Disagreement escalates to a larger quorum with an odd number of replicas.
                job.replicas = (if job.replicas % 2 == 0 {
                    job.replicas + 1
                } else {
                    job.replicas + 2
                })
                .min(MAX_REPLICAS);
                info!(task = %task_id, replicas = job.replicas, "replicas disagree; escalating");
                self.pump(now, task_id, out);
            }
            Quorum::Split => {
                job.last_error = Some(format!("{} replicas produced no majority", job.votes.len()));
                self.finish(now, task_id, None, out);
            }
        }
    }

    fn fail_attempt(
        &mut self,
        now: Instant,
        task_id: &TaskId,
        why: String,
        out: &mut Vec<Publish>,
    ) {
        let Some(job) = self.jobs.get_mut(task_id) else {
            return;
        };
        debug!(task = %task_id, "{why}");
        job.failures += 1;
        job.last_error = Some(why);
        if job.failures > self.config.max_failures {
            self.finish(now, task_id, None, out);
        } else {
            self.pump(now, task_id, out);
        }
    }

    /// Places as many dispatches as the task still needs; queues it when no node is eligible.
    fn pump(&mut self, now: Instant, task_id: &TaskId, out: &mut Vec<Publish>) {
        let Some(job) = self.jobs.get_mut(task_id) else {
            return;
        };
        let strategy = job.spec.strategy.unwrap_or(self.config.default_strategy);
        for _ in 0..job.wanted() {
            let Some(node) = self
                .registry
                .select(now, &job.spec.requires, strategy, &job.tried)
            else {
                if job.queued_since.is_none() {
                    job.queued_since = Some(now);
                    self.queue.push_back(task_id.clone());
                }
                return;
            };
            let attempt = job.next_attempt;
            job.next_attempt = job.next_attempt.saturating_add(1);
            job.tried.push(node);
            let deadline = now
                + Duration::from_millis(job.spec.limits.timeout_ms)
                + self.config.dispatch_grace;
            job.outstanding.push(Dispatch { attempt, node });
            self.deadlines
                .push(Reverse((deadline, task_id.clone(), attempt)));
            self.registry.task_started(&node);
            if let Err(e) = self
                .store
                .record_dispatch(task_id, attempt, &node, unix_ms())
            {
                warn!(task = %task_id, error = %e, "dispatch could not be journaled");
            }
            let entry = heapless::String::try_from(job.spec.entry.as_str()).unwrap_or_default();
            let assignment = Assignment {
                task_id: task_id.clone(),
                attempt,
                module: job.spec.module,
                abi: job.spec.abi,
                entry,
                limits: job.spec.limits,
                input: &job.spec.input,
            };
            let frame = Envelope::new(Message::Assign(assignment)).to_vec();
            out.push(Publish::reliable(
                topics::node(&node, NodeTopic::Tasks).as_str(),
                frame,
            ));
        }
        job.queued_since = None;
    }

    fn pump_queue(&mut self, now: Instant, out: &mut Vec<Publish>) {
        for _ in 0..self.queue.len() {
            let Some(id) = self.queue.pop_front() else {
                break;
            };
            if let Some(job) = self.jobs.get_mut(&id) {
                job.queued_since = None;
                self.pump(now, &id, out);
                if self.jobs.get(&id).is_some_and(|j| j.queued_since.is_some()) {
                    // Still no eligible node; later tasks will not find one either.
                    break;
                }
            }
        }
    }

    fn reassign_from(&mut self, now: Instant, node: NodeId, why: &str, out: &mut Vec<Publish>) {
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
            self.registry.record(now, &node, Outcome::Failed);
            self.fail_attempt(now, &id, format!("node {node}: {why}"), out);
        }
    }

    fn drop_dispatch(&mut self, task_id: &TaskId, attempt: u16) -> Option<NodeId> {
        let job = self.jobs.get_mut(task_id)?;
        let pos = job.outstanding.iter().position(|d| d.attempt == attempt)?;
        let d = job.outstanding.swap_remove(pos);
        self.registry.task_finished(&d.node);
        Some(d.node)
    }

    /// Advances time: expires dispatches past their deadline and tasks that waited too long
    /// for a node.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Publish> {
        let mut out = Vec::new();
        while let Some(Reverse((deadline, _, _))) = self.deadlines.peek() {
            if *deadline > now {
                break;
            }
            let Some(Reverse((_, id, attempt))) = self.deadlines.pop() else {
                break;
            };
            if let Some(node) = self.drop_dispatch(&id, attempt) {
                self.registry.record(now, &node, Outcome::Failed);
                self.fail_attempt(
                    now,
                    &id,
                    format!("node {node} did not answer attempt {attempt} in time"),
                    &mut out,
                );
            }
        }
        let expired: Vec<TaskId> = self
            .queue
            .iter()
            .filter(|id| {
                self.jobs
                    .get(*id)
                    .and_then(|j| j.queued_since)
                    .is_some_and(|t| now.duration_since(t) >= self.config.queue_timeout)
            })
            .cloned()
            .collect();
        for id in expired {
            if let Some(job) = self.jobs.get_mut(&id) {
                job.last_error.get_or_insert_with(|| "no eligible node (online, breaker closed, enough memory, matching engine/arch/labels)".into());
            }
            self.finish(now, &id, None, &mut out);
        }
        self.queue.retain(|id| self.jobs.contains_key(id));
        self.pump_queue(now, &mut out);
        out
    }

    /// Snapshot of the registry for the store, as `(node, JSON)`.
    pub fn save_snapshot(&mut self, now: Instant) {
        let rows: Vec<(NodeId, String)> = self
            .registry
            .views(now)
            .into_iter()
            .map(|v| (v.node, serde_json::to_string(&v).unwrap_or_default()))
            .collect();
        if let Err(e) = self.store.save_nodes(&rows) {
            warn!(error = %e, "node snapshot could not be saved");
        }
    }

    /// Ends a task: with the winning vote key settled and delivered, or failed.
    fn finish(
        &mut self,
        now: Instant,
        task_id: &TaskId,
        winner: Option<(Digest, u64, Exit)>,
        out: &mut Vec<Publish>,
    ) {
        let Some(job) = self.jobs.remove(task_id) else {
            return;
        };
        for d in &job.outstanding {
            self.registry.task_finished(&d.node);
        }
        let topic = topics::task_result(task_id);
        let latency_ms = now.duration_since(job.submitted).as_secs_f64() * 1e3;
        let mut event = match winner {
            None => {
                let why = job.last_error.clone().unwrap_or_else(|| "no result".into());
                TaskEvent::new(task_id.as_str(), EventStatus::Failed)
                    .with_error("no_verified_result", why)
            }
            Some(key) => {
                let winners: Vec<&Vote> = job.votes.iter().filter(|v| v.key == key).collect();
                let losers: Vec<&Vote> = job.votes.iter().filter(|v| v.key != key).collect();
                for v in &winners {
                    self.registry.record(now, &v.node, Outcome::Verified);
                }
                for v in &losers {
                    self.registry.record(now, &v.node, Outcome::Disputed);
                }
                let each = self.config.tariff.reward(key.1);
                let each = match job.spec.max_fee {
                    Some(max) if each.saturating_mul(winners.len() as u64) > max => {
                        max / winners.len() as u64
                    }
                    _ => each,
                };
                let payees: Vec<(NodeId, u64)> = winners.iter().map(|v| (v.node, each)).collect();
                let reward = match self.store.settle(task_id, &job.spec.client, &payees) {
                    Ok(Settlement::Settled { total, .. }) => Some(total),
                    Ok(Settlement::AlreadySettled) => None,
                    Err(e) => {
                        warn!(task = %task_id, error = %e, "settlement failed");
                        None
                    }
                };
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
                ev.receipts = winners
                    .iter()
                    .map(|v| ReceiptJson::from(&v.receipt))
                    .collect();
                ev.nodes = winners
                    .iter()
                    .map(|v| v.node.to_hex().to_string())
                    .collect();
                ev.reward = reward;
                ev.verdict = Some(Verdict {
                    policy: job.spec.policy.to_string(),
                    replicas: job.replicas,
                    agreeing: winners.len(),
                    spot_checked: job.spot_check,
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
        let json = event.to_json();
        if let Err(e) = self
            .store
            .finish_task(task_id, status, &String::from_utf8_lossy(&json))
        {
            warn!(task = %task_id, error = %e, "task outcome could not be journaled");
        }
        out.push(Publish::reliable(topic.as_str(), json));
    }

    fn new_job(&mut self, spec: TaskSpec, now: Instant) -> Job {
        use rand::Rng;
        let (replicas, spot_check) = match spec.policy {
            Policy::Replicate(k) => (k, false),
            Policy::Receipt => {
                let spot = self.rng.random_range(0..1000) < self.config.spot_check_permille;
                (if spot { 2 } else { 1 }, spot)
            }
        };
        Job {
            input_hash: sha3_256(&spec.input),
            spec: Arc::new(spec),
            submitted: now,
            replicas,
            spot_check,
            next_attempt: 1,
            failures: 0,
            last_error: None,
            outstanding: Vec::new(),
            votes: Vec::new(),
            tried: Vec::new(),
            queued_since: None,
        }
    }
}

fn generated_id(started: Instant, now: Instant, n: u64) -> TaskId {
    let text = format!(
        "t{}-{}-{n}",
        unix_ms(),
        now.duration_since(started).as_micros()
    );
    TaskId::new(&text).unwrap_or_else(|| TaskId::new("t").expect("static id is valid"))
}

fn submission_id(json: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(json)
        .ok()?
        .get("task_id")?
        .as_str()
        .map(str::to_owned)
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Enrollment, RegistryConfig};
    use ambient_core::{
        Announce, Engine, Identity, Receipt, SafetyPolicy, ScoreConfig, SignedAnnounce,
        SignedTelemetry, Telemetry, TelemetrySample, sign_message,
    };

    const MODULE: &[u8] = b"\0asm\x01\0\0\0";

    struct Fixture {
        d: Dispatcher,
        now: Instant,
        nodes: Vec<Identity>,
        _dir: tempfile::TempDir,
    }

    fn fixture(n: u8) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("ambient.db")).unwrap();
        let registry = Registry::new(RegistryConfig {
            // Long enough that nodes stay live across the simulated timeouts below.
            liveness: Duration::from_secs(3600),
            score: ScoreConfig::default(),
            safety: SafetyPolicy::default(),
            enrollment: Enrollment::Open,
        });
        let now = Instant::now();
        let config = DispatchConfig {
            spot_check_permille: 0,
            ..DispatchConfig::default()
        };
        let mut d = Dispatcher::new(config, registry, store, now).unwrap();
        let nodes: Vec<Identity> = (1..=n).map(|i| Identity::from_secret(&[i; 32])).collect();
        for (i, id) in nodes.iter().enumerate() {
            let node = id.node_id();
            let announce = Announce {
                node,
                public_key: id.public_key(),
                arch: "aarch64".try_into().unwrap(),
                cores: 4,
                mem_total_bytes: 8 << 30,
                engine: Engine::Wasmtime,
                agent_version: "test".try_into().unwrap(),
                labels: Default::default(),
                profile: None,
                max_concurrency: 4,
            };
            let signature = sign_message(id, SignedAnnounce::TAG, &announce).unwrap();
            let frame = Envelope::new(Message::Announce(SignedAnnounce {
                announce,
                signature,
            }))
            .to_vec();
            d.on_node_frame(now, node, NodeTopic::Status, b"online");
            d.on_node_frame(now, node, NodeTopic::Announce, &frame);
            // Distinct latencies make the weighted order deterministic: node 0 is best.
            let sample = TelemetrySample {
                latency_us: Some(1_000 * (i as u32 + 1)),
                cpu_load_permille: Some(100),
                mem_free_bytes: Some(4 << 30),
                ..TelemetrySample::default()
            };
            let telemetry = Telemetry {
                node,
                seq: 1,
                boot_id: 1,
                sample,
            };
            let signature = sign_message(id, SignedTelemetry::TAG, &telemetry).unwrap();
            let frame = Envelope::new(Message::Telemetry(SignedTelemetry {
                telemetry,
                signature,
            }))
            .to_vec();
            d.on_node_frame(now, node, NodeTopic::Telemetry, &frame);
        }
        Fixture {
            d,
            now,
            nodes,
            _dir: dir,
        }
    }

    fn submit(f: &mut Fixture, id: &str, verify: &str) -> Vec<Publish> {
        let json = serde_json::json!({"task_id": id, "module_b64": B64.encode(MODULE), "input": "in", "verify": verify});
        f.d.on_submissions(f.now, &[json.to_string().into_bytes()])
    }

    /// The assignments among `publishes`, as (node, attempt).
    fn assignments(publishes: &[Publish]) -> Vec<(NodeId, u16)> {
        publishes
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

    fn identity(f: &Fixture, node: NodeId) -> &Identity {
        f.nodes.iter().find(|i| i.node_id() == node).unwrap()
    }

    /// A report of `output` for (task, attempt), signed by `signer`.
    fn report(
        f: &Fixture,
        task: &str,
        node: NodeId,
        attempt: u16,
        output: &[u8],
        signer: &Identity,
    ) -> Vec<u8> {
        let receipt = Receipt {
            task_id: TaskId::new(task).unwrap(),
            attempt,
            node,
            module: sha3_256(MODULE),
            input: sha3_256(b"in"),
            output: sha3_256(output),
            fuel_used: 100,
            limits: ambient_core::Limits::default(),
            engine: Engine::Wasmtime,
            exit: Exit::Ok,
        }
        .sign(signer);
        let _ = f;
        let body = ReportBody::Executed {
            receipt,
            output,
            message: Default::default(),
        };
        Envelope::new(Message::Report(Report {
            task_id: TaskId::new(task).unwrap(),
            attempt,
            node,
            body,
        }))
        .to_vec()
    }

    fn results(publishes: &[Publish]) -> Vec<TaskEvent> {
        publishes
            .iter()
            .filter(|p| p.topic.ends_with("/result"))
            .filter_map(|p| serde_json::from_slice::<TaskEvent>(&p.payload).ok())
            .filter(|e| e.status.is_final())
            .collect()
    }

    fn answer(
        f: &mut Fixture,
        task: &str,
        (node, attempt): (NodeId, u16),
        output: &[u8],
    ) -> Vec<Publish> {
        let frame = report(f, task, node, attempt, output, identity(f, node));
        f.d.on_node_frame(f.now, node, NodeTopic::Results, &frame)
    }

    #[test]
    fn a_verified_result_is_delivered_and_paid_once_and_its_replay_is_dropped() {
        let mut f = fixture(1);
        let sent = assignments(&submit(&mut f, "t1", "receipt"));
        assert_eq!(sent.len(), 1);
        let frame = report(
            &f,
            "t1",
            sent[0].0,
            sent[0].1,
            b"out",
            identity(&f, sent[0].0),
        );
        let done = results(&f.d.on_node_frame(f.now, sent[0].0, NodeTopic::Results, &frame));
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].status, EventStatus::Completed);
        assert_eq!(
            done[0].output_b64.as_deref(),
            Some(B64.encode(b"out").as_str())
        );
        let replay =
            f.d.on_node_frame(f.now, sent[0].0, NodeTopic::Results, &frame);
        assert!(results(&replay).is_empty());
        assert_eq!(f.d.dropped().stale_reports, 1);
        assert_eq!(
            f.d.store
                .task_earnings(&TaskId::new("t1").unwrap())
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_receipt_signed_by_another_key_is_rejected_and_the_task_moves_on() {
        let mut f = fixture(2);
        let first = assignments(&submit(&mut f, "t2", "receipt"))[0];
        let forger = Identity::from_secret(&[0xEE; 32]);
        let frame = report(&f, "t2", first.0, first.1, b"out", &forger);
        let next = assignments(&f.d.on_node_frame(f.now, first.0, NodeTopic::Results, &frame));
        assert_eq!(f.d.dropped().bad_receipts, 1);
        assert_eq!(next.len(), 1);
        assert_ne!(next[0].0, first.0, "retried on another node");
        assert_eq!(next[0].1, first.1 + 1, "with the next attempt number");
    }

    #[test]
    fn a_dispatch_that_times_out_is_reassigned_with_the_next_attempt() {
        let mut f = fixture(2);
        let first = assignments(&submit(&mut f, "t3", "receipt"))[0];
        let later = f.now
            + Duration::from_millis(ambient_core::Limits::default().timeout_ms)
            + Duration::from_secs(16);
        let next = assignments(&f.d.on_tick(later));
        assert_eq!(next.len(), 1);
        assert_ne!(next[0].0, first.0);
        // The slow node's answer to the old attempt now arrives: it is stale.
        f.now = later;
        assert!(results(&answer(&mut f, "t3", first, b"out")).is_empty());
        assert_eq!(f.d.dropped().stale_reports, 1);
    }

    #[test]
    fn disagreeing_replicas_escalate_and_the_minority_is_disputed() {
        let mut f = fixture(3);
        let sent = assignments(&submit(&mut f, "t4", "replicate:2"));
        assert_eq!(sent.len(), 2, "two distinct nodes");
        assert_ne!(sent[0].0, sent[1].0);
        assert!(results(&answer(&mut f, "t4", sent[0], b"right")).is_empty());
        let third = assignments(&answer(&mut f, "t4", sent[1], b"wrong"));
        assert_eq!(third.len(), 1, "a split vote escalates to a third replica");
        let done = results(&answer(&mut f, "t4", third[0], b"right"));
        assert_eq!(done.len(), 1);
        let verdict = done[0].verdict.clone().unwrap();
        assert_eq!((verdict.replicas, verdict.agreeing), (3, 2));
        assert_eq!(verdict.disputed, vec![sent[1].0.to_hex().to_string()]);
        assert_eq!(
            f.d.store
                .task_earnings(&TaskId::new("t4").unwrap())
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn a_node_going_offline_hands_its_tasks_to_another() {
        let mut f = fixture(2);
        let first = assignments(&submit(&mut f, "t5", "receipt"))[0];
        let next = assignments(&f.d.on_node_frame(f.now, first.0, NodeTopic::Status, b"offline"));
        assert_eq!(next.len(), 1);
        assert_ne!(next[0].0, first.0);
    }

    #[test]
    fn unfinished_tasks_are_recovered_from_the_journal_with_fresh_attempts() {
        let mut f = fixture(1);
        let first = assignments(&submit(&mut f, "t6", "receipt"))[0];
        let dir = f._dir.path().to_path_buf();
        let store = Store::open(&dir.join("ambient.db")).unwrap();
        let registry = Registry::new(RegistryConfig {
            liveness: Duration::from_secs(15),
            score: ScoreConfig::default(),
            safety: SafetyPolicy::default(),
            enrollment: Enrollment::Open,
        });
        let d = Dispatcher::new(DispatchConfig::default(), registry, store, f.now).unwrap();
        assert_eq!(d.unfinished(), 1);
        assert!(d.jobs[&TaskId::new("t6").unwrap()].next_attempt > first.1);
    }
}
