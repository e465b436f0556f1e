//! The node registry: who is out there, healthy, and trusted.
//!
//! The registry turns what nodes say (signed announces and telemetry, presence, task outcomes)
//! and what the coordinator sees of them (round trips of its own probes, run times) into a view
//! of the pool and into placement decisions. It does no I/O and never reads a clock: every call
//! takes `now` from the coordinator's monotonic clock, and nothing a node says about time is
//! trusted. Calls are expected with non-decreasing `now`.
//!
//! # What ranks a node
//!
//! The health score ([`ambient_core::health_score`]) ranks nodes by what the coordinator
//! observes, never by what a node says it can do:
//!
//! | term | from |
//! |---|---|
//! | bandwidth (4/10) | the coordinator's own probes: a large [`Probe`](ambient_core::Probe) every [`RegistryConfig::bandwidth_probe_every`] ([`Registry::probes`]) |
//! | latency (3/10) | the round trip of the coordinator's probes, every [`RegistryConfig::probe_interval`]; also what latency-aware placement ranks by |
//! | compute (2/10) | the announced cores, times the free share: the smaller of what the node reports and what the coordinator knows is in flight on it |
//! | reputation (1/10) | outcomes the coordinator judged |
//!
//! Until its first pong a node's link terms are 0, as for any unknown reading. What a node
//! reports about itself is used only where the coordinator cannot see: temperature, throttling
//! and its own breaker take it out of the pool, and its CPU load sets the compute term's free
//! share (no higher than the slots the coordinator keeps busy leave; an unreported load gives
//! 0). Its reported latency and bandwidth rank nothing. A node whose reports claim a better
//! link or a faster CPU than the coordinator sees is marked so in [`NodeView::contradicted`].
//!
//! # Layout
//!
//! This file holds the configuration, the views and what nodes say (announces, telemetry,
//! presence, outcomes); `node.rs` is one node's record and its indexes, `selection.rs` the
//! placement queries (select, eligibility, unmet requirements), `fixtures.rs` signed test
//! traffic and `tests.rs` the unit tests.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use ambient_core::{
    Admission, Breaker, BreakerState, Engine, HealthTerms, LinkProbe, NodeId, PublicKey,
    Reputation, SafetyPolicy, ScoreConfig, SignedAnnounce, SignedTelemetry, TelemetrySample,
    Transition, health_score, verify_message_by,
};
use serde::{Deserialize, Serialize};

use crate::scheduler::{Attributes, Keys, Placement};
use crate::{Requirements, Strategy};

mod node;
mod probes;
mod selection;

pub use probes::Probing;

pub(crate) use node::TokenBucket;
use node::{Freshness, Node, reindex, unindex};

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
    /// How often the coordinator probes each online node's round trip. Default 5 s.
    pub probe_interval: Duration,
    /// Every this many probes of a node, one carries [`ambient_core::LARGE_PADDING`] bytes
    /// to measure its bandwidth. Default 12 (once a minute at the default interval: 64 KiB
    /// per node per minute).
    pub bandwidth_probe_every: u32,
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
            probe_interval: Duration::from_secs(5),
            bandwidth_probe_every: 12,
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
    /// A pong that answers no probe outstanding to the node: late (the probe was forgotten),
    /// replayed, or never asked for.
    #[error("pong answers no outstanding probe: late, replayed or never asked for")]
    UnknownProbe,
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
    /// Round-trip time of the coordinator's probes to it, smoothed, in microseconds: what its
    /// latency term and latency-aware placement use. `None` before its first pong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_latency_us: Option<u32>,
    /// Bandwidth the coordinator's large probes showed, smoothed, in kbit/s: what its
    /// bandwidth term uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_bandwidth_kbps: Option<u32>,
    /// Claims of the node that what the coordinator sees contradicts, as sentences: a round
    /// trip under half the shortest seen (and at least 1 ms shorter), a bandwidth over twice
    /// the fastest seen (where it would count in the score), a fuel rate over twice the one
    /// seen. Empty for an honest node; the claims rank nothing either way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contradicted: Vec<String>,
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
    /// When each node is next probed, in order ([`Registry::probes`]); one entry per node,
    /// the one matching its `probe_due`.
    probe_queue: VecDeque<(Instant, NodeId)>,
}

/// Most early "offline" statuses remembered. Statuses are unsigned, so this bounds what a
/// stranger on the broker can make the registry hold.
const MAX_PENDING_OFFLINE: usize = 1 << 17;

/// The least fuel a run must spend for its time to count towards the node's observed fuel
/// rate: 10 million, about 10 ms on a desktop core and 100 ms or more on a small board.
pub const OBSERVED_MIN_FUEL: u64 = 10_000_000;

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
            probe_queue: VecDeque::new(),
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

    /// Time from the first instant the registry was given to `now`: the breakers' clock (in
    /// ms) and the probes' (in µs).
    fn since_epoch(&mut self, now: Instant) -> Duration {
        let epoch = *self.epoch.get_or_insert(now);
        now.saturating_duration_since(epoch)
    }

    /// [`Registry::since_epoch`] in milliseconds.
    fn now_ms(&mut self, now: Instant) -> u64 {
        millis(self.since_epoch(now))
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
            .is_some_and(|n| *n.public_key.as_bytes() != a.public_key)
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
        let verified = PublicKey::from_bytes(&a.public_key).and_then(|key| {
            verify_message_by(&key, SignedAnnounce::TAG, a, &signed.signature).map(|()| key)
        });
        let Ok(public_key) = verified else {
            if let Some(node) = self.nodes.get_mut(&id) {
                node.bad_frames.take(now);
            }
            return Err(RegistryError::BadSignature);
        };
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
                // Ahead of the nodes due later: probed at the next call.
                self.probe_queue.push_front((now, id));
                entry.insert(Node {
                    public_key,
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
                    link: LinkProbe::default(),
                    // The first probe small; the first large one after 1 to `every` of them.
                    large_in: 1 + u32::from(id.0[0]) % self.config.bandwidth_probe_every.max(1),
                    probe_due: now,
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
        if verify_message_by(&node.public_key, SignedTelemetry::TAG, t, &signed.signature).is_err()
        {
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
        self.nodes.get(node).map(|n| n.public_key.as_bytes())
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
            entry.rescore(&self.config.score);
            reindex(&mut self.placement, *node, entry);
        }
    }

    /// Counts a task on the node as over (reported, refused, or given up on).
    pub fn task_finished(&mut self, node: &NodeId) {
        if let Some(entry) = self.nodes.get_mut(node) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
            entry.resting = false;
            entry.rescore(&self.config.score);
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
            .map(|n| n.view(*node, now, now_ms, faulty, &self.config.score))
    }

    /// Every registered node as of `now`, in node-id order. O(n log n): for listings and
    /// snapshots, not for the dispatch path.
    pub fn views(&self, now: Instant) -> Vec<NodeView> {
        let now_ms = self.peek_ms(now);
        let mut views: Vec<NodeView> = self
            .nodes
            .iter()
            .map(|(id, n)| {
                let faulty = self.config.assumed_faulty_permille;
                n.view(*id, now, now_ms, faulty, &self.config.score)
            })
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

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
