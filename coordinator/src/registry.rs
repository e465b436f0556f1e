//! The node registry: who is out there, healthy, and trusted.
//!
//! The registry turns what nodes say (signed announces and telemetry, presence, task outcomes)
//! into a view of the pool and into placement decisions. It does no I/O and never reads a clock:
//! every call takes `now` from the coordinator's monotonic clock, and nothing a node says about
//! time is trusted. Calls are expected with non-decreasing `now`.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use ambient_core::{
    Admission, Breaker, BreakerState, Engine, HealthTerms, NodeId, Reputation, SafetyPolicy,
    ScoreConfig, SignedAnnounce, SignedTelemetry, TelemetrySample, Transition, health_score,
    verify_message,
};
use serde::{Deserialize, Serialize};

use crate::scheduler::{Attributes, Keys, Placement};
use crate::{Requirements, Strategy};

/// How the registry judges nodes. Built once from the validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// How long a node stays online after its last valid announce, telemetry or report.
    /// Default 15 s: several telemetry intervals, so one lost sample does not drop a node.
    pub liveness: Duration,
    /// Reference points of the health score. Default [`ScoreConfig::default`].
    pub score: ScoreConfig,
    /// The thresholds of the coordinator's own breaker for every node. Default
    /// [`SafetyPolicy::default`] (85 °C, 100 ms, 25 errors, 30 s cool-down).
    pub safety: SafetyPolicy,
    /// Which keys may join the pool. Default [`Enrollment::Open`].
    pub enrollment: Enrollment,
    /// How long an "offline" presence waits for the node's signed traffic to disprove it
    /// before the node counts as gone (and its tasks move). Presence is unsigned: a last will,
    /// or anyone's claim, so it only stops new placements at once. Default 10 s: two default
    /// telemetry intervals.
    pub offline_grace: Duration,
    /// Most nodes held in memory; an announce from a new key beyond it is refused. Default
    /// 10,000.
    pub max_nodes: usize,
    /// New nodes admitted per second on average (bursts up to 10 s worth); the excess is
    /// refused and comes back with the node's next announce. Default 20.
    pub joins_per_s: u32,
    /// Frames in one registered node's name (telemetry, announces) whose signature may fail per
    /// second on average, bursts up to 10 s worth. Beyond it, frames in that name are dropped
    /// before their signature is checked, so a flood of forgeries costs a map lookup per frame,
    /// not a signature check. Honest frames never use it up; while a forger does, the node's own
    /// frames are dropped with the forgeries (which cannot be told apart unchecked) and the
    /// node may go silent: only a broker that checks who publishes (the embedded one, or
    /// mosquitto with the shipped ACL) prevents that. Default 20.
    pub bad_frames_per_s: u32,
    /// A node with no valid traffic and no task for this long is forgotten (the ledger keeps
    /// its history; it joins again with its next announce). Default 24 h.
    pub forget_after: Duration,
    /// Results in a row that must agree with another node's before a node counts as proven
    /// ([`Registry::proven`]); until then every `receipt` task it runs is also checked on a
    /// second node. A dispute starts the count again. Default 40: BOINC's adaptive replication
    /// uses 10, which `ambient sim` shows lets 1.8e-3 of results be wrong in a pool where one
    /// node in ten lies on one task in ten; 40 brings that under 1e-4 at 1.25 runs per task
    /// over a node's first 100 tasks (README, "Against lying nodes"). 0 trusts every node
    /// from the start.
    pub trust_after: u32,
    /// How long a node whose result was shown wrong (a dispute) gets no work. Default 1 h.
    pub blacklist: Duration,
    /// The share of faulty nodes assumed when judging [`NodeView::credibility`], in permille.
    /// Default 200 (one in five).
    pub assumed_faulty_permille: u32,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            liveness: Duration::from_secs(15),
            score: ScoreConfig::default(),
            safety: SafetyPolicy::default(),
            enrollment: Enrollment::Open,
            offline_grace: Duration::from_secs(10),
            max_nodes: 10_000,
            joins_per_s: 20,
            bad_frames_per_s: 20,
            forget_after: Duration::from_secs(24 * 3600),
            trust_after: 40,
            blacklist: Duration::from_secs(3600),
            assumed_faulty_permille: 200,
        }
    }
}

/// Which nodes may join the pool.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Enrollment {
    /// Any node may join (trust on first use): the first public key seen for a node id is kept,
    /// and a later announce under that id with another key is refused. The default, for a
    /// private broker.
    #[default]
    Open,
    /// Only nodes whose ed25519 public key is listed, or approved with `ambient nodes approve`,
    /// may join. Use it on a shared broker. A node that is not listed and proves its key with a
    /// signed announce waits for the operator ([`RegistryError::NotAllowed`]).
    Allowlist(HashSet<[u8; 32]>),
}

/// Why the registry refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The announced public key is not on the enrollment allowlist. The announce's signature
    /// was checked: the node holds the key and waits for `ambient nodes approve`.
    #[error(
        "public key is not on the enrollment allowlist; approve it with `ambient nodes approve`"
    )]
    NotAllowed,
    /// The operator revoked the key (`ambient nodes revoke`).
    #[error("the node's key was revoked by the operator")]
    Revoked,
    /// The signature does not verify under the node's key (or the key is not a valid point).
    #[error("signature does not verify under the node's public key")]
    BadSignature,
    /// The announce's node id is not the one derived from its public key.
    #[error("node id is not derived from the announced public key")]
    IdMismatch,
    /// Telemetry from a node that has not announced itself (or was refused when it did).
    #[error("node is not registered; it must announce itself first")]
    UnknownNode,
    /// The telemetry's sequence number is not newer than one already accepted from the same
    /// agent run (`boot_id`).
    #[error(
        "telemetry sequence number is not newer than the last accepted one: replayed or reordered"
    )]
    Replay,
    /// An announce under a registered node id carries a different public key.
    #[error("node announced a different public key from the one it registered with")]
    KeyChanged,
    /// The registry holds `max_nodes` nodes already.
    #[error("the pool is full ({0} nodes, `enrollment.max_nodes`)")]
    Full(usize),
    /// New nodes arrive faster than `enrollment.joins_per_s`.
    #[error(
        "too many new nodes at once (`enrollment.joins_per_s`); the node is admitted with a later announce"
    )]
    TooManyJoins,
    /// Frames with bad signatures in this node's name arrived faster than
    /// `enrollment.bad_frames_per_s`; this one was dropped unverified.
    #[error("forged frames in this node's name exceed `enrollment.bad_frames_per_s`")]
    TooFast,
}

/// What became of a task on a node, as the coordinator judged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Verification accepted the result. A success for reputation and breaker.
    Verified,
    /// The node reported the task as run. A success for the breaker.
    Completed,
    /// The task failed on the node (trap, timeout, refusal mid-run, lost). A failure.
    Failed,
    /// Verification showed the result to be wrong. A failure, and it weighs
    /// [`Reputation::DISPUTE_WEIGHT`] failures in the reputation score. The node is
    /// blacklisted for [`RegistryConfig::blacklist`] and must prove itself again.
    Disputed,
    /// The result was accepted and another node's agreed with it: verified, and one more
    /// towards [`RegistryConfig::trust_after`].
    Agreed,
}

/// What the coordinator knows of one node, for `ambient nodes`, the HTTP API and the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// The node.
    pub node: NodeId,
    /// CPU architecture it announced (`aarch64`, `x86_64`, `riscv64`, `arm`).
    pub arch: String,
    /// WASM engine it runs (`wasmtime`, `wasmedge`, `wasmtime-pulley`).
    pub engine: String,
    /// Logical cores it announced.
    pub cores: u16,
    /// Total memory it announced, in bytes.
    pub mem_total_bytes: u64,
    /// Labels it announced.
    pub labels: Vec<String>,
    /// Simulated device profile it runs, if its readings are simulated.
    pub profile: Option<String>,
    /// Presence not withdrawn by a last will, and valid traffic within the liveness window.
    pub online: bool,
    /// Milliseconds since its last valid traffic, by the coordinator's clock.
    pub last_seen_ms_ago: Option<u64>,
    /// The health terms and score, each in `0..=SCORE_SCALE`.
    pub terms: HealthTerms,
    /// The coordinator's breaker for this node.
    pub breaker: BreakerState,
    /// Why that breaker is not closed, as a sentence, when it is not.
    pub breaker_reason: Option<String>,
    /// Task outcomes counted so far.
    pub reputation: Reputation,
    /// Results in a row that agreed with another node's (since it joined or was last
    /// disputed); proven at [`RegistryConfig::trust_after`].
    #[serde(default)]
    pub agreed_in_a_row: u32,
    /// How far its results can be trusted, in `0..=SCORE_SCALE`: [`ambient_core::credibility`]
    /// of `agreed_in_a_row`, with [`RegistryConfig::assumed_faulty_permille`].
    #[serde(default)]
    pub credibility: u32,
    /// Milliseconds until a node caught with a wrong result gets work again (it is lifted at
    /// its first telemetry after that).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blacklisted_for_ms: Option<u64>,
    /// Tasks dispatched to it and not yet finished.
    pub in_flight: u32,
    /// Fuel per second placement counts on ([`Strategy::LatencyAware`]): what it announced,
    /// capped at twice [`observed_fuel_per_s`](Self::observed_fuel_per_s) once there is one.
    /// The observation is a lower bound (it includes the round trip and a first compile); the
    /// factor 2 absorbs that for an honest node, while a node announcing far more than it is
    /// seen to do is ranked by what it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel_per_s: Option<u64>,
    /// Fuel per second it announced: its agent's measurement on the digits kernel at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announced_fuel_per_s: Option<u64>,
    /// The best fuel per second the coordinator has seen it reach: a run's fuel over the time
    /// from assignment to report, over runs of at least [`OBSERVED_MIN_FUEL`] whose result
    /// another node agreed with (so the fuel is confirmed). The time includes the round trip
    /// (and a first run's compile), so this is a lower bound of its speed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_fuel_per_s: Option<u64>,
    /// Its latest telemetry reading.
    pub sample: Option<TelemetrySample>,
}

/// Every node that has announced itself, with ordered indexes for placing tasks.
///
/// Keep it in one place (one task owns it): every method is synchronous and cheap, O(log n)
/// apart from [`Registry::views`] and the signature checks of announces and telemetry.
///
/// ```
/// use std::time::Instant;
/// use ambient_coordinator::{Registry, RegistryConfig, Requirements, Strategy};
/// use ambient_core::{
///     Announce, Engine, Identity, SignedAnnounce, SignedTelemetry, Telemetry, TelemetrySample,
///     sign_message,
/// };
///
/// let node = Identity::from_secret(&[7; 32]);
/// let announce = Announce {
///     node: node.node_id(),
///     public_key: node.public_key(),
///     arch: "aarch64".parse()?,
///     cores: 4,
///     mem_total_bytes: 4 << 30,
///     engine: Engine::Wasmtime,
///     agent_version: "0.1.0".parse()?,
///     labels: Default::default(),
///     profile: None,
///     max_concurrency: 2,
///     fuel_per_s: None,
/// };
/// let signature = sign_message(&node, SignedAnnounce::TAG, &announce)?;
///
/// let mut registry = Registry::new(RegistryConfig::default());
/// let now = Instant::now();
/// let id = registry.on_announce(now, &SignedAnnounce { announce, signature })?;
/// let req = Requirements { memory_bytes: 512 << 20, ..Default::default() };
/// // An announce alone proves only that a key exists: no work before signed telemetry.
/// assert_eq!(registry.select(now, &req, Strategy::Weighted, &[]), None);
///
/// let telemetry = Telemetry { node: id, seq: 1, boot_id: 1, sample: TelemetrySample::default() };
/// let signature = sign_message(&node, SignedTelemetry::TAG, &telemetry)?;
/// registry.on_telemetry(now, &SignedTelemetry { telemetry, signature })?;
/// assert_eq!(registry.select(now, &req, Strategy::Weighted, &[]), Some(id));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Registry {
    config: RegistryConfig,
    nodes: HashMap<NodeId, Node>,
    placement: Placement,
    /// When each live node's liveness runs out: `select` takes expired nodes out of the indexes.
    deadlines: BTreeSet<(Instant, NodeId)>,
    /// "offline" statuses (last wills) that arrived before the node's announce, as happens with
    /// retained messages when the coordinator starts. Bounded by [`MAX_PENDING_OFFLINE`].
    pending_offline: HashSet<NodeId>,
    /// Nodes whose liveness ran out since [`Registry::went_silent`] was last called.
    silent: Vec<NodeId>,
    /// Admissions of new nodes: a token bucket of `joins_per_s`, ten seconds deep.
    joins: TokenBucket,
    /// Keys the operator approved, admitted in addition to [`Enrollment::Allowlist`]'s.
    approved: HashSet<[u8; 32]>,
    /// Keys the operator revoked: refused whatever the enrollment says.
    revoked: HashSet<[u8; 32]>,
    /// When idle nodes are next looked for (see [`RegistryConfig::forget_after`]).
    next_sweep: Option<Instant>,
    /// The first instant the registry was given: breakers count milliseconds from it.
    epoch: Option<Instant>,
}

/// Most early "offline" statuses remembered. Statuses are unsigned, so this bounds what a
/// stranger on the broker can make the registry hold.
const MAX_PENDING_OFFLINE: usize = 1 << 17;

/// The least fuel a run must spend for its time to count towards the node's observed fuel
/// rate: 10 million, about 10 ms on a desktop core and 100 ms or more on a small board.
pub const OBSERVED_MIN_FUEL: u64 = 10_000_000;

/// How many earlier agent runs per node are remembered for replay protection.
const PREVIOUS_BOOTS: usize = 3;

#[derive(Debug, Clone)]
struct Node {
    public_key: [u8; 32],
    arch: String,
    engine: Engine,
    cores: u16,
    mem_total_bytes: u64,
    labels: Vec<String>,
    profile: Option<String>,
    max_concurrency: u16,
    /// The fuel rate the node announced.
    announced_fuel_per_s: Option<NonZeroU64>,
    /// The best fuel rate seen in its runs ([`Registry::observe_run`]).
    observed_fuel_per_s: Option<NonZeroU64>,
    sample: Option<TelemetrySample>,
    freshness: Freshness,
    /// Budget of frames in this node's name that fail their signature check.
    bad_frames: TokenBucket,
    last_seen: Instant,
    /// `last_seen + liveness`; `None` if that is beyond what `Instant` can hold (never expires).
    deadline: Option<Instant>,
    /// Whether the liveness window had not run out when last checked; while `true` the node
    /// has an entry in `Registry::deadlines`.
    live: bool,
    /// The latest presence said "offline" and no fresh telemetry arrived since.
    offline: bool,
    breaker: Breaker,
    /// Whether `breaker` admitted a task when it last changed. An open breaker half-opens when
    /// it is next fed (telemetry, an outcome), so a cool-down ends at the first sample after it.
    admitting: bool,
    reputation: Reputation,
    /// See [`NodeView::agreed_in_a_row`].
    agreed_in_a_row: u32,
    /// Until when (breaker clock, ms) it gets no work after a dispute. Lifted when it is next
    /// fed after that, like an open breaker.
    blacklisted_until_ms: Option<u64>,
    terms: HealthTerms,
    in_flight: u32,
    /// The node refused a task for a reason of its own (all slots taken, its own breaker open,
    /// shutting down) that the registry did not know yet. Not available until its next report or
    /// telemetry sample, which says where it stands.
    resting: bool,
    /// The keys this node is indexed under, if it is available for work.
    indexed: Option<Keys>,
}

/// The highest telemetry sequence number accepted from the current agent run and the few
/// before it. A run not remembered is accepted as new: `boot_id` is random, not ordered, so
/// this is as much as can be checked without trusting the node's clock.
#[derive(Debug, Clone, Copy, Default)]
struct Freshness {
    current: Option<(u64, u64)>,
    previous: [Option<(u64, u64)>; PREVIOUS_BOOTS],
}

impl Freshness {
    fn is_fresh(&self, boot_id: u64, seq: u64) -> bool {
        let known = self.current.iter().chain(self.previous.iter().flatten());
        for &(boot, highest) in known {
            if boot == boot_id {
                return seq > highest;
            }
        }
        true
    }

    fn accept(&mut self, boot_id: u64, seq: u64) {
        if let Some((boot, highest)) = &mut self.current
            && *boot == boot_id
        {
            *highest = seq;
            return;
        }
        // A new run (or an earlier one speaking again): it becomes current and the one it
        // replaces moves to the front of the remembered runs.
        let replaced = self.current.replace((boot_id, seq));
        let mut kept = [None; PREVIOUS_BOOTS];
        let older = replaced
            .into_iter()
            .chain(self.previous.iter().flatten().copied());
        for (slot, run) in kept
            .iter_mut()
            .zip(older.filter(|(boot, _)| *boot != boot_id))
        {
            *slot = Some(run);
        }
        self.previous = kept;
    }
}

impl Node {
    fn attributes(&self) -> Attributes<'_> {
        Attributes {
            engine: self.engine,
            arch: &self.arch,
            labels: &self.labels,
        }
    }

    fn mem_free_bytes(&self) -> u64 {
        self.sample
            .as_ref()
            .and_then(|s| s.mem_free_bytes)
            .unwrap_or(self.mem_total_bytes)
    }

    /// The fuel rate placement counts on: the announced one, capped at twice the best observed
    /// once there is one ([`NodeView::fuel_per_s`]); the observed one alone when the node
    /// announced none.
    fn fuel_per_s(&self) -> Option<NonZeroU64> {
        match (self.announced_fuel_per_s, self.observed_fuel_per_s) {
            (Some(a), Some(o)) => Some(a.min(o.saturating_mul(NonZeroU64::new(2).expect("2")))),
            (a, o) => a.or(o),
        }
    }

    fn keys(&self) -> Keys {
        let sample = self.sample.as_ref();
        Keys {
            score: self.terms.score,
            load: Keys::load_key(
                sample.and_then(|s| s.cpu_load_permille),
                self.in_flight,
                self.max_concurrency,
            ),
            in_flight: self.in_flight,
            latency_us: sample
                .and_then(|s| s.latency_us)
                .map_or(u64::MAX, u64::from),
            fuel_per_s: self.fuel_per_s().map_or(0, NonZeroU64::get),
            mem_free_bytes: self.mem_free_bytes(),
        }
    }

    /// Whether the node can take a task now, whatever the task: online, has sent valid signed
    /// telemetry (an announce alone proves only that a key exists), breaker admitting (ours,
    /// and the one the node reports for itself, since an open one refuses assignments), and a
    /// free execution slot.
    fn is_available(&self) -> bool {
        self.is_ready() && !self.resting && self.in_flight < u32::from(self.max_concurrency)
    }

    /// [`Node::is_available`] but for a free slot and a rest after saying it was busy: it
    /// takes work again soon.
    fn is_ready(&self) -> bool {
        self.live
            && !self.offline
            && self.admitting
            && self.blacklisted_until_ms.is_none()
            && self
                .sample
                .as_ref()
                .is_some_and(|s| s.breaker != BreakerState::Open)
    }

    /// Ends a blacklisting whose time is up at `now_ms`.
    fn lift_blacklist(&mut self, now_ms: u64) {
        if self
            .blacklisted_until_ms
            .is_some_and(|until| now_ms >= until)
        {
            self.blacklisted_until_ms = None;
        }
    }

    fn is_online(&self, now: Instant) -> bool {
        !self.offline && self.deadline.is_none_or(|d| now < d)
    }

    /// Whether it could run a task that needs `req` once free.
    fn can_run(&self, now: Instant, req: &Requirements) -> bool {
        self.is_online(now)
            && self.blacklisted_until_ms.is_none()
            && req.is_met_by(self.attributes(), u64::MAX)
            && self.mem_total_bytes >= req.memory_bytes
    }

    fn rescore(&mut self, config: &ScoreConfig) {
        let default = TelemetrySample::default();
        let sample = self.sample.as_ref().unwrap_or(&default);
        self.terms = health_score(config, sample, self.cores, self.reputation.score());
    }

    fn view(&self, id: NodeId, now: Instant, now_ms: u64, faulty_permille: u32) -> NodeView {
        NodeView {
            node: id,
            arch: self.arch.clone(),
            engine: self.engine.as_str().to_owned(),
            cores: self.cores,
            mem_total_bytes: self.mem_total_bytes,
            labels: self.labels.clone(),
            profile: self.profile.clone(),
            online: self.is_online(now),
            last_seen_ms_ago: Some(millis(now.saturating_duration_since(self.last_seen))),
            terms: self.terms,
            breaker: self.breaker.state(),
            breaker_reason: self.breaker.reason().map(|r| r.to_string()),
            reputation: self.reputation,
            agreed_in_a_row: self.agreed_in_a_row,
            credibility: ambient_core::credibility(self.agreed_in_a_row, faulty_permille),
            blacklisted_for_ms: self.blacklisted_until_ms.map(|u| u.saturating_sub(now_ms)),
            in_flight: self.in_flight,
            fuel_per_s: self.fuel_per_s().map(NonZeroU64::get),
            announced_fuel_per_s: self.announced_fuel_per_s.map(NonZeroU64::get),
            observed_fuel_per_s: self.observed_fuel_per_s.map(NonZeroU64::get),
            sample: self.sample.clone(),
        }
    }
}

/// Brings a node's index entries in line with its state. Every change to anything [`Keys`] or
/// [`Node::is_available`] reads goes through here.
fn reindex(placement: &mut Placement, id: NodeId, node: &mut Node) {
    let wanted = node.is_available().then(|| node.keys());
    match (node.indexed, wanted) {
        (None, None) => {}
        (None, Some(keys)) => placement.insert(id, &keys, node.attributes()),
        (Some(old), None) => placement.remove(id, &old, node.attributes()),
        (Some(old), Some(new)) if old != new => placement.update(id, &old, &new),
        (Some(_), Some(_)) => {}
    }
    node.indexed = wanted;
}

/// Takes a node out of the indexes before its attributes change; [`reindex`] puts it back.
fn unindex(placement: &mut Placement, id: NodeId, node: &mut Node) {
    if let Some(old) = node.indexed.take() {
        placement.remove(id, &old, node.attributes());
    }
}

fn log_transition(id: NodeId, transition: Option<Transition>) {
    if let Some(t) = transition {
        match t.reason {
            Some(reason) => {
                tracing::warn!(node = %id, from = ?t.from, to = ?t.to, %reason, "breaker changed state")
            }
            None => tracing::info!(node = %id, from = ?t.from, to = ?t.to, "breaker changed state"),
        }
    }
}

/// A token bucket: `rate` admissions per second on average, bursts of up to ten seconds' worth.
#[derive(Debug, Clone)]
struct TokenBucket {
    rate: u32,
    tokens: f64,
    at: Option<Instant>,
}

impl TokenBucket {
    const DEPTH_S: f64 = 10.0;

    fn new(rate: u32) -> Self {
        Self {
            rate,
            tokens: f64::from(rate) * Self::DEPTH_S,
            at: None,
        }
    }

    /// Whether a token is there at `now`, without taking it.
    fn has(&mut self, now: Instant) -> bool {
        let rate = f64::from(self.rate);
        if let Some(at) = self.at {
            let refill = now.saturating_duration_since(at).as_secs_f64() * rate;
            self.tokens = (self.tokens + refill).min(rate * Self::DEPTH_S);
        }
        self.at = Some(now);
        self.tokens >= 1.0
    }

    /// Takes one token at `now`, if there is one.
    fn take(&mut self, now: Instant) -> bool {
        if self.has(now) {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Registry {
    /// An empty registry judging nodes by `config`.
    pub fn new(config: RegistryConfig) -> Self {
        Self {
            joins: TokenBucket::new(config.joins_per_s),
            approved: HashSet::new(),
            revoked: HashSet::new(),
            config,
            nodes: HashMap::new(),
            placement: Placement::default(),
            deadlines: BTreeSet::new(),
            pending_offline: HashSet::new(),
            silent: Vec::new(),
            next_sweep: None,
            epoch: None,
        }
    }

    /// The configuration it judges by.
    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// [`Registry::now_ms`] without starting the clock (0 before it started).
    fn peek_ms(&self, now: Instant) -> u64 {
        self.epoch
            .map_or(0, |epoch| millis(now.saturating_duration_since(epoch)))
    }

    /// Milliseconds from the first instant the registry was given to `now`: the breakers' clock.
    fn now_ms(&mut self, now: Instant) -> u64 {
        let epoch = *self.epoch.get_or_insert(now);
        millis(now.saturating_duration_since(epoch))
    }

    /// Registers a node, or updates what it announced. Counts as valid traffic for liveness;
    /// announces carry no sequence number, so a replayed one counts too, but it cannot lift a
    /// last will (only fresh telemetry or an `online` presence does).
    ///
    /// Checks, cheapest first: the node id derives from the key, the key is not revoked, the key
    /// matches the one registered for this id, the budgets, and the signature (domain
    /// [`SignedAnnounce::TAG`]). A known node keeps its breaker, reputation and tasks in
    /// flight: re-announcing does not wipe its record.
    ///
    /// A new node takes a join ([`RegistryConfig::joins_per_s`]) unless the operator listed or
    /// approved its key. Under [`Enrollment::Allowlist`], a key that is neither is checked too
    /// (taking a join) and then refused with [`RegistryError::NotAllowed`]: the node proved it
    /// holds the key, and its announce may be kept for the operator's verdict.
    ///
    /// # Errors
    /// [`RegistryError::IdMismatch`], [`RegistryError::Revoked`], [`RegistryError::KeyChanged`],
    /// [`RegistryError::TooFast`], [`RegistryError::Full`], [`RegistryError::TooManyJoins`],
    /// [`RegistryError::BadSignature`] or [`RegistryError::NotAllowed`]; the registry is
    /// unchanged.
    pub fn on_announce(
        &mut self,
        now: Instant,
        signed: &SignedAnnounce,
    ) -> Result<NodeId, RegistryError> {
        let a = &signed.announce;
        let id = NodeId::from_public_key(&a.public_key);
        if a.node != id {
            return Err(RegistryError::IdMismatch);
        }
        if self.revoked.contains(&a.public_key) {
            return Err(RegistryError::Revoked);
        }
        let listed = self.approved.contains(&a.public_key)
            || matches!(&self.config.enrollment, Enrollment::Allowlist(keys) if keys.contains(&a.public_key));
        let allowed = listed || self.config.enrollment == Enrollment::Open;
        // The id derives from the key, so this only fires on a collision of the 128-bit id;
        // checked anyway so that trust on first use never depends on that argument.
        if self
            .nodes
            .get(&id)
            .is_some_and(|n| n.public_key != a.public_key)
        {
            return Err(RegistryError::KeyChanged);
        }
        // Budgets before the signature check, so a flood of announces costs no signature
        // checks beyond them: the node's own for a known node, the joins for a new one.
        let count = self.nodes.len();
        let within_budget = self.nodes.get_mut(&id).map(|n| n.bad_frames.has(now));
        match within_budget {
            Some(false) => return Err(RegistryError::TooFast),
            Some(true) => {}
            None if allowed && count >= self.config.max_nodes => {
                return Err(RegistryError::Full(count));
            }
            None if !listed && !self.joins.take(now) => return Err(RegistryError::TooManyJoins),
            None => {}
        }
        if verify_message(&a.public_key, SignedAnnounce::TAG, a, &signed.signature).is_err() {
            if let Some(node) = self.nodes.get_mut(&id) {
                node.bad_frames.take(now);
            }
            return Err(RegistryError::BadSignature);
        }
        if !allowed {
            return Err(RegistryError::NotAllowed);
        }

        let now_ms = self.now_ms(now);
        let arch = a.arch.as_str().to_owned();
        let labels: Vec<String> = a.labels.iter().map(|l| l.as_str().to_owned()).collect();
        let profile = a.profile.as_deref().map(str::to_owned);
        let node = match self.nodes.entry(id) {
            Entry::Occupied(entry) => {
                let node = entry.into_mut();
                unindex(&mut self.placement, id, node);
                node.arch = arch;
                node.engine = a.engine;
                node.cores = a.cores;
                node.mem_total_bytes = a.mem_total_bytes;
                node.labels = labels;
                node.profile = profile;
                node.max_concurrency = a.max_concurrency;
                node.announced_fuel_per_s = a.fuel_per_s;
                node
            }
            Entry::Vacant(entry) => {
                let breaker = Breaker::new(self.config.safety);
                tracing::info!(node = %id, %arch, cores = a.cores, "node registered");
                entry.insert(Node {
                    public_key: a.public_key,
                    arch,
                    engine: a.engine,
                    cores: a.cores,
                    mem_total_bytes: a.mem_total_bytes,
                    labels,
                    profile,
                    max_concurrency: a.max_concurrency,
                    announced_fuel_per_s: a.fuel_per_s,
                    observed_fuel_per_s: None,
                    sample: None,
                    freshness: Freshness::default(),
                    bad_frames: TokenBucket::new(self.config.bad_frames_per_s),
                    last_seen: now,
                    deadline: None,
                    live: false,
                    offline: self.pending_offline.remove(&id),
                    admitting: breaker.is_admitting(now_ms),
                    breaker,
                    reputation: Reputation::default(),
                    agreed_in_a_row: 0,
                    blacklisted_until_ms: None,
                    terms: HealthTerms::default(),
                    in_flight: 0,
                    resting: false,
                    indexed: None,
                })
            }
        };
        node.rescore(&self.config.score);
        refresh(&mut self.deadlines, self.config.liveness, id, node, now);
        reindex(&mut self.placement, id, node);
        Ok(id)
    }

    /// Takes in a telemetry sample: verified with the node's registered key (domain
    /// [`SignedTelemetry::TAG`]) and checked against replay, then fed to the node's breaker,
    /// scored, and counted as valid traffic. Fresh telemetry also overrides an earlier
    /// "offline" presence: it proves the node is up, and a stale last will can arrive late.
    ///
    /// # Errors
    /// [`RegistryError::UnknownNode`], [`RegistryError::Replay`] (a sequence number not newer
    /// than one accepted from the same agent run) or [`RegistryError::BadSignature`]; the
    /// registry is unchanged.
    pub fn on_telemetry(
        &mut self,
        now: Instant,
        signed: &SignedTelemetry,
    ) -> Result<(), RegistryError> {
        let t = &signed.telemetry;
        let now_ms = self.now_ms(now);
        let id = t.node;
        let node = self.nodes.get_mut(&id).ok_or(RegistryError::UnknownNode)?;
        if !node.bad_frames.has(now) {
            return Err(RegistryError::TooFast);
        }
        if !node.freshness.is_fresh(t.boot_id, t.seq) {
            return Err(RegistryError::Replay);
        }
        if verify_message(&node.public_key, SignedTelemetry::TAG, t, &signed.signature).is_err() {
            node.bad_frames.take(now);
            return Err(RegistryError::BadSignature);
        }

        node.freshness.accept(t.boot_id, t.seq);
        node.offline = false;
        node.lift_blacklist(now_ms);
        log_transition(id, node.breaker.observe(now_ms, &t.sample));
        node.admitting = node.breaker.is_admitting(now_ms);
        node.sample = Some(t.sample.clone());
        node.resting = false;
        node.rescore(&self.config.score);
        refresh(&mut self.deadlines, self.config.liveness, id, node, now);
        reindex(&mut self.placement, id, node);
        Ok(())
    }

    /// Takes in the node's retained presence: `online`, or `offline` (its last will).
    ///
    /// Presence is unsigned, so it never makes a node live by itself, nor gone: `online` only
    /// lifts an earlier `offline`, and the node still needs valid traffic within the liveness
    /// window. `offline` stops new placements at once and shortens the liveness window to
    /// [`RegistryConfig::offline_grace`]: a node that is up disproves it with its next
    /// telemetry, one that is gone goes silent (see [`Registry::went_silent`]). An `offline` for
    /// a node not yet registered is remembered for its announce.
    pub fn on_status(&mut self, now: Instant, node: NodeId, online: bool) {
        let _ = self.now_ms(now);
        let Some(entry) = self.nodes.get_mut(&node) else {
            if online {
                self.pending_offline.remove(&node);
            } else if self.pending_offline.len() < MAX_PENDING_OFFLINE {
                self.pending_offline.insert(node);
            }
            return;
        };
        if entry.offline == online {
            tracing::info!(%node, online, "node presence changed");
        }
        entry.offline = !online;
        if !online
            && entry.live
            && let Some(grace) = now.checked_add(self.config.offline_grace)
            && entry.deadline.is_none_or(|d| d > grace)
        {
            if let Some(old) = entry.deadline {
                self.deadlines.remove(&(old, node));
            }
            entry.deadline = Some(grace);
            self.deadlines.insert((grace, node));
        }
        reindex(&mut self.placement, node, entry);
    }

    /// The nodes whose liveness window ran out (no valid signed traffic) since the last call,
    /// as of `now`: the dispatcher moves their tasks.
    pub fn went_silent(&mut self, now: Instant) -> Vec<NodeId> {
        self.expire(now);
        self.forget_idle(now);
        std::mem::take(&mut self.silent)
    }

    /// Forgets nodes with no valid traffic and no task for [`RegistryConfig::forget_after`].
    /// Looks at most once a minute (O(nodes)).
    fn forget_idle(&mut self, now: Instant) {
        if self.next_sweep.is_some_and(|at| now < at) {
            return;
        }
        self.next_sweep = now.checked_add(Duration::from_secs(60));
        let forget_after = self.config.forget_after;
        let idle: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| {
                !n.live
                    && n.in_flight == 0
                    && now.saturating_duration_since(n.last_seen) >= forget_after
            })
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            if self.remove(id) {
                tracing::info!(node = %id, "forgot a node idle since long ago");
            }
        }
    }

    /// Takes a node out of the registry and its indexes; true if it was there.
    fn remove(&mut self, id: NodeId) -> bool {
        let Some(mut node) = self.nodes.remove(&id) else {
            return false;
        };
        unindex(&mut self.placement, id, &mut node);
        if let Some(deadline) = node.deadline {
            self.deadlines.remove(&(deadline, id));
        }
        true
    }

    /// Admits `public_key` from now on, whatever the enrollment mode, and lifts a revocation:
    /// the operator's `ambient nodes approve`. The node joins with its next (or its stored)
    /// announce, without taking a join.
    pub fn approve(&mut self, public_key: [u8; 32]) {
        self.revoked.remove(&public_key);
        self.approved.insert(public_key);
    }

    /// Refuses `public_key` from now on, whatever the enrollment mode or the allowlist says,
    /// and removes its node: the operator's `ambient nodes revoke`. Returns the node if it was
    /// registered; the caller moves its tasks.
    pub fn revoke(&mut self, public_key: [u8; 32]) -> Option<NodeId> {
        self.approved.remove(&public_key);
        self.revoked.insert(public_key);
        let id = NodeId::from_public_key(&public_key);
        self.remove(id).then_some(id)
    }

    /// Counts valid traffic from the node (a verified report, say) towards its liveness.
    /// Call it only for messages checked to be the node's own. Unknown nodes are ignored.
    pub fn touch(&mut self, now: Instant, node: NodeId) {
        let _ = self.now_ms(now);
        if let Some(entry) = self.nodes.get_mut(&node) {
            refresh(&mut self.deadlines, self.config.liveness, node, entry, now);
            reindex(&mut self.placement, node, entry);
        }
    }

    /// The public key the node registered with.
    pub fn public_key(&self, node: &NodeId) -> Option<&[u8; 32]> {
        self.nodes.get(node).map(|n| &n.public_key)
    }

    /// Records a task outcome: counted in the node's [`Reputation`] (so its score changes) and
    /// fed to the coordinator's breaker for it, `Verified` and `Completed` as successes, `Failed`
    /// and `Disputed` as failures. A task usually yields `Completed` and then `Verified` or
    /// `Disputed`; record both, since either may be the one that settles a half-open probe.
    /// Unknown nodes are ignored.
    pub fn record(&mut self, now: Instant, node: &NodeId, outcome: Outcome) {
        let now_ms = self.now_ms(now);
        let Some(entry) = self.nodes.get_mut(node) else {
            return;
        };
        let r = &mut entry.reputation;
        let count = match outcome {
            Outcome::Verified | Outcome::Agreed => &mut r.verified,
            Outcome::Completed => &mut r.completed,
            Outcome::Failed => &mut r.failed,
            Outcome::Disputed => &mut r.disputed,
        };
        *count = count.saturating_add(1);
        match outcome {
            Outcome::Agreed => entry.agreed_in_a_row = entry.agreed_in_a_row.saturating_add(1),
            Outcome::Disputed => {
                entry.agreed_in_a_row = 0;
                entry.blacklisted_until_ms =
                    Some(now_ms.saturating_add(millis(self.config.blacklist)));
                tracing::warn!(node = %node, for_s = self.config.blacklist.as_secs(), "result shown wrong: node blacklisted");
            }
            _ => entry.lift_blacklist(now_ms),
        }
        let succeeded = matches!(
            outcome,
            Outcome::Verified | Outcome::Completed | Outcome::Agreed
        );
        log_transition(*node, entry.breaker.record(now_ms, succeeded));
        entry.admitting = entry.breaker.is_admitting(now_ms);
        entry.rescore(&self.config.score);
        reindex(&mut self.placement, *node, entry);
    }

    /// A run of `fuel` that the node answered `elapsed` after it was assigned: raises the node's
    /// observed fuel rate if this run was faster. Runs under [`OBSERVED_MIN_FUEL`] are ignored:
    /// in them the messages and the instantiation, not the work, set the time. Call it only
    /// for results another node agreed with: the fuel is the receipt's, which a receipt alone
    /// could overstate (the dispatcher does so).
    pub fn observe_run(&mut self, node: &NodeId, fuel: u64, elapsed: Duration) {
        if fuel < OBSERVED_MIN_FUEL {
            return;
        }
        let Some(entry) = self.nodes.get_mut(node) else {
            return;
        };
        let micros = elapsed.as_micros().max(1);
        let rate = u64::try_from(u128::from(fuel) * 1_000_000 / micros).unwrap_or(u64::MAX);
        let Some(rate) = NonZeroU64::new(rate) else {
            return;
        };
        if entry.observed_fuel_per_s.is_none_or(|o| rate > o) {
            entry.observed_fuel_per_s = Some(rate);
            reindex(&mut self.placement, *node, entry);
        }
    }

    /// Counts a task dispatched to the node; call it once per assignment sent.
    pub fn task_started(&mut self, node: &NodeId) {
        if let Some(entry) = self.nodes.get_mut(node) {
            entry.in_flight = entry.in_flight.saturating_add(1);
            reindex(&mut self.placement, *node, entry);
        }
    }

    /// Counts a task on the node as over (reported, refused, or given up on).
    pub fn task_finished(&mut self, node: &NodeId) {
        if let Some(entry) = self.nodes.get_mut(node) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
            entry.resting = false;
            reindex(&mut self.placement, *node, entry);
        }
    }

    /// The node refused a task for a reason of its own that the registry did not know (all its
    /// slots taken by tasks from before a coordinator restart or attempts given up on, its own
    /// breaker open, shutting down): it is not chosen again until its next report or telemetry
    /// sample.
    pub fn rest(&mut self, node: &NodeId) {
        if let Some(entry) = self.nodes.get_mut(node) {
            entry.resting = true;
            reindex(&mut self.placement, *node, entry);
        }
    }

    /// Chooses a node for a task, or `None` if no node is eligible.
    ///
    /// Eligible: online (presence not "offline", valid traffic within the liveness window
    /// before `now`), breaker admitting (closed, or half-open with its probe slot free), the
    /// node's own reported breaker not open, fewer tasks in flight than its `max_concurrency`,
    /// enough free memory, the engine, arch and labels asked for, and not in `exclude`. Among
    /// those, `strategy` decides (see [`Strategy`]).
    ///
    /// A breaker is judged as of the last time it was fed: one that opened half-opens at the
    /// node's first telemetry sample after its cool-down (samples arrive every few seconds, the
    /// cool-down is 30 s or more), not at the exact millisecond the cool-down ends.
    ///
    /// Choosing a half-open node spends its one probe: it is not chosen again until the probe's
    /// outcome is [recorded](Registry::record). Choosing does not count the task as in flight;
    /// call [`Registry::task_started`] when it is dispatched.
    ///
    /// Cost: O(log n) plus the available nodes ranked above the choice that do not meet `req`
    /// or are excluded; latency-aware placement also walks the nodes that are nearer but slower
    /// or faster but farther than its choice (see [`Strategy::LatencyAware`]).
    pub fn select(
        &mut self,
        now: Instant,
        req: &Requirements,
        strategy: Strategy,
        exclude: &[NodeId],
    ) -> Option<NodeId> {
        self.select_by(
            now,
            req,
            exclude,
            |_| true,
            |placement, fits| placement.pick(strategy, req.fuel, fits),
        )
    }

    /// As [`Registry::select`], with the node drawn uniformly (the `draw`-th, modulo their
    /// number) among the eligible [proven](Registry::proven) nodes, or among all eligible
    /// nodes when no proven one is free: for a task's checks and further replicas. A node
    /// cannot make itself the likely checker of another by what it reports, colluders meet
    /// each other about as often as their share of the proven pool, and a node that has not
    /// agreed with others yet decides no vote while a proven one is free.
    ///
    /// Cost: O(n) in the available nodes.
    pub fn select_uniform(
        &mut self,
        now: Instant,
        req: &Requirements,
        exclude: &[NodeId],
        draw: u64,
    ) -> Option<NodeId> {
        let trust_after = self.config.trust_after;
        let uniform = |placement: &mut Placement, fits: &mut dyn FnMut(NodeId) -> bool| {
            placement.pick_uniform(draw, fits)
        };
        self.select_by(
            now,
            req,
            exclude,
            |n| n.agreed_in_a_row >= trust_after,
            uniform,
        )
        .or_else(|| self.select_by(now, req, exclude, |_| true, uniform))
    }

    fn select_by(
        &mut self,
        now: Instant,
        req: &Requirements,
        exclude: &[NodeId],
        also: impl Fn(&Node) -> bool,
        mut pick: impl FnMut(&mut Placement, &mut dyn FnMut(NodeId) -> bool) -> Option<NodeId>,
    ) -> Option<NodeId> {
        let now_ms = self.now_ms(now);
        self.expire(now);
        if !self.placement.may_satisfy(req) {
            return None;
        }
        loop {
            let nodes = &self.nodes;
            let id = pick(&mut self.placement, &mut |id| {
                !exclude.contains(&id)
                    && nodes.get(&id).is_some_and(|n| {
                        also(n) && req.is_met_by(n.attributes(), n.mem_free_bytes())
                    })
            })?;
            let node = self.nodes.get_mut(&id)?;
            match node.breaker.admit(now_ms) {
                Admission::Admit => return Some(id),
                Admission::Probe => {
                    tracing::info!(node = %id, "probe task for a half-open breaker");
                    node.admitting = node.breaker.is_admitting(now_ms);
                    reindex(&mut self.placement, id, node);
                    return Some(id);
                }
                // Indexed nodes were admitting when last fed, and only feeding the breaker
                // changes that; handled anyway by dropping the node and looking further.
                Admission::Refuse(_) => {
                    node.admitting = false;
                    reindex(&mut self.placement, id, node);
                }
            }
        }
    }

    /// Why no registered node could ever run a task that needs `req` on `replicas` distinct
    /// nodes: names the first requirement no node meets (arch, engine, a label, memory, the
    /// number of nodes). `None` when enough registered nodes meet every requirement, so the
    /// task only waited for one of them to be online, healthy and free.
    ///
    /// O(n): for the failure message of a task that timed out in the queue, not for placement.
    pub fn unmet(&self, req: &Requirements, replicas: usize) -> Option<String> {
        if self.nodes.is_empty() {
            return Some("no node is registered".into());
        }
        let listed = |values: &mut Vec<String>| {
            values.sort_unstable();
            values.dedup();
            values.join(", ")
        };
        if let Some(arch) = &req.arch
            && !self.nodes.values().any(|n| &n.arch == arch)
        {
            let mut all: Vec<String> = self.nodes.values().map(|n| n.arch.clone()).collect();
            return Some(format!(
                "no registered node has arch {arch:?} (registered: {})",
                listed(&mut all)
            ));
        }
        if let Some(engine) = req.engine
            && !self.nodes.values().any(|n| n.engine.satisfies(engine))
        {
            return Some(format!(
                "no registered node runs the {} engine",
                engine.as_str()
            ));
        }
        if let Some(label) = req
            .labels
            .iter()
            .find(|l| !self.nodes.values().any(|n| n.labels.contains(l)))
        {
            return Some(format!("no registered node has the label {label:?}"));
        }
        let matching: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| req.is_met_by(n.attributes(), u64::MAX))
            .collect();
        if matching.is_empty() {
            return Some(
                "no registered node has the arch, engine and labels asked for together".into(),
            );
        }
        let most = matching
            .iter()
            .map(|n| n.mem_free_bytes())
            .max()
            .unwrap_or(0);
        if most < req.memory_bytes {
            let total = matching
                .iter()
                .map(|n| n.mem_total_bytes)
                .max()
                .unwrap_or(0);
            return Some(format!(
                "limits.memory_bytes {} is more than any matching node has free ({most} bytes free, {total} bytes in all on the largest)",
                req.memory_bytes
            ));
        }
        let able = matching
            .iter()
            .filter(|n| n.mem_free_bytes() >= req.memory_bytes)
            .count();
        (able < replicas).then(|| {
            format!("the task needs {replicas} distinct nodes and {able} registered nodes meet its requirements")
        })
    }

    /// Why no node outside `exclude` could run a task that needs `req` once it has a free
    /// slot; `None` when one could. For a spot check, whose only question is
    /// whether a second node exists at all: the caller excludes the nodes the task has used.
    ///
    /// Only nodes online and not blacklisted count: a check waits for a busy node, not for
    /// one that is gone.
    ///
    /// O(n): only when a check cannot be placed at once.
    pub fn unmet_without(
        &self,
        now: Instant,
        req: &Requirements,
        exclude: &[NodeId],
    ) -> Option<String> {
        let able = self
            .nodes
            .iter()
            .any(|(id, n)| !exclude.contains(id) && n.can_run(now, req));
        (!able).then(|| {
            format!(
                "no other online node can run it ({} registered, {} used for this task)",
                self.nodes.len(),
                exclude.len()
            )
        })
    }

    /// How many nodes outside `exclude` could run a task that needs `req`, busy or not:
    /// online, not blacklisted, meeting its requirements. What a vote can still draw on.
    ///
    /// O(n): only when replicas disagree.
    pub fn able(&self, now: Instant, req: &Requirements, exclude: &[NodeId]) -> usize {
        self.others(exclude).filter(|n| n.can_run(now, req)).count()
    }

    /// Whether the node is blacklisted (shown to return a wrong result within
    /// [`RegistryConfig::blacklist`]).
    pub fn blacklisted(&self, node: &NodeId) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|n| n.blacklisted_until_ms.is_some())
    }

    /// Whether a node outside `exclude` could take a task that needs `req` as soon as it has
    /// a free slot: able, and with both breakers admitting. Stops at the first.
    pub fn any_ready(&self, now: Instant, req: &Requirements, exclude: &[NodeId]) -> bool {
        self.others(exclude)
            .any(|n| n.can_run(now, req) && n.is_ready())
    }

    fn others<'a>(&'a self, exclude: &'a [NodeId]) -> impl Iterator<Item = &'a Node> + 'a {
        self.nodes
            .iter()
            .filter(move |(id, _)| !exclude.contains(id))
            .map(|(_, n)| n)
    }

    /// Whether the node's recent results agreed with other nodes' often enough in a row
    /// ([`RegistryConfig::trust_after`]) for its `receipt` tasks to run unchecked (but for
    /// the random spot checks that never stop). Unknown nodes are not proven.
    pub fn proven(&self, node: &NodeId) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|n| n.agreed_in_a_row >= self.config.trust_after)
    }

    /// The bound on the chance that a result from this node is wrong ([`ambient_core::doubt`]
    /// of its agreements in a row, with [`RegistryConfig::assumed_faulty_permille`]); an
    /// unknown node is as doubtful as a node never checked.
    pub fn doubt(&self, node: &NodeId) -> f64 {
        let agreed = self.nodes.get(node).map_or(0, |n| n.agreed_in_a_row);
        ambient_core::doubt(agreed, self.config.assumed_faulty_permille)
    }

    /// Takes nodes whose liveness ran out by `now` out of the indexes.
    fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(node) = self.nodes.get_mut(&id) {
                node.live = false;
                self.silent.push(id);
                tracing::info!(node = %id, "node went silent");
                reindex(&mut self.placement, id, node);
            }
        }
    }

    /// How many nodes are registered, online or not.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node is registered.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// How many nodes could take a task now, as of the last change (liveness is brought up to
    /// date by [`Registry::select`]).
    pub fn available(&self) -> usize {
        self.placement.len()
    }

    /// One node as of `now`.
    pub fn view(&self, now: Instant, node: &NodeId) -> Option<NodeView> {
        let now_ms = self.peek_ms(now);
        let faulty = self.config.assumed_faulty_permille;
        self.nodes
            .get(node)
            .map(|n| n.view(*node, now, now_ms, faulty))
    }

    /// Every registered node as of `now`, in node-id order. O(n log n): for listings and
    /// snapshots, not for the dispatch path.
    pub fn views(&self, now: Instant) -> Vec<NodeView> {
        let now_ms = self.peek_ms(now);
        let mut views: Vec<NodeView> = self
            .nodes
            .iter()
            .map(|(id, n)| n.view(*id, now, now_ms, self.config.assumed_faulty_permille))
            .collect();
        views.sort_unstable_by_key(|v| v.node);
        views
    }
}

/// Counts valid traffic at `now`: the node's liveness window starts again.
fn refresh(
    deadlines: &mut BTreeSet<(Instant, NodeId)>,
    liveness: Duration,
    id: NodeId,
    node: &mut Node,
    now: Instant,
) {
    if node.live
        && let Some(old) = node.deadline
    {
        deadlines.remove(&(old, id));
    }
    node.last_seen = now;
    node.deadline = now.checked_add(liveness);
    node.live = true;
    if let Some(deadline) = node.deadline {
        deadlines.insert((deadline, id));
    }
}

impl fmt::Debug for Registry {
    /// The counts only: a registry of 100k nodes is not something to print.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("nodes", &self.nodes.len())
            .field("available", &self.placement.len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Signed test traffic from real keys, shared by the registry's and the scheduler's tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::sync::OnceLock;
    use std::time::Instant;

    use ambient_core::{
        Announce, Engine, Identity, NodeId, SignedAnnounce, SignedTelemetry, Telemetry,
        TelemetrySample, sign_message,
    };

    use crate::{Registry, RegistryConfig};

    /// One instant shared by every test, the registry's "start".
    pub(crate) fn t0() -> Instant {
        static T0: OnceLock<Instant> = OnceLock::new();
        *T0.get_or_init(Instant::now)
    }

    pub(crate) fn identity(n: usize) -> Identity {
        let mut secret = [0x5a; 32];
        secret[..8].copy_from_slice(&(n as u64).to_le_bytes());
        Identity::from_secret(&secret)
    }

    pub(crate) fn announce(identity: &Identity) -> Announce {
        Announce {
            node: identity.node_id(),
            public_key: identity.public_key(),
            arch: "aarch64".parse().unwrap(),
            cores: 4,
            mem_total_bytes: 4 << 30,
            engine: Engine::Wasmtime,
            agent_version: "0.1.0".parse().unwrap(),
            labels: Default::default(),
            profile: None,
            max_concurrency: 2,
            fuel_per_s: None,
        }
    }

    pub(crate) fn sign_announce(identity: &Identity, announce: Announce) -> SignedAnnounce {
        let signature = sign_message(identity, SignedAnnounce::TAG, &announce).unwrap();
        SignedAnnounce {
            announce,
            signature,
        }
    }

    pub(crate) fn sign_telemetry(identity: &Identity, telemetry: Telemetry) -> SignedTelemetry {
        let signature = sign_message(identity, SignedTelemetry::TAG, &telemetry).unwrap();
        SignedTelemetry {
            telemetry,
            signature,
        }
    }

    /// A registry with `n` announced nodes and helpers to make them speak.
    pub(crate) struct Fleet {
        pub(crate) registry: Registry,
        pub(crate) identities: Vec<Identity>,
        pub(crate) announces: Vec<Announce>,
        pub(crate) seqs: Vec<u64>,
    }

    impl Fleet {
        pub(crate) fn new(n: usize) -> Self {
            Self::with(n, |_| {})
        }

        /// `n` nodes announced at [`t0`], each announce adjusted by `adjust`, each followed by
        /// an empty signed sample (a node is eligible only once it has sent telemetry).
        pub(crate) fn with(n: usize, adjust: impl Fn(&mut Announce)) -> Self {
            Self::configured(RegistryConfig::default(), n, adjust)
        }

        pub(crate) fn configured(
            config: RegistryConfig,
            n: usize,
            adjust: impl Fn(&mut Announce),
        ) -> Self {
            let mut fleet = Self {
                registry: Registry::new(config),
                identities: (0..n).map(identity).collect(),
                announces: Vec::new(),
                seqs: vec![0; n],
            };
            for i in 0..n {
                let mut a = announce(&fleet.identities[i]);
                adjust(&mut a);
                fleet.announces.push(a);
                fleet.reannounce(t0(), i, |_| {});
                fleet.report(t0(), i, TelemetrySample::default());
            }
            fleet
        }

        pub(crate) fn id(&self, i: usize) -> NodeId {
            self.identities[i].node_id()
        }

        /// Node `i` announces again, with `change` applied to its last announce.
        pub(crate) fn reannounce(
            &mut self,
            now: Instant,
            i: usize,
            change: impl FnOnce(&mut Announce),
        ) {
            change(&mut self.announces[i]);
            let signed = sign_announce(&self.identities[i], self.announces[i].clone());
            self.registry.on_announce(now, &signed).unwrap();
        }

        /// Node `i`'s next telemetry sample (boot 1), signed and not yet delivered.
        pub(crate) fn telemetry(&mut self, i: usize, sample: TelemetrySample) -> SignedTelemetry {
            self.seqs[i] += 1;
            let telemetry = Telemetry {
                node: self.id(i),
                seq: self.seqs[i],
                boot_id: 1,
                sample,
            };
            sign_telemetry(&self.identities[i], telemetry)
        }

        /// Node `i` reports `sample`; the registry must accept it.
        pub(crate) fn report(&mut self, now: Instant, i: usize, sample: TelemetrySample) {
            let signed = self.telemetry(i, sample);
            self.registry.on_telemetry(now, &signed).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use ambient_core::{
        BreakerState, NodeId, SafetyPolicy, SignedTelemetry, Telemetry, TelemetrySample,
    };

    use super::fixtures::{Fleet, announce, identity, sign_announce, sign_telemetry, t0};
    use super::*;

    fn healthy() -> TelemetrySample {
        TelemetrySample {
            bandwidth_kbps: Some(50_000),
            latency_us: Some(20_000),
            cpu_load_permille: Some(250),
            mem_free_bytes: Some(1 << 30),
            temp_millic: Some(55_000),
            ..Default::default()
        }
    }

    fn hot() -> TelemetrySample {
        TelemetrySample {
            temp_millic: Some(86_000),
            ..healthy()
        }
    }

    fn pick(fleet: &mut Fleet, now: Instant) -> Option<NodeId> {
        fleet
            .registry
            .select(now, &Requirements::default(), Strategy::Weighted, &[])
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn an_announce_registers_the_node_under_its_derived_id() {
        let me = identity(1);
        let mut registry = Registry::new(RegistryConfig::default());
        let id = registry
            .on_announce(t0(), &sign_announce(&me, announce(&me)))
            .unwrap();
        assert_eq!(id, me.node_id());
        assert_eq!(registry.len(), 1);
        assert_eq!(registry.public_key(&id), Some(&me.public_key()));
        let view = registry.view(t0(), &id).unwrap();
        assert!(view.online);
        assert_eq!(
            (view.arch.as_str(), view.engine.as_str(), view.cores),
            ("aarch64", "wasmtime", 4)
        );
    }

    #[test]
    fn an_announced_node_gets_no_task_until_its_first_signed_telemetry() {
        let me = identity(1);
        let mut registry = Registry::new(RegistryConfig::default());
        let id = registry
            .on_announce(t0(), &sign_announce(&me, announce(&me)))
            .unwrap();
        let req = Requirements::default();
        assert_eq!(registry.select(t0(), &req, Strategy::Weighted, &[]), None);
        let telemetry = Telemetry {
            node: id,
            seq: 1,
            boot_id: 1,
            sample: healthy(),
        };
        registry
            .on_telemetry(t0(), &sign_telemetry(&me, telemetry))
            .unwrap();
        assert_eq!(
            registry.select(t0(), &req, Strategy::Weighted, &[]),
            Some(id)
        );
    }

    #[test]
    fn open_enrollment_holds_at_most_max_nodes_and_admits_new_ones_at_the_join_rate() {
        let config = RegistryConfig {
            max_nodes: 30,
            joins_per_s: 2,
            ..RegistryConfig::default()
        };
        let mut registry = Registry::new(config);
        let join = |registry: &mut Registry, i: usize, now: Instant| {
            let id = identity(i);
            registry.on_announce(now, &sign_announce(&id, announce(&id)))
        };
        // A burst of ten seconds' worth, then one per half second.
        for i in 0..20 {
            join(&mut registry, i, t0()).unwrap();
        }
        assert_eq!(
            join(&mut registry, 20, t0()),
            Err(RegistryError::TooManyJoins)
        );
        join(&mut registry, 20, t0() + Duration::from_millis(500)).unwrap();
        // A known node re-announces whatever the rate.
        join(&mut registry, 0, t0() + Duration::from_millis(500)).unwrap();
        for i in 21..30 {
            join(&mut registry, i, t0() + secs(60)).unwrap();
        }
        assert_eq!(
            join(&mut registry, 30, t0() + secs(120)),
            Err(RegistryError::Full(30))
        );
        assert_eq!(registry.len(), 30);
    }

    #[test]
    fn forgeries_beyond_a_nodes_budget_are_dropped_unverified_and_honest_traffic_never_uses_it() {
        let config = RegistryConfig {
            bad_frames_per_s: 2,
            ..RegistryConfig::default()
        };
        let mut registry = Registry::new(config);
        let me = identity(1);
        let id = me.node_id();
        registry
            .on_announce(t0(), &sign_announce(&me, announce(&me)))
            .unwrap();
        let sample = |seq| Telemetry {
            node: id,
            seq,
            boot_id: 1,
            sample: healthy(),
        };
        // However fast an honest node sends, it is never limited.
        for seq in 1..=100 {
            registry
                .on_telemetry(t0(), &sign_telemetry(&me, sample(seq)))
                .unwrap();
        }
        // Twenty forgeries (2/s, ten seconds deep) are checked and refused...
        let forger = identity(2);
        for seq in 101..=120 {
            assert_eq!(
                registry.on_telemetry(t0(), &sign_telemetry(&forger, sample(seq))),
                Err(RegistryError::BadSignature)
            );
        }
        // ...then frames in its name are dropped unchecked, its own included, until the budget
        // refills.
        assert_eq!(
            registry.on_telemetry(t0(), &sign_telemetry(&forger, sample(121))),
            Err(RegistryError::TooFast)
        );
        assert_eq!(
            registry.on_telemetry(t0(), &sign_telemetry(&me, sample(122))),
            Err(RegistryError::TooFast)
        );
        assert_eq!(
            registry.on_announce(t0(), &sign_announce(&me, announce(&me))),
            Err(RegistryError::TooFast)
        );
        registry
            .on_telemetry(
                t0() + Duration::from_millis(500),
                &sign_telemetry(&me, sample(123)),
            )
            .unwrap();
    }

    #[test]
    fn a_node_idle_past_forget_after_is_forgotten_and_may_join_again() {
        let config = RegistryConfig {
            forget_after: secs(3600),
            ..RegistryConfig::default()
        };
        let mut fleet = Fleet::configured(config, 2, |_| {});
        let (busy, idle) = (fleet.id(0), fleet.id(1));
        fleet.registry.task_started(&busy);
        assert!(fleet.registry.went_silent(t0() + secs(3599)).len() == 2);
        fleet.registry.went_silent(t0() + secs(3700));
        assert!(fleet.registry.view(t0(), &idle).is_none(), "forgotten");
        assert!(
            fleet.registry.view(t0(), &busy).is_some(),
            "a node with a task stays"
        );
        fleet.reannounce(t0() + secs(3800), 1, |_| {});
        assert!(fleet.registry.view(t0(), &idle).is_some());
    }

    #[test]
    fn an_offline_presence_stops_placements_and_ends_liveness_after_the_grace() {
        let mut fleet = Fleet::new(1);
        let id = fleet.id(0);
        fleet.registry.on_status(t0(), id, false);
        assert_eq!(pick(&mut fleet, t0()), None, "no new task meanwhile");
        assert!(fleet.registry.went_silent(t0() + secs(9)).is_empty());
        assert_eq!(fleet.registry.went_silent(t0() + secs(10)), vec![id]);
        assert!(
            fleet.registry.went_silent(t0() + secs(11)).is_empty(),
            "once"
        );
    }

    #[test]
    fn a_node_that_disproves_an_offline_presence_in_time_never_goes_silent() {
        let mut fleet = Fleet::new(1);
        let id = fleet.id(0);
        fleet.registry.on_status(t0(), id, false);
        fleet.report(t0() + secs(5), 0, healthy());
        assert_eq!(pick(&mut fleet, t0() + secs(5)), Some(id));
        assert!(fleet.registry.went_silent(t0() + secs(19)).is_empty());
    }

    #[test]
    fn an_announce_claiming_another_nodes_id_is_rejected() {
        let (me, victim) = (identity(1), identity(2));
        let mut a = announce(&me);
        a.node = victim.node_id();
        let mut registry = Registry::new(RegistryConfig::default());
        assert_eq!(
            registry.on_announce(t0(), &sign_announce(&me, a)),
            Err(RegistryError::IdMismatch)
        );
        assert!(registry.is_empty());
    }

    #[test]
    fn a_tampered_announce_is_rejected() {
        let me = identity(1);
        let mut signed = sign_announce(&me, announce(&me));
        signed.announce.cores = 64;
        let mut registry = Registry::new(RegistryConfig::default());
        assert_eq!(
            registry.on_announce(t0(), &signed),
            Err(RegistryError::BadSignature)
        );
        assert!(registry.is_empty());
    }

    #[test]
    fn an_allowlist_refuses_unknown_keys() {
        let (friend, stranger) = (identity(1), identity(2));
        let config = RegistryConfig {
            enrollment: Enrollment::Allowlist(HashSet::from([friend.public_key()])),
            ..Default::default()
        };
        let mut registry = Registry::new(config);
        let refused = registry.on_announce(t0(), &sign_announce(&stranger, announce(&stranger)));
        assert_eq!(refused, Err(RegistryError::NotAllowed));
        let admitted = registry.on_announce(t0(), &sign_announce(&friend, announce(&friend)));
        assert_eq!(admitted, Ok(friend.node_id()));
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn an_unlisted_key_must_prove_itself_and_joins_once_approved_until_revoked() {
        let (friend, stranger) = (identity(1), identity(2));
        let config = RegistryConfig {
            enrollment: Enrollment::Allowlist(HashSet::from([friend.public_key()])),
            ..Default::default()
        };
        let mut registry = Registry::new(config);
        let mut forged = sign_announce(&stranger, announce(&stranger));
        forged.signature[0] ^= 1;
        assert_eq!(
            registry.on_announce(t0(), &forged),
            Err(RegistryError::BadSignature),
            "only a key holder waits for approval"
        );

        registry.approve(stranger.public_key());
        let signed = sign_announce(&stranger, announce(&stranger));
        assert_eq!(registry.on_announce(t0(), &signed), Ok(stranger.node_id()));

        // Revoked: gone at once, refused from then on, even a key the configuration lists.
        assert_eq!(
            registry.revoke(stranger.public_key()),
            Some(stranger.node_id())
        );
        assert_eq!(
            registry.revoke(friend.public_key()),
            None,
            "never registered"
        );
        assert_eq!(registry.len(), 0);
        assert_eq!(
            registry.on_announce(t0(), &signed),
            Err(RegistryError::Revoked)
        );
        let friendly = sign_announce(&friend, announce(&friend));
        assert_eq!(
            registry.on_announce(t0(), &friendly),
            Err(RegistryError::Revoked)
        );
        registry.approve(friend.public_key());
        assert_eq!(registry.on_announce(t0(), &friendly), Ok(friend.node_id()));
    }

    #[test]
    fn a_revoked_node_is_never_placed_again_in_open_enrollment() {
        let mut fleet = Fleet::new(2);
        let key = *fleet.registry.public_key(&fleet.id(0)).unwrap();
        assert_eq!(fleet.registry.revoke(key), Some(fleet.id(0)));
        for _ in 0..4 {
            let chosen =
                fleet
                    .registry
                    .select(t0(), &Requirements::default(), Strategy::RoundRobin, &[]);
            assert_eq!(chosen, Some(fleet.id(1)));
        }
    }

    #[test]
    fn telemetry_signed_by_another_key_is_rejected() {
        let mut fleet = Fleet::new(1);
        let forger = identity(9);
        let forged = sign_telemetry(
            &forger,
            Telemetry {
                node: fleet.id(0),
                seq: 2,
                boot_id: 1,
                sample: healthy(),
            },
        );
        assert_eq!(
            fleet.registry.on_telemetry(t0(), &forged),
            Err(RegistryError::BadSignature)
        );
        assert_eq!(
            fleet.registry.view(t0(), &fleet.id(0)).unwrap().sample,
            Some(TelemetrySample::default())
        );
        // The forgery did not use up sequence number 2.
        fleet.report(t0(), 0, healthy());
    }

    #[test]
    fn telemetry_from_an_unannounced_node_is_rejected() {
        let stranger = identity(3);
        let mut registry = Registry::new(RegistryConfig::default());
        let t = Telemetry {
            node: stranger.node_id(),
            seq: 1,
            boot_id: 1,
            sample: healthy(),
        };
        let signed = sign_telemetry(&stranger, t);
        assert_eq!(
            registry.on_telemetry(t0(), &signed),
            Err(RegistryError::UnknownNode)
        );
    }

    #[test]
    fn a_replayed_sample_is_rejected() {
        let mut fleet = Fleet::new(1);
        let first = fleet.telemetry(0, healthy());
        let second = fleet.telemetry(0, hot());
        fleet.registry.on_telemetry(t0(), &first).unwrap();
        fleet.registry.on_telemetry(t0(), &second).unwrap();
        assert_eq!(
            fleet.registry.on_telemetry(t0(), &second),
            Err(RegistryError::Replay)
        );
        assert_eq!(
            fleet.registry.on_telemetry(t0(), &first),
            Err(RegistryError::Replay),
            "older"
        );
    }

    #[test]
    fn a_restarted_agent_may_count_from_zero_again_but_its_old_run_stays_closed() {
        let mut fleet = Fleet::new(1);
        let me = identity(0);
        let run = |boot_id, seq| {
            let t = Telemetry {
                node: me.node_id(),
                seq,
                boot_id,
                sample: healthy(),
            };
            sign_telemetry(&me, t)
        };
        let (old_5, old_4, new_0, new_1) = (run(10, 5), run(10, 4), run(11, 0), run(11, 1));
        let r = &mut fleet.registry;
        r.on_telemetry(t0(), &old_5).unwrap();
        r.on_telemetry(t0(), &new_0).unwrap();
        assert_eq!(r.on_telemetry(t0(), &old_4), Err(RegistryError::Replay));
        assert_eq!(r.on_telemetry(t0(), &old_5), Err(RegistryError::Replay));
        r.on_telemetry(t0(), &new_1).unwrap();
        assert_eq!(r.on_telemetry(t0(), &new_0), Err(RegistryError::Replay));
    }

    #[test]
    fn a_silent_node_goes_offline_after_the_liveness_window() {
        let mut fleet = Fleet::new(1);
        let id = fleet.id(0);
        fleet.report(t0() + secs(10), 0, healthy());
        let just_before = t0() + secs(25) - Duration::from_millis(1);
        assert_eq!(pick(&mut fleet, just_before), Some(id));
        assert!(fleet.registry.view(just_before, &id).unwrap().online);

        let after = t0() + secs(25);
        assert_eq!(pick(&mut fleet, after), None);
        let view = fleet.registry.view(after, &id).unwrap();
        assert!(!view.online);
        assert_eq!(view.last_seen_ms_ago, Some(15_000));

        fleet.report(t0() + secs(40), 0, healthy());
        assert_eq!(
            pick(&mut fleet, t0() + secs(40)),
            Some(id),
            "speaking again brings it back"
        );
    }

    #[test]
    fn a_verified_report_keeps_a_silent_node_alive() {
        let mut fleet = Fleet::new(1);
        let id = fleet.id(0);
        fleet.registry.touch(t0() + secs(10), id);
        assert_eq!(pick(&mut fleet, t0() + secs(20)), Some(id));
        assert_eq!(pick(&mut fleet, t0() + secs(25)), None);
    }

    #[test]
    fn a_last_will_takes_the_node_out_until_it_speaks_again() {
        let mut fleet = Fleet::new(1);
        let id = fleet.id(0);
        fleet.report(t0(), 0, healthy());
        fleet.registry.on_status(t0(), id, false);
        assert_eq!(pick(&mut fleet, t0()), None);
        assert!(!fleet.registry.view(t0(), &id).unwrap().online);

        fleet.registry.on_status(t0(), id, true);
        assert_eq!(pick(&mut fleet, t0()), Some(id), "back online");

        fleet.registry.on_status(t0(), id, false);
        fleet.report(t0() + secs(1), 0, healthy());
        assert_eq!(
            pick(&mut fleet, t0() + secs(1)),
            Some(id),
            "fresh telemetry outranks a stale will"
        );
    }

    #[test]
    fn an_online_status_alone_does_not_revive_a_silent_node() {
        let mut fleet = Fleet::new(1);
        let id = fleet.id(0);
        fleet.registry.on_status(t0() + secs(20), id, true);
        assert_eq!(pick(&mut fleet, t0() + secs(20)), None);
    }

    #[test]
    fn a_last_will_that_arrives_before_the_announce_is_remembered() {
        let me = identity(4);
        let mut registry = Registry::new(RegistryConfig::default());
        registry.on_status(t0(), me.node_id(), false);
        registry
            .on_announce(t0(), &sign_announce(&me, announce(&me)))
            .unwrap();
        let req = Requirements::default();
        assert_eq!(registry.select(t0(), &req, Strategy::Weighted, &[]), None);
        assert!(!registry.view(t0(), &me.node_id()).unwrap().online);
    }

    #[test]
    fn a_node_over_85c_receives_no_tasks() {
        let mut fleet = Fleet::new(2);
        fleet.report(t0(), 0, healthy());
        fleet.report(t0(), 1, hot());
        for strategy in Strategy::ALL {
            for _ in 0..3 {
                let pick = fleet
                    .registry
                    .select(t0(), &Requirements::default(), strategy, &[]);
                assert_eq!(pick, Some(fleet.id(0)), "{strategy}");
            }
        }
        let view = fleet.registry.view(t0(), &fleet.id(1)).unwrap();
        assert_eq!(view.breaker, BreakerState::Open);
        assert_eq!(
            view.breaker_reason.as_deref(),
            Some("temperature 86.0 °C is over the 85.0 °C limit")
        );
    }

    #[test]
    fn a_half_open_node_gets_exactly_one_probe() {
        let mut fleet = Fleet::new(1);
        let id = fleet.id(0);
        fleet.report(t0(), 0, hot());
        let cool = TelemetrySample {
            temp_millic: Some(60_000),
            ..healthy()
        };
        fleet.report(t0() + secs(10), 0, cool.clone());
        assert_eq!(
            pick(&mut fleet, t0() + secs(10)),
            None,
            "still cooling down"
        );

        let later = t0() + secs(31);
        fleet.report(later, 0, cool);
        assert_eq!(
            fleet.registry.view(later, &id).unwrap().breaker,
            BreakerState::HalfOpen
        );
        assert_eq!(pick(&mut fleet, later), Some(id), "the probe");
        for strategy in Strategy::ALL {
            let again = fleet
                .registry
                .select(later, &Requirements::default(), strategy, &[]);
            assert_eq!(again, None, "{strategy}: one probe only");
        }

        fleet
            .registry
            .record(later + secs(1), &id, Outcome::Completed);
        assert_eq!(
            fleet.registry.view(later, &id).unwrap().breaker,
            BreakerState::Closed
        );
        assert_eq!(pick(&mut fleet, later + secs(1)), Some(id));
        assert_eq!(
            pick(&mut fleet, later + secs(1)),
            Some(id),
            "closed: no longer one at a time"
        );
    }

    #[test]
    fn a_failed_probe_reopens_the_breaker() {
        let mut fleet = Fleet::new(1);
        let id = fleet.id(0);
        fleet.report(
            t0(),
            0,
            TelemetrySample {
                latency_us: Some(150_000),
                ..healthy()
            },
        );
        let later = t0() + secs(30);
        fleet.report(later, 0, healthy());
        assert_eq!(pick(&mut fleet, later), Some(id));
        fleet.registry.record(later + secs(2), &id, Outcome::Failed);
        let view = fleet.registry.view(later, &id).unwrap();
        assert_eq!(view.breaker, BreakerState::Open);
        assert_eq!(
            view.breaker_reason.as_deref(),
            Some("the probe task failed")
        );
        fleet.report(later + secs(40), 0, healthy());
        assert_eq!(
            pick(&mut fleet, later + secs(40)),
            None,
            "the cool-down doubled to 60 s"
        );
    }

    #[test]
    fn a_node_whose_own_breaker_is_open_receives_no_tasks() {
        let mut fleet = Fleet::new(1);
        fleet.report(
            t0(),
            0,
            TelemetrySample {
                breaker: BreakerState::Open,
                ..healthy()
            },
        );
        assert_eq!(pick(&mut fleet, t0()), None);
        fleet.report(t0(), 0, healthy());
        assert_eq!(pick(&mut fleet, t0()), Some(fleet.id(0)));
    }

    #[test]
    fn a_disputed_result_costs_more_than_a_verified_one_earns() {
        let mut fleet = Fleet::new(1);
        let id = fleet.id(0);
        fleet.report(t0(), 0, healthy());
        let score = |fleet: &Fleet| fleet.registry.view(t0(), &id).unwrap().terms;
        let start = score(&fleet);
        fleet.registry.record(t0(), &id, Outcome::Verified);
        let after_verified = score(&fleet);
        fleet.registry.record(t0(), &id, Outcome::Disputed);
        let after_disputed = score(&fleet);

        // Beta(2, 2) prior: 2/4, then 3/5, then 3/(5 + 10) as a dispute weighs ten failures.
        let reputations = (
            start.reputation,
            after_verified.reputation,
            after_disputed.reputation,
        );
        assert_eq!(reputations, (5_000, 6_000, 2_000));
        let (gain, loss) = (reputations.1 - reputations.0, reputations.1 - reputations.2);
        assert!(loss > gain, "gain {gain}, loss {loss}");
        assert!(
            after_disputed.score < start.score,
            "the health score follows reputation"
        );
        let counts = fleet.registry.view(t0(), &id).unwrap().reputation;
        assert_eq!((counts.verified, counts.disputed), (1, 1));
    }

    #[test]
    fn too_many_failures_open_the_breaker() {
        let config = RegistryConfig {
            safety: SafetyPolicy {
                max_errors: 2,
                ..SafetyPolicy::default()
            },
            ..Default::default()
        };
        let mut fleet = Fleet::configured(config, 1, |_| {});
        let id = fleet.id(0);
        for _ in 0..3 {
            assert_eq!(pick(&mut fleet, t0()), Some(id));
            fleet.registry.record(t0(), &id, Outcome::Failed);
        }
        assert_eq!(pick(&mut fleet, t0()), None);
        assert_eq!(fleet.registry.view(t0(), &id).unwrap().reputation.failed, 3);
    }

    #[test]
    fn a_node_tripped_by_failures_gets_a_probe_after_the_cool_down() {
        let config = RegistryConfig {
            safety: SafetyPolicy {
                max_errors: 1,
                ..SafetyPolicy::default()
            },
            ..Default::default()
        };
        let mut fleet = Fleet::configured(config, 1, |_| {});
        let id = fleet.id(0);
        fleet.registry.record(t0(), &id, Outcome::Failed);
        fleet.registry.record(t0(), &id, Outcome::Failed);
        fleet.report(t0() + secs(10), 0, healthy());
        assert_eq!(pick(&mut fleet, t0() + secs(10)), None, "cooling down");
        fleet.report(t0() + secs(30), 0, healthy());
        assert_eq!(pick(&mut fleet, t0() + secs(30)), Some(id), "the probe");
        assert_eq!(pick(&mut fleet, t0() + secs(30)), None);
        fleet
            .registry
            .record(t0() + secs(31), &id, Outcome::Verified);
        assert_eq!(
            fleet.registry.view(t0(), &id).unwrap().breaker,
            BreakerState::Closed
        );
    }

    #[test]
    fn a_node_at_max_concurrency_receives_no_more_tasks() {
        let mut fleet = Fleet::with(1, |a| a.max_concurrency = 2);
        let id = fleet.id(0);
        fleet.registry.task_started(&id);
        assert_eq!(pick(&mut fleet, t0()), Some(id));
        fleet.registry.task_started(&id);
        assert_eq!(pick(&mut fleet, t0()), None);
        assert_eq!(fleet.registry.view(t0(), &id).unwrap().in_flight, 2);
        fleet.registry.task_finished(&id);
        assert_eq!(pick(&mut fleet, t0()), Some(id));
    }

    #[test]
    fn telemetry_updates_the_health_score() {
        let mut fleet = Fleet::new(1);
        let id = fleet.id(0);
        assert_eq!(
            fleet.registry.view(t0(), &id).unwrap().terms.score,
            500,
            "reputation only"
        );
        fleet.report(t0(), 0, healthy());
        // 4 cores at 25% load: the worked example of `health_score`, reputation 0.5.
        let terms = fleet.registry.view(t0(), &id).unwrap().terms;
        assert_eq!(
            (
                terms.bandwidth,
                terms.latency,
                terms.compute,
                terms.reputation
            ),
            (5_000, 8_000, 3_750, 5_000)
        );
        assert_eq!(terms.score, 5_650);
    }

    #[test]
    fn a_reannounce_updates_attributes_but_keeps_the_record() {
        let mut fleet = Fleet::new(1);
        let id = fleet.id(0);
        fleet.registry.record(t0(), &id, Outcome::Verified);
        fleet.reannounce(t0(), 0, |a| {
            a.cores = 8;
            a.labels.push("gpu".parse().unwrap()).unwrap();
        });
        let view = fleet.registry.view(t0(), &id).unwrap();
        assert_eq!(
            (view.cores, view.labels.clone(), view.reputation.verified),
            (8, vec!["gpu".to_owned()], 1)
        );
        let req = Requirements {
            labels: vec!["gpu".into()],
            ..Default::default()
        };
        assert_eq!(
            fleet.registry.select(t0(), &req, Strategy::Weighted, &[]),
            Some(id)
        );
    }

    #[test]
    fn views_list_every_node_in_id_order_and_serialize() {
        let fleet = Fleet::new(4);
        let views = fleet.registry.views(t0());
        let ids: Vec<NodeId> = views.iter().map(|v| v.node).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        assert_eq!(ids.len(), 4);
        let json = serde_json::to_value(&views[0]).unwrap();
        assert_eq!(json["engine"], "wasmtime");
        assert_eq!(json["breaker"], "Closed");
        let back: NodeView = serde_json::from_value(json).unwrap();
        assert_eq!(back, views[0]);
    }

    #[test]
    fn signed_telemetry_round_trips_through_the_wire_types() {
        // Guards the fixtures: what they sign is what `on_telemetry` verifies.
        let mut fleet = Fleet::new(1);
        let signed: SignedTelemetry = fleet.telemetry(0, healthy());
        let mut tampered = signed.clone();
        tampered.telemetry.sample.temp_millic = Some(20_000);
        assert_eq!(
            fleet.registry.on_telemetry(t0(), &tampered),
            Err(RegistryError::BadSignature)
        );
        fleet.registry.on_telemetry(t0(), &signed).unwrap();
    }

    #[test]
    fn the_fuel_rate_placement_counts_on_is_the_announced_one_capped_at_twice_what_runs_showed() {
        let mut fleet = Fleet::with(2, |a| a.fuel_per_s = NonZeroU64::new(1_000_000_000));
        fleet.reannounce(t0(), 1, |a| a.fuel_per_s = None);
        let (id, quiet) = (fleet.id(0), fleet.id(1));
        let rates = |fleet: &Fleet, id| {
            let v = fleet.registry.view(t0(), &id).unwrap();
            (v.fuel_per_s, v.announced_fuel_per_s, v.observed_fuel_per_s)
        };
        assert_eq!(
            rates(&fleet, id),
            (Some(1_000_000_000), Some(1_000_000_000), None)
        );
        // A small run says nothing of speed: messages and instantiation set its time.
        fleet
            .registry
            .observe_run(&id, OBSERVED_MIN_FUEL - 1, Duration::from_secs(1));
        assert_eq!(rates(&fleet, id).2, None);
        // 2·10^8 fuel answered after a second: a fifth of the claim, so the claim gives way
        // to twice what was seen.
        fleet
            .registry
            .observe_run(&id, 200_000_000, Duration::from_secs(1));
        assert_eq!(
            rates(&fleet, id),
            (Some(400_000_000), Some(1_000_000_000), Some(200_000_000))
        );
        // Within a factor 2 of the claim (an honest node's round trip and compile): the claim
        // stands. A slower run later does not lower the best one.
        for ms in [330, 2_000] {
            fleet
                .registry
                .observe_run(&id, 200_000_000, Duration::from_millis(ms));
        }
        assert_eq!(
            rates(&fleet, id),
            (Some(1_000_000_000), Some(1_000_000_000), Some(606_060_606))
        );
        // A node that announced no rate is known by what it was seen to do.
        assert_eq!(rates(&fleet, quiet), (None, None, None));
        fleet
            .registry
            .observe_run(&quiet, 50_000_000, Duration::from_millis(500));
        assert_eq!(
            rates(&fleet, quiet),
            (Some(100_000_000), None, Some(100_000_000))
        );
    }
}
