//! `ambient sim`: the coordinator's verification decisions against byzantine nodes, replayed
//! deterministically on simulated time.
//!
//! [`run`] drives the real [`Dispatcher`] (and through it the real [`Registry`], `core`'s
//! quorum and reputation) exactly as the service does, one [`Input`] at a time, with a clock it
//! advances itself. What is simulated is only the outside world:
//!
//! - **Nodes** announce, send telemetry every [`TELEMETRY_EVERY`], and answer each assignment
//!   after their own run time (one run at a time, in the order given) with a report carrying a
//!   receipt they sign with their own ed25519 key, as an agent does. No WASM runs: a task's right output is a function of its input.
//! - **Behaviours** ([`Behaviour`]): honest nodes always return the right output. *Liars*
//!   return a wrong output of their own (no two liars agree) on a share of their tasks
//!   ([`SimConfig::lie_rate`]). *Colluders* all lie on the same tasks (chosen by the task's
//!   input, so no coordination is needed) with the same wrong output, so two colluders checking
//!   each other agree. *Patient* cheaters behave for [`SimConfig::patience`] runs, then lie
//!   like liars. Every wrong output comes with a validly signed receipt: the receipt proves
//!   who ran what, not that the output is right, which is what the simulation measures.
//! - **Clients** keep one task per node in flight, so checks compete with work for free nodes
//!   as they do under load.
//!
//! The run is a function of [`SimConfig`] alone (the seed included): the same configuration
//! gives the same [`SimReport`] on every machine.
//!
//! # What is reported
//!
//! - `wrong_accepted`: tasks that completed with a wrong output, and their share of those
//!   that completed (the error rate a client sees);
//! - `executions_per_task`: runs paid for per submitted task (1.0 is no verification at all);
//! - `honest_blacklisted`: honest nodes a dispute ever blacklisted (outvoted by colluders);
//! - per behaviour: how many nodes, runs, lies and wrong results accepted, how many cheaters
//!   were caught (blacklisted) and how many lies each told before that.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use ambient_core::topics::{self, NodeTopic};
use ambient_core::{
    Announce, Assignment, Engine, Envelope, Exit, Identity, Message, NodeId, Receipt, Report,
    ReportBody, SignedAnnounce, SignedTelemetry, TaskId, Telemetry, TelemetrySample, sha3_256,
    sign_message,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::store::{Known, StoreError};
use crate::{
    DispatchConfig, Dispatcher, Effects, EventStatus, Frame, Input, Journal, Now, Policy,
    Recovered, Registry, RegistryConfig, TaskEvent,
};

/// The smallest plain-ABI module (`memory`, `alloc`, and a `run` that returns nothing): what
/// simulated tasks name. The dispatcher inspects it like any upload.
pub const MODULE: &[u8] = b"\0asm\x01\0\0\0\x01\x0c\x02\x60\x01\x7f\x01\x7f\x60\x02\x7f\x7f\x01\x7e\x03\x03\x02\x00\x01\x05\x03\x01\x00\x01\x07\x18\x03\x06memory\x02\x00\x05alloc\x00\x00\x03run\x00\x01\x0a\x0b\x02\x04\x00\x41\x00\x0b\x04\x00\x42\x00\x0b";

/// How often simulated nodes send telemetry (the agent's default interval).
pub const TELEMETRY_EVERY: Duration = Duration::from_secs(5);

/// How often the simulated service ticks the dispatcher (deadlines, queue timeouts).
const TICK_EVERY: Duration = Duration::from_secs(1);

/// Most nodes a simulation runs (the registry's default bound).
pub const MAX_NODES: u32 = 10_000;

/// What one simulation runs.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Nodes in the pool.
    pub nodes: u32,
    /// Tasks submitted.
    pub tasks: u64,
    /// Seeds the nodes' keys, speeds and lies, and the dispatcher's spot-check draws.
    pub seed: u64,
    /// Every task's verification policy.
    pub verify: Policy,
    /// Share of nodes that are liars, 0..=1.
    pub liars: f64,
    /// Share of nodes that are colluders, 0..=1.
    pub colluders: f64,
    /// Share of nodes that are patient cheaters, 0..=1.
    pub patient: f64,
    /// Share of their tasks on which cheaters lie, 0..=1.
    pub lie_rate: f64,
    /// Runs a patient cheater answers honestly before it starts lying.
    pub patience: u32,
    /// Share of `receipt` tasks spot-checked, in permille.
    pub spot_check_permille: u16,
    /// Agreements in a row before a node runs `receipt` tasks unchecked.
    pub trust_after: u32,
    /// How long a node shown wrong gets no work.
    pub blacklist: Duration,
}

impl Default for SimConfig {
    /// The reference pool: 1,000 nodes, 100,000 tasks, the coordinator's defaults.
    fn default() -> Self {
        let registry = RegistryConfig::default();
        Self {
            nodes: 1_000,
            tasks: 100_000,
            seed: 1,
            verify: DispatchConfig::default().default_policy,
            liars: 0.0,
            colluders: 0.0,
            patient: 0.0,
            lie_rate: 0.1,
            patience: 50,
            spot_check_permille: DispatchConfig::default().spot_check_permille,
            trust_after: registry.trust_after,
            blacklist: registry.blacklist,
        }
    }
}

/// A simulation that cannot run as configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SimError(String);

impl SimConfig {
    /// Checks the configuration; the error names the setting and what it allows.
    ///
    /// # Errors
    ///
    /// When a share is outside 0..=1, the shares add up to more than 1, there are no nodes or
    /// more than [`MAX_NODES`], no tasks, or `replicate:K` asks for more nodes than the pool has.
    pub fn validate(&self) -> Result<(), SimError> {
        let err = |m: String| Err(SimError(m));
        if self.nodes == 0 || self.nodes > MAX_NODES {
            return err(format!("nodes must be 1..={MAX_NODES}, not {}", self.nodes));
        }
        if self.tasks == 0 {
            return err("tasks must be at least 1".into());
        }
        for (name, v) in [
            ("liars", self.liars),
            ("colluders", self.colluders),
            ("patient", self.patient),
            ("lie-rate", self.lie_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return err(format!("{name} is a share, 0 to 1, not {v}"));
            }
        }
        if self.liars + self.colluders + self.patient > 1.0 + 1e-9 {
            return err("liars, colluders and patient add up to more than every node".into());
        }
        if let Policy::Replicate(k) = self.verify
            && k > self.nodes as usize
        {
            return err(format!(
                "replicate:{k} needs {k} distinct nodes; the pool has {}",
                self.nodes
            ));
        }
        if self.spot_check_permille > 1000 {
            return err(format!(
                "spot-check permille must be 0..=1000, not {}",
                self.spot_check_permille
            ));
        }
        Ok(())
    }
}

/// What a simulated node does with its tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    /// Always the right output.
    Honest,
    /// A wrong output of its own on a share of its tasks.
    Liar,
    /// The colluders' shared wrong output, on the tasks all colluders lie on.
    Colluder,
    /// Honest for a while, then a liar.
    Patient,
}

impl Behaviour {
    const ALL: [Self; 4] = [Self::Honest, Self::Liar, Self::Colluder, Self::Patient];

    /// The name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Honest => "honest",
            Self::Liar => "liar",
            Self::Colluder => "colluder",
            Self::Patient => "patient",
        }
    }
}

/// What one simulation found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimReport {
    /// Nodes in the pool.
    pub nodes: u32,
    /// Tasks submitted.
    pub tasks: u64,
    /// The seed.
    pub seed: u64,
    /// Every task's policy, as submitted.
    pub verify: String,
    /// Tasks that completed.
    pub completed: u64,
    /// Tasks that failed (no majority, every attempt failed, no node within the queue timeout).
    pub failed: u64,
    /// Completed tasks whose output is wrong.
    pub wrong_accepted: u64,
    /// `wrong_accepted` over `completed`.
    pub wrong_accepted_rate: f64,
    /// Runs of tasks, all nodes together.
    pub executions: u64,
    /// `executions` over `tasks`: the compute paid per task.
    pub executions_per_task: f64,
    /// Honest nodes that a dispute blacklisted.
    pub honest_blacklisted: u32,
    /// Simulated seconds from the first submission to the last final event.
    pub simulated_s: f64,
    /// One row per behaviour present in the pool.
    pub groups: Vec<GroupReport>,
}

/// What one behaviour's nodes did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupReport {
    /// The behaviour.
    pub behaviour: Behaviour,
    /// Nodes with it.
    pub nodes: u32,
    /// Runs they made.
    pub executions: u64,
    /// Runs they answered wrongly.
    pub lies: u64,
    /// Their wrong outputs that were accepted as results.
    pub wrong_accepted: u64,
    /// Nodes blacklisted at least once.
    pub caught: u32,
    /// Median lies a caught node told before it was first blacklisted.
    pub lies_before_caught_p50: Option<u64>,
    /// Most lies a caught node told before it was first blacklisted.
    pub lies_before_caught_max: Option<u64>,
}

/// Runs one simulation. Deterministic: see the module docs.
///
/// # Errors
///
/// When the configuration does not [validate](SimConfig::validate).
pub fn run(config: &SimConfig) -> Result<SimReport, SimError> {
    config.validate()?;
    let mut sim = Sim::new(config);
    sim.run();
    Ok(sim.report())
}

/// The signed announce frame of a node with `identity`, for `arch`, taking one task at a time
/// per `max_concurrency`.
pub fn announce_frame(identity: &Identity, arch: &str, max_concurrency: u16) -> Vec<u8> {
    let announce = Announce {
        node: identity.node_id(),
        public_key: identity.public_key(),
        arch: arch.try_into().expect("arch names are short"),
        cores: 4,
        mem_total_bytes: 8 << 30,
        engine: Engine::Wasmtime,
        agent_version: "sim".try_into().expect("short"),
        labels: Default::default(),
        profile: None,
        max_concurrency,
        fuel_per_s: None,
    };
    let signature = sign_message(identity, SignedAnnounce::TAG, &announce).expect("fits");
    Envelope::new(Message::Announce(SignedAnnounce {
        announce,
        signature,
    }))
    .to_vec()
}

/// The signed telemetry frame of `identity` with sequence number `seq`.
pub fn telemetry_frame(identity: &Identity, seq: u64, sample: TelemetrySample) -> Vec<u8> {
    let telemetry = Telemetry {
        node: identity.node_id(),
        seq,
        boot_id: 1,
        sample,
    };
    let signature = sign_message(identity, SignedTelemetry::TAG, &telemetry).expect("fits");
    Envelope::new(Message::Telemetry(SignedTelemetry {
        telemetry,
        signature,
    }))
    .to_vec()
}

/// The report frame of a run: `receipt` signed by `signer`, with `output`.
pub fn report_frame(signer: &Identity, receipt: Receipt, output: &[u8]) -> Vec<u8> {
    let (task_id, attempt, node) = (receipt.task_id.clone(), receipt.attempt, receipt.node);
    let body = ReportBody::Executed {
        receipt: receipt.sign(signer),
        output,
        message: Default::default(),
    };
    Envelope::new(Message::Report(Report {
        task_id,
        attempt,
        node,
        body,
    }))
    .to_vec()
}

/// The report of a run of assignment `a` that ended `Ok` with `output` after `fuel_used`,
/// claiming `node` ran it, signed by `signer`: what an agent sends (or a liar, with its output).
pub fn report_of(
    signer: &Identity,
    node: NodeId,
    a: &Assignment<'_>,
    output: &[u8],
    fuel_used: u64,
) -> Vec<u8> {
    let receipt = Receipt {
        task_id: a.task_id.clone(),
        attempt: a.attempt,
        node,
        module: a.module,
        input: sha3_256(a.input),
        output: sha3_256(output),
        fuel_used,
        limits: a.limits,
        engine: Engine::Wasmtime,
        exit: Exit::Ok,
    };
    report_frame(signer, receipt, output)
}

/// The simulation holds no journal: no task id is submitted twice.
struct NoJournal;

impl Journal for NoJournal {
    fn known(&self, _: &TaskId) -> Result<Option<Known>, StoreError> {
        Ok(None)
    }
}

struct Node {
    identity: Identity,
    id: NodeId,
    behaviour: Behaviour,
    /// How long one run takes on it.
    run_ms: u64,
    /// When the runs it was given so far are done: it runs them one after another.
    busy_until: u64,
    seq: u64,
    executions: u64,
    lies: u64,
    /// Lies told when first blacklisted.
    caught_after: Option<u64>,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Report {
        node: usize,
        frame: Vec<u8>,
        lie: bool,
    },
    Telemetry,
    Tick,
}

struct Sim<'a> {
    config: &'a SimConfig,
    d: Dispatcher,
    start: Instant,
    now_ms: u64,
    nodes: Vec<Node>,
    by_id: HashMap<NodeId, usize>,
    events: BinaryHeap<Reverse<(u64, u64, Event)>>,
    next_seq: u64,
    rng: StdRng,
    /// Nodes that ran each unfinished task.
    ran: HashMap<TaskId, Vec<usize>>,
    submitted: u64,
    /// Runs given to nodes that have not reported yet.
    running: u64,
    completed: u64,
    failed: u64,
    wrong: HashMap<Behaviour, u64>,
    last_final_ms: u64,
}

/// The right output for a task's input.
fn right(input: &[u8]) -> Vec<u8> {
    [b"ok:".as_slice(), input].concat()
}

impl<'a> Sim<'a> {
    fn new(config: &'a SimConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(config.seed);
        let registry = Registry::new(RegistryConfig {
            joins_per_s: u32::MAX,
            max_nodes: config.nodes as usize,
            trust_after: config.trust_after,
            blacklist: config.blacklist,
            ..RegistryConfig::default()
        });
        let dispatch = DispatchConfig {
            spot_check_permille: config.spot_check_permille,
            ..DispatchConfig::default()
        };
        let start = Instant::now();
        let coordinator = Identity::from_secret(&rng.random());
        let d = Dispatcher::recover(
            dispatch,
            registry,
            coordinator,
            Recovered::default(),
            Now {
                at: start,
                unix_ms: 0,
            },
            rng.random(),
        );
        // Behaviours are dealt in proportion, then shuffled over the nodes.
        let n = f64::from(config.nodes);
        let count = |share: f64| (share * n).round() as usize;
        let mut behaviours = Vec::with_capacity(config.nodes as usize);
        behaviours.extend(std::iter::repeat_n(Behaviour::Liar, count(config.liars)));
        behaviours.extend(std::iter::repeat_n(
            Behaviour::Colluder,
            count(config.colluders),
        ));
        behaviours.extend(std::iter::repeat_n(
            Behaviour::Patient,
            count(config.patient),
        ));
        behaviours.truncate(config.nodes as usize);
        behaviours.resize(config.nodes as usize, Behaviour::Honest);
        for i in (1..behaviours.len()).rev() {
            behaviours.swap(i, rng.random_range(0..=i));
        }
        let nodes: Vec<Node> = behaviours
            .into_iter()
            .map(|behaviour| {
                let identity = Identity::from_secret(&rng.random());
                Node {
                    id: identity.node_id(),
                    identity,
                    behaviour,
                    // Boards differ: 0.5 s to 2 s per run.
                    run_ms: rng.random_range(500..=2_000),
                    busy_until: 0,
                    seq: 0,
                    executions: 0,
                    lies: 0,
                    caught_after: None,
                }
            })
            .collect();
        let by_id = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
        Self {
            config,
            d,
            start,
            now_ms: 0,
            nodes,
            by_id,
            events: BinaryHeap::new(),
            next_seq: 0,
            rng,
            ran: HashMap::new(),
            submitted: 0,
            running: 0,
            completed: 0,
            failed: 0,
            wrong: HashMap::new(),
            last_final_ms: 0,
        }
    }

    fn now(&self) -> Now {
        Now {
            at: self.start + Duration::from_millis(self.now_ms),
            unix_ms: self.now_ms,
        }
    }

    fn at(&mut self, after: Duration, event: Event) {
        let at = self.now_ms + u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        self.at_ms(at, event);
    }

    fn at_ms(&mut self, at: u64, event: Event) {
        self.next_seq += 1;
        self.events.push(Reverse((at, self.next_seq, event)));
    }

    /// One loop turn of the service: handle, then act on what was decided.
    fn step(&mut self, input: Input<'_>) {
        let mut fx = Effects::default();
        self.d.handle(self.now(), input, &NoJournal, &mut fx);
        self.d.seal(&mut fx);
        self.apply(fx);
    }

    fn run(&mut self) {
        let hash = sha3_256(MODULE);
        self.step(Input::Module {
            hash,
            bytes: MODULE,
        });
        for i in 0..self.nodes.len() {
            let (id, frame) = {
                let n = &self.nodes[i];
                (n.id, announce_frame(&n.identity, "aarch64", 1))
            };
            self.step(Input::Frame(Frame {
                node: id,
                leaf: NodeTopic::Status,
                frame: b"online",
                received: self.now().at,
                signed_by: None,
            }));
            self.step(Input::Frame(Frame {
                node: id,
                leaf: NodeTopic::Announce,
                frame: &frame,
                received: self.now().at,
                signed_by: None,
            }));
        }
        self.telemetry();
        self.at(TICK_EVERY, Event::Tick);
        let window = self.nodes.len();
        let module = hash.to_string();
        let verify = self.config.verify.to_string();
        loop {
            while self.submitted < self.config.tasks && self.d.unfinished() < window {
                let json = serde_json::json!({
                    "task_id": format!("s{}", self.submitted),
                    "module": module,
                    "input": self.submitted.to_string(),
                    "verify": verify,
                })
                .to_string();
                self.submitted += 1;
                self.step(Input::Submit(json.as_bytes()));
            }
            // Done once every task ended and every run reported: a replica still out when its
            // task was accepted is compared when it reports, and may dispute its node.
            if self.completed + self.failed == self.config.tasks && self.running == 0 {
                break;
            }
            let Some(Reverse((at, _, event))) = self.events.pop() else {
                break;
            };
            self.now_ms = at;
            match event {
                Event::Report { node, frame, lie } => {
                    self.running -= 1;
                    // A lie counts once told, when its report arrives.
                    self.nodes[node].lies += u64::from(lie);
                    let id = self.nodes[node].id;
                    self.step(Input::Frame(Frame {
                        node: id,
                        leaf: NodeTopic::Results,
                        frame: &frame,
                        received: self.now().at,
                        signed_by: None,
                    }));
                    self.notice_blacklisting(node);
                }
                Event::Telemetry => self.telemetry(),
                Event::Tick => {
                    self.step(Input::Tick);
                    self.at(TICK_EVERY, Event::Tick);
                }
            }
        }
    }

    fn telemetry(&mut self) {
        for i in 0..self.nodes.len() {
            let n = &mut self.nodes[i];
            n.seq += 1;
            let sample = TelemetrySample {
                latency_us: Some(5_000),
                cpu_load_permille: Some(300),
                mem_free_bytes: Some(4 << 30),
                temp_millic: Some(50_000),
                ..TelemetrySample::default()
            };
            let (id, frame) = (n.id, telemetry_frame(&n.identity, n.seq, sample));
            self.step(Input::Frame(Frame {
                node: id,
                leaf: NodeTopic::Telemetry,
                frame: &frame,
                received: self.now().at,
                signed_by: None,
            }));
        }
        self.at(TELEMETRY_EVERY, Event::Telemetry);
    }

    fn apply(&mut self, fx: Effects) {
        for p in &fx.dispatch {
            let Some((node, NodeTopic::Tasks)) = topics::parse_node(&p.topic) else {
                continue;
            };
            if let Ok(Envelope {
                message: Message::Assign(a),
                ..
            }) = Envelope::decode(&p.payload)
            {
                let i = self.by_id[&node];
                let (output, lie) = self.execute(i, a.input);
                let frame = report_of(&self.nodes[i].identity, node, &a, &output, 1_000);
                self.ran.entry(a.task_id).or_default().push(i);
                // One run at a time: an assignment that arrives while the node is busy (the
                // dispatcher frees a replica's slot when its task ends) waits its turn.
                let n = &mut self.nodes[i];
                n.busy_until = n.busy_until.max(self.now_ms) + n.run_ms;
                let done = n.busy_until;
                self.running += 1;
                self.at_ms(
                    done,
                    Event::Report {
                        node: i,
                        frame,
                        lie,
                    },
                );
            }
        }
        for p in &fx.events {
            if !p.topic.ends_with("/result") {
                continue;
            }
            let Ok(event) = serde_json::from_slice::<TaskEvent>(&p.payload) else {
                continue;
            };
            if event.status.is_final() {
                self.finished(&event);
            }
        }
    }

    /// Node `i` runs a task with `input`: its output, and whether that is a lie.
    fn execute(&mut self, i: usize, input: &[u8]) -> (Vec<u8>, bool) {
        let lie_rate = self.config.lie_rate;
        let draw = self.rng.random_bool(lie_rate);
        let n = &mut self.nodes[i];
        n.executions += 1;
        let lie = match n.behaviour {
            Behaviour::Honest => None,
            Behaviour::Liar => draw.then(|| format!("lie:{i}:")),
            // Every colluder lies on the same tasks, decided by the seed and the input alone.
            Behaviour::Colluder => {
                let h = sha3_256(&[&self.config.seed.to_le_bytes(), input].concat());
                let x = u64::from_le_bytes(h.0[..8].try_into().expect("8 bytes"));
                ((x as f64 / u64::MAX as f64) < lie_rate).then(|| "collude:".to_owned())
            }
            Behaviour::Patient => (n.executions > u64::from(self.config.patience) && draw)
                .then(|| format!("lie:{i}:")),
        };
        match lie {
            Some(prefix) => ([prefix.as_bytes(), input].concat(), true),
            None => (right(input), false),
        }
    }

    fn finished(&mut self, event: &TaskEvent) {
        let Some(id) = TaskId::new(&event.task_id) else {
            return;
        };
        let ran = self.ran.remove(&id).unwrap_or_default();
        self.last_final_ms = self.now_ms;
        if event.status != EventStatus::Completed {
            self.failed += 1;
            return;
        }
        self.completed += 1;
        let input = event.task_id.trim_start_matches('s').as_bytes();
        let output = event
            .output_b64
            .as_deref()
            .and_then(|o| B64.decode(o).ok())
            .unwrap_or_default();
        if output != right(input) {
            let by = if output.starts_with(b"collude:") {
                Behaviour::Colluder
            } else {
                // "lie:{node}:{input}"
                std::str::from_utf8(&output)
                    .ok()
                    .and_then(|s| s.split(':').nth(1)?.parse::<usize>().ok())
                    .and_then(|i| self.nodes.get(i))
                    .map_or(Behaviour::Honest, |n| n.behaviour)
            };
            *self.wrong.entry(by).or_default() += 1;
        }
        for i in ran {
            self.notice_blacklisting(i);
        }
    }

    /// Records when node `i` is first seen blacklisted. Disputes happen when a vote is
    /// decided or a late replica reports, so checking every node that ran a task as it ends,
    /// and every reporter, sees each one at once.
    fn notice_blacklisting(&mut self, i: usize) {
        let n = &self.nodes[i];
        if n.caught_after.is_some() {
            return;
        }
        let at = self.start + Duration::from_millis(self.now_ms);
        if self
            .d
            .registry()
            .view(at, &n.id)
            .is_some_and(|v| v.blacklisted_for_ms.is_some())
        {
            self.nodes[i].caught_after = Some(self.nodes[i].lies);
        }
    }

    fn report(&self) -> SimReport {
        let executions: u64 = self.nodes.iter().map(|n| n.executions).sum();
        let wrong_accepted: u64 = self.wrong.values().sum();
        let groups = Behaviour::ALL
            .iter()
            .filter_map(|&b| {
                let members: Vec<&Node> = self.nodes.iter().filter(|n| n.behaviour == b).collect();
                if members.is_empty() {
                    return None;
                }
                let mut caught: Vec<u64> = members.iter().filter_map(|n| n.caught_after).collect();
                caught.sort_unstable();
                Some(GroupReport {
                    behaviour: b,
                    nodes: members.len() as u32,
                    executions: members.iter().map(|n| n.executions).sum(),
                    lies: members.iter().map(|n| n.lies).sum(),
                    wrong_accepted: self.wrong.get(&b).copied().unwrap_or(0),
                    caught: caught.len() as u32,
                    lies_before_caught_p50: caught.get(caught.len() / 2).copied(),
                    lies_before_caught_max: caught.last().copied(),
                })
            })
            .collect::<Vec<_>>();
        SimReport {
            nodes: self.config.nodes,
            tasks: self.config.tasks,
            seed: self.config.seed,
            verify: self.config.verify.to_string(),
            completed: self.completed,
            failed: self.failed,
            wrong_accepted,
            wrong_accepted_rate: ratio(wrong_accepted, self.completed),
            executions,
            executions_per_task: ratio(executions, self.config.tasks),
            honest_blacklisted: groups
                .iter()
                .find(|g| g.behaviour == Behaviour::Honest)
                .map_or(0, |g| g.caught),
            simulated_s: self.last_final_ms as f64 / 1000.0,
            groups,
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 25 tasks per node: proving after 10 agreements leaves room for unchecked runs.
    fn small() -> SimConfig {
        SimConfig {
            nodes: 40,
            tasks: 1_000,
            trust_after: 10,
            verify: Policy::Receipt,
            ..SimConfig::default()
        }
    }

    #[test]
    fn an_honest_pool_accepts_no_wrong_result_and_blacklists_no_one() {
        let r = run(&small()).unwrap();
        assert_eq!((r.completed, r.failed), (1_000, 0));
        assert_eq!(r.wrong_accepted, 0);
        assert_eq!(r.honest_blacklisted, 0);
        // Proving costs each node's first `trust_after` runs a second run, then 5% checks.
        assert!(
            (1.0..1.6).contains(&r.executions_per_task),
            "{}",
            r.executions_per_task
        );
    }

    #[test]
    fn the_same_configuration_gives_the_same_report() {
        let c = SimConfig {
            liars: 0.2,
            ..small()
        };
        assert_eq!(run(&c).unwrap(), run(&c).unwrap());
    }

    #[test]
    fn liars_that_always_lie_are_caught_while_proving_and_get_nothing_accepted() {
        let r = run(&SimConfig {
            liars: 0.2,
            lie_rate: 1.0,
            ..small()
        })
        .unwrap();
        assert_eq!(r.wrong_accepted, 0, "{r:#?}");
        let liars = r
            .groups
            .iter()
            .find(|g| g.behaviour == Behaviour::Liar)
            .unwrap();
        assert_eq!(liars.caught, liars.nodes, "{r:#?}");
        // Each liar's runs are all checked until it has agreed `trust_after` times, and the
        // first check that completes catches it.
        assert!(liars.lies_before_caught_max < Some(10), "{r:#?}");
        assert_eq!(r.honest_blacklisted, 0);
    }

    #[test]
    fn replicating_every_task_three_times_outvotes_random_liars() {
        let r = run(&SimConfig {
            liars: 0.2,
            verify: Policy::Replicate(3),
            ..small()
        })
        .unwrap();
        assert_eq!(r.wrong_accepted, 0, "{r:#?}");
        assert!(r.executions_per_task >= 3.0, "{r:#?}");
    }

    #[test]
    fn under_the_default_error_target_neither_liars_nor_colluders_get_a_wrong_result_accepted() {
        for (liars, colluders) in [(0.2, 0.0), (0.0, 0.2)] {
            let r = run(&SimConfig {
                liars,
                colluders,
                verify: SimConfig::default().verify,
                ..small()
            })
            .unwrap();
            assert_eq!(r.verify, "target:1e-4");
            assert_eq!(r.wrong_accepted, 0, "{r:#?}");
            assert_eq!(r.honest_blacklisted, 0, "{r:#?}");
        }
    }

    #[test]
    fn shares_that_do_not_fit_the_pool_are_refused_with_the_setting_named() {
        let e = run(&SimConfig {
            liars: 0.7,
            colluders: 0.7,
            ..small()
        })
        .unwrap_err();
        assert!(e.to_string().contains("more than every node"), "{e}");
        let e = run(&SimConfig {
            lie_rate: 1.5,
            ..small()
        })
        .unwrap_err();
        assert!(e.to_string().contains("lie-rate"), "{e}");
    }
}
