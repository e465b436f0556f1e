//! One node's record: what it announced and reported, its breaker, reputation and presence,
//! and how it enters the placement indexes; the token bucket that bounds what it can make the
//! registry verify.

use super::*;

/// How many earlier agent runs per node are remembered for replay protection.
pub(super) const PREVIOUS_BOOTS: usize = 3;

#[derive(Debug, Clone)]
pub(super) struct Node {
    /// Decompressed once, at its announce: every telemetry sample is checked against it.
    pub(super) public_key: PublicKey,
    pub(super) arch: String,
    pub(super) engine: Engine,
    pub(super) cores: u16,
    pub(super) mem_total_bytes: u64,
    pub(super) labels: Vec<String>,
    pub(super) profile: Option<String>,
    pub(super) max_concurrency: u16,
    /// The fuel rate the node announced.
    pub(super) announced_fuel_per_s: Option<NonZeroU64>,
    /// The best fuel rate seen in its runs ([`Registry::observe_run`]).
    pub(super) observed_fuel_per_s: Option<NonZeroU64>,
    pub(super) sample: Option<TelemetrySample>,
    pub(super) freshness: Freshness,
    /// Budget of frames in this node's name that fail their signature check.
    pub(super) bad_frames: TokenBucket,
    pub(super) last_seen: Instant,
    /// `last_seen + liveness`; `None` if that is beyond what `Instant` can hold (never expires).
    pub(super) deadline: Option<Instant>,
    /// Whether the liveness window had not run out when last checked; while `true` the node
    /// has an entry in `Registry::deadlines`.
    pub(super) live: bool,
    /// The latest presence said "offline" and no fresh telemetry arrived since.
    pub(super) offline: bool,
    pub(super) breaker: Breaker,
    /// Whether `breaker` admitted a task when it last changed. An open breaker half-opens when
    /// it is next fed (telemetry, an outcome), so a cool-down ends at the first sample after it.
    pub(super) admitting: bool,
    pub(super) reputation: Reputation,
    /// See [`NodeView::agreed_in_a_row`].
    pub(super) agreed_in_a_row: u32,
    /// Until when (breaker clock, ms) it gets no work after a dispute. Lifted when it is next
    /// fed after that, like an open breaker.
    pub(super) blacklisted_until_ms: Option<u64>,
    pub(super) terms: HealthTerms,
    pub(super) in_flight: u32,
    /// The node refused a task for a reason of its own (all slots taken, its own breaker open,
    /// shutting down) that the registry did not know yet. Not available until its next report or
    /// telemetry sample, which says where it stands.
    pub(super) resting: bool,
    /// The keys this node is indexed under, if it is available for work.
    pub(super) indexed: Option<Keys>,
    /// The coordinator's probes of the link to it: what its latency and bandwidth terms use.
    pub(super) link: LinkProbe,
    /// Small probes to go before its next large one ([`Registry::probes`]).
    pub(super) large_in: u32,
    /// When it is next probed: its entry in `Registry::probe_queue`.
    pub(super) probe_due: Instant,
}

/// The highest telemetry sequence number accepted from the current agent run and the few
/// before it. A run not remembered is accepted as new: `boot_id` is random, not ordered, so
/// this is as much as can be checked without trusting the node's clock.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Freshness {
    pub(super) current: Option<(u64, u64)>,
    pub(super) previous: [Option<(u64, u64)>; PREVIOUS_BOOTS],
}

impl Freshness {
    pub(super) fn is_fresh(&self, boot_id: u64, seq: u64) -> bool {
        let known = self.current.iter().chain(self.previous.iter().flatten());
        for &(boot, highest) in known {
            if boot == boot_id {
                return seq > highest;
            }
        }
        true
    }

    pub(super) fn accept(&mut self, boot_id: u64, seq: u64) {
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
    pub(super) fn attributes(&self) -> Attributes<'_> {
        Attributes {
            engine: self.engine,
            arch: &self.arch,
            labels: &self.labels,
        }
    }

    pub(super) fn mem_free_bytes(&self) -> u64 {
        self.sample
            .as_ref()
            .and_then(|s| s.mem_free_bytes)
            .unwrap_or(self.mem_total_bytes)
    }

    /// The fuel rate placement counts on: the announced one, capped at twice the best observed
    /// once there is one ([`NodeView::fuel_per_s`]); the observed one alone when the node
    /// announced none.
    pub(super) fn fuel_per_s(&self) -> Option<NonZeroU64> {
        match (self.announced_fuel_per_s, self.observed_fuel_per_s) {
            (Some(a), Some(o)) => Some(a.min(o.saturating_mul(NonZeroU64::new(2).expect("2")))),
            (a, o) => a.or(o),
        }
    }

    pub(super) fn keys(&self) -> Keys {
        let sample = self.sample.as_ref();
        Keys {
            score: self.terms.score,
            load: Keys::load_key(
                sample.and_then(|s| s.cpu_load_permille),
                self.in_flight,
                self.max_concurrency,
            ),
            in_flight: self.in_flight,
            latency_us: self.link.latency_us().map_or(u64::MAX, u64::from),
            fuel_per_s: self.fuel_per_s().map_or(0, NonZeroU64::get),
            mem_free_bytes: self.mem_free_bytes(),
        }
    }

    /// Whether the node can take a task now, whatever the task: online, has sent valid signed
    /// telemetry (an announce alone proves only that a key exists), breaker admitting (ours,
    /// and the one the node reports for itself, since an open one refuses assignments), and a
    /// free execution slot.
    pub(super) fn is_available(&self) -> bool {
        self.is_ready() && !self.resting && self.in_flight < u32::from(self.max_concurrency)
    }

    /// [`Node::is_available`] but for a free slot and a rest after saying it was busy: it
    /// takes work again soon.
    pub(super) fn is_ready(&self) -> bool {
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
    pub(super) fn lift_blacklist(&mut self, now_ms: u64) {
        if self
            .blacklisted_until_ms
            .is_some_and(|until| now_ms >= until)
        {
            self.blacklisted_until_ms = None;
        }
    }

    pub(super) fn is_online(&self, now: Instant) -> bool {
        !self.offline && self.deadline.is_none_or(|d| now < d)
    }

    /// Whether it could run a task that needs `req` once free.
    pub(super) fn can_run(&self, now: Instant, req: &Requirements) -> bool {
        self.is_online(now)
            && self.blacklisted_until_ms.is_none()
            && req.is_met_by(self.attributes(), u64::MAX)
            && self.mem_total_bytes >= req.memory_bytes
    }

    /// Scores the node on what the coordinator observes (see "What ranks a node" in the
    /// module docs): its probes' latency and bandwidth, and the reported CPU load raised to the
    /// share of its slots in flight. An unreported load stays unknown (compute 0). The rest of
    /// its report is not read.
    pub(super) fn rescore(&mut self, config: &ScoreConfig) {
        let slots = u32::from(self.max_concurrency.max(1));
        let occupied = (self.in_flight.min(slots) * 1000 / slots) as u16;
        let reported = self.sample.as_ref().and_then(|s| s.cpu_load_permille);
        let observed = TelemetrySample {
            bandwidth_kbps: self.link.bandwidth_kbps(),
            latency_us: self.link.latency_us(),
            cpu_load_permille: reported.map(|load| load.max(occupied)),
            ..TelemetrySample::default()
        };
        self.terms = health_score(config, &observed, self.cores, self.reputation.score());
    }

    /// The node's claims that what the coordinator sees contradicts ([`NodeView::contradicted`]).
    /// Against the best the coordinator ever saw (the shortest round trip, the fastest large
    /// probe), since a busy coordinator or broker only makes a node look worse: an honest
    /// node is not marked because the gateway was loaded.
    pub(super) fn contradicted(&self, config: &ScoreConfig) -> Vec<String> {
        let mut found = Vec::new();
        let sample = self.sample.as_ref();
        if let (Some(said), Some(seen)) = (
            sample.and_then(|s| s.latency_us),
            self.link.best_latency_us(),
        ) && said.saturating_mul(2) < seen
            && seen - said >= 1_000
        {
            found.push(format!(
                "reports {:.1} ms round trips, none seen under {:.1} ms",
                f64::from(said) / 1e3,
                f64::from(seen) / 1e3
            ));
        }
        if let (Some(said), Some(seen)) = (
            sample.and_then(|s| s.bandwidth_kbps),
            self.link.best_bandwidth_kbps(),
        ) && said / 2 > seen
            && seen < config.bandwidth_ref_kbps
        {
            found.push(format!(
                "reports {:.1} Mbit/s, none seen over {:.1} Mbit/s",
                f64::from(said) / 1e3,
                f64::from(seen) / 1e3
            ));
        }
        if let (Some(said), Some(seen)) = (self.announced_fuel_per_s, self.observed_fuel_per_s)
            && said.get() / 2 > seen.get()
        {
            found.push(format!(
                "announces {:.3e} fuel/s, seen {:.3e}",
                said.get() as f64,
                seen.get() as f64
            ));
        }
        found
    }

    pub(super) fn view(
        &self,
        id: NodeId,
        now: Instant,
        now_ms: u64,
        faulty_permille: u32,
        score: &ScoreConfig,
    ) -> NodeView {
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
            observed_latency_us: self.link.latency_us(),
            observed_bandwidth_kbps: self.link.bandwidth_kbps(),
            contradicted: self.contradicted(score),
            sample: self.sample.clone(),
        }
    }
}

/// Brings a node's index entries in line with its state. Every change to anything [`Keys`] or
/// [`Node::is_available`] reads goes through here.
pub(super) fn reindex(placement: &mut Placement, id: NodeId, node: &mut Node) {
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
pub(super) fn unindex(placement: &mut Placement, id: NodeId, node: &mut Node) {
    if let Some(old) = node.indexed.take() {
        placement.remove(id, &old, node.attributes());
    }
}

/// A token bucket: `rate` admissions per second on average, bursts of up to ten seconds' worth.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    pub(super) rate: u32,
    pub(super) tokens: f64,
    pub(super) at: Option<Instant>,
}

impl TokenBucket {
    const DEPTH_S: f64 = 10.0;

    pub(crate) fn new(rate: u32) -> Self {
        Self {
            rate,
            tokens: f64::from(rate) * Self::DEPTH_S,
            at: None,
        }
    }

    /// Whether a token is there at `now`, without taking it.
    pub(crate) fn has(&mut self, now: Instant) -> bool {
        let rate = f64::from(self.rate);
        if let Some(at) = self.at {
            let refill = now.saturating_duration_since(at).as_secs_f64() * rate;
            self.tokens = (self.tokens + refill).min(rate * Self::DEPTH_S);
        }
        self.at = Some(now);
        self.tokens >= 1.0
    }

    /// Takes one token at `now`, if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        if self.has(now) {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
