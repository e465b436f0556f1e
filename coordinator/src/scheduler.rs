//! Placing tasks: eligibility and the four strategies.
//!
//! The [`Registry`](crate::Registry) keeps every node that could take a task right now (online,
//! breaker admitting, a free execution slot) in one ordered index per strategy. A decision walks
//! the chosen index from its best entry and skips nodes that do not meet the task's
//! [`Requirements`], so it costs O(log n) plus the nodes skipped, not a scan of the pool.
//!
//! Requests nobody can meet (an engine, arch or label no available node has, more memory than
//! any has free) are answered from per-attribute counts without walking at all. The one case that
//! still walks far is a *combination* that is rare but not absent (say, the only `gpu` nodes are
//! the ones without enough memory): the walk then visits every node ranked above the first fit.
//!
//! Latency-aware placement ranks by a key that depends on the task (latency + fuel ÷ rate), so no
//! single index holds its order: it walks the latency and the rate indexes together and stops as
//! soon as no node further down either can do better (`Placement::soonest`). That is a step or
//! two when the nearest nodes are also the fast ones, and up to the whole pool when latency and
//! speed disagree everywhere.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::ops::Bound;
use std::str::FromStr;

use ambient_core::{Engine, NodeId};
use serde::{Deserialize, Serialize};

/// How the coordinator chooses among the nodes eligible for a task.
///
/// Parsed from and shown as `weighted`, `round-robin`, `least-loaded` and `latency-aware`
/// (also accepted: `round_robin`, `least_loaded`, `latency_aware` and `latency`). Serialised as
/// the same kebab-case names. Defaults to [`Strategy::Weighted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The highest health score (see [`ambient_core::health_score`]); ties go to the lowest
    /// node id. The default: it balances bandwidth, latency, spare compute and reputation.
    #[default]
    Weighted,
    /// Every eligible node in turn, in node-id order, wrapping around after the highest id.
    /// Use it to spread identical short tasks evenly whatever the nodes report.
    #[serde(alias = "round_robin")]
    RoundRobin,
    /// The lowest load key, `cpu_load_permille + 1000 × in_flight / max_concurrency`, then the
    /// fewest tasks in flight, then the lowest node id. CPU load comes from the latest telemetry
    /// (an unknown load counts as 1000, fully busy); the in-flight share is the coordinator's own
    /// count, so a burst of dispatches spreads out before the next telemetry arrives.
    #[serde(alias = "least_loaded")]
    LeastLoaded,
    /// The soonest expected result: round-trip latency to the coordinator plus the task's
    /// worst-case run time on the node, its fuel limit ÷ the node's fuel rate
    /// ([`expected_us`]), then the lower latency, then the lowest node id. So a large task goes
    /// to the faster board even when it is a little farther away, and a small one to the
    /// nearest. A node with no known fuel rate or latency has no
    /// expected time: such nodes come after every node with one, by latency, and those that
    /// have not reported a latency last. The rate is the
    /// one the node announced, capped by what the coordinator has seen it do
    /// ([`NodeView::fuel_per_s`](crate::NodeView::fuel_per_s)).
    #[serde(alias = "latency_aware", alias = "latency")]
    LatencyAware,
}

impl Strategy {
    /// Every strategy, in the order they are documented.
    pub const ALL: [Strategy; 4] = [
        Strategy::Weighted,
        Strategy::RoundRobin,
        Strategy::LeastLoaded,
        Strategy::LatencyAware,
    ];

    /// The canonical name: `weighted`, `round-robin`, `least-loaded` or `latency-aware`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Weighted => "weighted",
            Self::RoundRobin => "round-robin",
            Self::LeastLoaded => "least-loaded",
            Self::LatencyAware => "latency-aware",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Strategy {
    type Err = ParseStrategyError;

    /// Parses a canonical name or an alias, ignoring ASCII case and surrounding spaces.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "weighted" => Ok(Self::Weighted),
            "round-robin" | "round_robin" => Ok(Self::RoundRobin),
            "least-loaded" | "least_loaded" => Ok(Self::LeastLoaded),
            "latency-aware" | "latency_aware" | "latency" => Ok(Self::LatencyAware),
            _ => Err(ParseStrategyError {
                input: s.to_owned(),
            }),
        }
    }
}

/// A strategy name that is none of the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown scheduling strategy `{input}`: expected one of weighted, round-robin, least-loaded, latency-aware"
)]
pub struct ParseStrategyError {
    /// The text that failed to parse.
    pub input: String,
}

/// What a task needs from the node that runs it. The default asks for nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Requirements {
    /// Memory the node must have free, in bytes: the task's memory limit. Compared with the
    /// node's latest `mem_free_bytes`, or with its announced total before it has reported one.
    pub memory_bytes: u64,
    /// The WASM engine the node must run ([`Engine::satisfies`]: `wasmtime` is also met by
    /// `wasmtime-pulley`); `None` accepts any.
    pub engine: Option<Engine>,
    /// The CPU architecture the node must have (`aarch64`, `x86_64`, ...), compared exactly;
    /// `None` accepts any.
    pub arch: Option<String>,
    /// Labels the node must all have announced (`gpu`, `room-2`, ...); extra labels are fine.
    pub labels: Vec<String>,
    /// Fuel the task may spend: the dispatcher sets it from the task's fuel limit (which intake
    /// requires to be at least 1). Not a requirement but a size, which
    /// [`Strategy::LatencyAware`] turns into a run time per node; 0 (the default, for callers
    /// that place without a task) ranks by latency alone. Not serialised: it is derived, never
    /// submitted.
    #[serde(skip)]
    pub fuel: u64,
}

/// When a task of `fuel` should be answered by a node `latency_us` away that burns
/// `fuel_per_s`: the latency plus the worst-case run time, `fuel × 10⁶ ÷ fuel_per_s` µs
/// (rounded up), saturating at `u64::MAX`. An unknown latency is `u64::MAX` and so is the result;
/// a rate of 0 (unknown) gives `u64::MAX` unless `fuel` is 0.
pub fn expected_us(latency_us: u64, fuel_per_s: u64, fuel: u64) -> u64 {
    if fuel == 0 {
        return latency_us;
    }
    if fuel_per_s == 0 {
        return u64::MAX;
    }
    let run = (u128::from(fuel) * 1_000_000).div_ceil(u128::from(fuel_per_s));
    latency_us.saturating_add(u64::try_from(run).unwrap_or(u64::MAX))
}

/// The announced attributes of a node that requirements are checked against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Attributes<'a> {
    pub(crate) engine: Engine,
    pub(crate) arch: &'a str,
    pub(crate) labels: &'a [String],
}

impl Requirements {
    /// Whether a node with these attributes and this much free memory (bytes) can run the task.
    pub(crate) fn is_met_by(&self, attributes: Attributes<'_>, mem_free_bytes: u64) -> bool {
        mem_free_bytes >= self.memory_bytes
            && self.engine.is_none_or(|e| attributes.engine.satisfies(e))
            && self.arch.as_deref().is_none_or(|a| a == attributes.arch)
            && self.labels.iter().all(|l| attributes.labels.contains(l))
    }
}

/// Where an available node sits in each index. The registry keeps a copy per indexed node, so
/// the exact entries can be found and removed when something changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Keys {
    /// Health score, `0..=SCORE_SCALE`.
    pub(crate) score: u32,
    /// `cpu_load_permille + 1000 × in_flight / max_concurrency` (see [`Strategy::LeastLoaded`]).
    pub(crate) load: u32,
    /// Tasks in flight, the least-loaded tie-break.
    pub(crate) in_flight: u32,
    /// Latest round-trip latency in µs; `u64::MAX` when unknown, so it sorts last.
    pub(crate) latency_us: u64,
    /// Fuel per second placement counts on; 0 when unknown.
    pub(crate) fuel_per_s: u64,
    /// Free memory in bytes, or the announced total when no reading exists.
    pub(crate) mem_free_bytes: u64,
}

impl Keys {
    /// The load key of [`Strategy::LeastLoaded`]: CPU load in permille (unknown counts as fully
    /// busy) plus the share of execution slots in use, also in permille.
    pub(crate) fn load_key(
        cpu_load_permille: Option<u16>,
        in_flight: u32,
        max_concurrency: u16,
    ) -> u32 {
        let cpu = u32::from(cpu_load_permille.map_or(1000, |l| l.min(1000)));
        let slots = u64::from(max_concurrency.max(1));
        let busy = (1000 * u64::from(in_flight) / slots).min(1000) as u32;
        cpu + busy
    }
}

/// The ordered indexes over the nodes available for work, and the round-robin cursor.
///
/// Invariant: a node is in every `by_*` set or in none, with the keys the registry recorded;
/// the one exception is `by_rate`, which holds only the nodes with a known fuel rate.
#[derive(Debug, Clone, Default)]
pub(crate) struct Placement {
    /// Every available node, with its latency (µs) and fuel rate (0 when unknown).
    by_id: BTreeMap<NodeId, (u64, u64)>,
    by_score: BTreeSet<(Reverse<u32>, NodeId)>,
    by_load: BTreeSet<(u32, u32, NodeId)>,
    by_latency: BTreeSet<(u64, NodeId)>,
    /// The nodes with a known fuel rate, fastest first.
    by_rate: BTreeSet<(Reverse<u64>, NodeId)>,
    by_memory: BTreeSet<(u64, NodeId)>,
    /// How many available nodes have each engine, arch and label: answers "nobody" in O(1).
    engines: HashMap<Engine, u32>,
    arches: HashMap<String, u32>,
    labels: HashMap<String, u32>,
    /// The node round-robin chose last; the next turn starts just after it.
    cursor: Option<NodeId>,
}

impl Placement {
    /// Adds an available node.
    pub(crate) fn insert(&mut self, id: NodeId, keys: &Keys, attributes: Attributes<'_>) {
        self.by_id.insert(id, (keys.latency_us, keys.fuel_per_s));
        self.by_score.insert((Reverse(keys.score), id));
        self.by_load.insert((keys.load, keys.in_flight, id));
        self.by_latency.insert((keys.latency_us, id));
        if keys.fuel_per_s > 0 {
            self.by_rate.insert((Reverse(keys.fuel_per_s), id));
        }
        self.by_memory.insert((keys.mem_free_bytes, id));
        *self.engines.entry(attributes.engine).or_default() += 1;
        count_up(&mut self.arches, attributes.arch);
        for label in attributes.labels {
            count_up(&mut self.labels, label);
        }
    }

    /// Removes a node inserted with exactly these keys and attributes.
    pub(crate) fn remove(&mut self, id: NodeId, keys: &Keys, attributes: Attributes<'_>) {
        self.by_id.remove(&id);
        self.by_score.remove(&(Reverse(keys.score), id));
        self.by_load.remove(&(keys.load, keys.in_flight, id));
        self.by_latency.remove(&(keys.latency_us, id));
        self.by_rate.remove(&(Reverse(keys.fuel_per_s), id));
        self.by_memory.remove(&(keys.mem_free_bytes, id));
        if let Some(n) = self.engines.get_mut(&attributes.engine) {
            *n -= 1;
            if *n == 0 {
                self.engines.remove(&attributes.engine);
            }
        }
        count_down(&mut self.arches, attributes.arch);
        for label in attributes.labels {
            count_down(&mut self.labels, label);
        }
    }

    /// Moves an indexed node from `old` keys to `new` ones, touching only the indexes that change.
    pub(crate) fn update(&mut self, id: NodeId, old: &Keys, new: &Keys) {
        if old.score != new.score {
            self.by_score.remove(&(Reverse(old.score), id));
            self.by_score.insert((Reverse(new.score), id));
        }
        if (old.load, old.in_flight) != (new.load, new.in_flight) {
            self.by_load.remove(&(old.load, old.in_flight, id));
            self.by_load.insert((new.load, new.in_flight, id));
        }
        if old.latency_us != new.latency_us {
            self.by_latency.remove(&(old.latency_us, id));
            self.by_latency.insert((new.latency_us, id));
        }
        if old.fuel_per_s != new.fuel_per_s {
            self.by_rate.remove(&(Reverse(old.fuel_per_s), id));
            if new.fuel_per_s > 0 {
                self.by_rate.insert((Reverse(new.fuel_per_s), id));
            }
        }
        self.by_id.insert(id, (new.latency_us, new.fuel_per_s));
        if old.mem_free_bytes != new.mem_free_bytes {
            self.by_memory.remove(&(old.mem_free_bytes, id));
            self.by_memory.insert((new.mem_free_bytes, id));
        }
    }

    /// How many nodes are available.
    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// `false` when no available node can meet `req`, judged on each requirement alone.
    /// `true` does not promise a fit: the requirements may only be met separately.
    pub(crate) fn may_satisfy(&self, req: &Requirements) -> bool {
        let most_memory = self.by_memory.last().map_or(0, |(m, _)| *m);
        !self.by_id.is_empty()
            && most_memory >= req.memory_bytes
            && req
                .engine
                .is_none_or(|e| self.engines.keys().any(|have| have.satisfies(e)))
            && req
                .arch
                .as_ref()
                .is_none_or(|a| self.arches.contains_key(a))
            && req.labels.iter().all(|l| self.labels.contains_key(l))
    }

    /// The best available node by `strategy` for a task of `fuel` for which `fits` holds.
    /// Round-robin moves its cursor to the node returned.
    pub(crate) fn pick(
        &mut self,
        strategy: Strategy,
        fuel: u64,
        mut fits: impl FnMut(NodeId) -> bool,
    ) -> Option<NodeId> {
        match strategy {
            Strategy::Weighted => self.by_score.iter().map(|(_, id)| *id).find(|id| fits(*id)),
            Strategy::LeastLoaded => self
                .by_load
                .iter()
                .map(|(_, _, id)| *id)
                .find(|id| fits(*id)),
            Strategy::LatencyAware if fuel > 0 => self.soonest(fuel, &mut fits).or_else(|| {
                // Nobody with an expected time: the others by latency.
                self.by_latency
                    .iter()
                    .find(|&&(latency, id)| {
                        expected_us(latency, self.by_id[&id].1, fuel) == u64::MAX && fits(id)
                    })
                    .map(|(_, id)| *id)
            }),
            Strategy::LatencyAware => self
                .by_latency
                .iter()
                .map(|(_, id)| *id)
                .find(|id| fits(*id)),
            Strategy::RoundRobin => {
                // From just after the last choice to the end, then wrap to the start.
                let found = match self.cursor {
                    Some(c) => self
                        .by_id
                        .range((Bound::Excluded(c), Bound::Unbounded))
                        .chain(self.by_id.range(..=c))
                        .map(|(id, _)| *id)
                        .find(|id| fits(*id)),
                    None => self.by_id.keys().copied().find(|id| fits(*id)),
                };
                if found.is_some() {
                    self.cursor = found;
                }
                found
            }
        }
    }

    /// Among the nodes with a known fuel rate, the one for which `fits` holds with the least
    /// [`expected_us`] for `fuel` (then the lower latency, then the lower id); `None` when no
    /// such node has an expected time below `u64::MAX`.
    ///
    /// Fagin's threshold algorithm over the latency and rate indexes: walk both in step; every
    /// node not yet seen has at least the current latency and at most the current rate, so
    /// none can beat `expected_us(latency, rate)` of the current positions, and the walk stops
    /// once the best seen is below that. A fast node next door is found in a step or two; the
    /// walk is long only when latency and speed disagree across the whole pool.
    fn soonest(&self, fuel: u64, fits: &mut impl FnMut(NodeId) -> bool) -> Option<NodeId> {
        let mut best: Option<(u64, u64, NodeId)> = None;
        let mut consider = |id: NodeId, best: &mut Option<(u64, u64, NodeId)>| {
            let (latency, rate) = self.by_id[&id];
            if rate == 0 {
                return;
            }
            let key = (expected_us(latency, rate, fuel), latency, id);
            if best.is_none_or(|b| key < b) && fits(id) {
                *best = Some(key);
            }
        };
        for (&(latency, a), &(Reverse(rate), b)) in self.by_latency.iter().zip(&self.by_rate) {
            consider(a, &mut best);
            consider(b, &mut best);
            if best.is_some_and(|(e, ..)| e < expected_us(latency, rate, fuel)) {
                break;
            }
        }
        best.filter(|(e, ..)| *e < u64::MAX).map(|(.., id)| id)
    }

    /// A node drawn uniformly among the available ones for which `fits` holds: the `draw`-th
    /// of them (modulo their number), in node-id order. For the second and later replicas of a
    /// task, so that who checks a result is not something a node can steer by what it reports.
    ///
    /// Cost: O(n), two passes over the available nodes; spent only on checks and replicas.
    pub(crate) fn pick_uniform(
        &self,
        draw: u64,
        mut fits: impl FnMut(NodeId) -> bool,
    ) -> Option<NodeId> {
        let n = self.by_id.keys().filter(|id| fits(**id)).count();
        if n == 0 {
            return None;
        }
        let k = usize::try_from(draw % n as u64).expect("below n");
        self.by_id.keys().copied().filter(|id| fits(*id)).nth(k)
    }
}

fn count_up(counts: &mut HashMap<String, u32>, key: &str) {
    // Look up before inserting, so the common case (the key exists) does not allocate.
    match counts.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            counts.insert(key.to_owned(), 1);
        }
    }
}

fn count_down(counts: &mut HashMap<String, u32>, key: &str) {
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            // Forget unused keys, so labels announced once do not accumulate forever.
            counts.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use ambient_core::{Engine, NodeId, TelemetrySample};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::registry::fixtures::{Fleet, t0};
    use crate::{NodeView, Outcome, Registry};

    fn sample(load: u16, latency_us: u32) -> TelemetrySample {
        TelemetrySample {
            bandwidth_kbps: Some(50_000),
            latency_us: Some(latency_us),
            cpu_load_permille: Some(load),
            mem_free_bytes: Some(2 << 30),
            temp_millic: Some(50_000),
            ..Default::default()
        }
    }

    /// Node `i` reports `s`, and the coordinator's probes see the latency and bandwidth it
    /// reports (the registry ranks by those, not by the report).
    fn speak(fleet: &mut Fleet, now: Instant, i: usize, s: TelemetrySample) {
        let link = s
            .latency_us
            .map(|l| (u64::from(l), s.bandwidth_kbps.map(u64::from)));
        fleet.report(now, i, s);
        if let Some((latency_us, kbps)) = link {
            fleet.link(now, i, latency_us, kbps);
        }
    }

    fn any() -> Requirements {
        Requirements::default()
    }

    #[test]
    fn strategies_parse_from_their_names_and_aliases() {
        for s in Strategy::ALL {
            assert_eq!(s.as_str().parse::<Strategy>(), Ok(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert_eq!("round_robin".parse(), Ok(Strategy::RoundRobin));
        assert_eq!("latency".parse(), Ok(Strategy::LatencyAware));
        assert_eq!(" Least-Loaded ".parse(), Ok(Strategy::LeastLoaded));
        assert_eq!(Strategy::default(), Strategy::Weighted);
    }

    #[test]
    fn an_unknown_strategy_names_the_valid_ones() {
        let err = "fastest".parse::<Strategy>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown scheduling strategy `fastest`: expected one of weighted, round-robin, \
             least-loaded, latency-aware"
        );
    }

    #[test]
    fn strategies_serialize_as_kebab_case_and_accept_the_aliases() {
        assert_eq!(
            serde_json::to_string(&Strategy::RoundRobin).unwrap(),
            r#""round-robin""#
        );
        assert_eq!(
            serde_json::to_string(&Strategy::LatencyAware).unwrap(),
            r#""latency-aware""#
        );
        let parsed: Vec<Strategy> =
            serde_json::from_str(r#"["weighted","round_robin","least-loaded","latency"]"#).unwrap();
        assert_eq!(parsed, Strategy::ALL);
        assert!(serde_json::from_str::<Strategy>(r#""fastest""#).is_err());
    }

    #[test]
    fn weighted_prefers_the_highest_score_and_breaks_ties_by_id() {
        let mut fleet = Fleet::new(3);
        let now = t0();
        speak(&mut fleet, now, 0, sample(900, 80_000));
        speak(&mut fleet, now, 1, sample(100, 5_000));
        speak(&mut fleet, now, 2, sample(100, 5_000));
        let best = fleet.registry.select(now, &any(), Strategy::Weighted, &[]);
        let (a, b) = (fleet.id(1), fleet.id(2));
        assert_eq!(best, Some(a.min(b)), "equal scores go to the lower id");
        let again = fleet
            .registry
            .select(now, &any(), Strategy::Weighted, &[a.min(b)]);
        assert_eq!(again, Some(a.max(b)));
    }

    #[test]
    fn round_robin_visits_every_eligible_node() {
        let mut fleet = Fleet::new(5);
        let now = t0();
        for i in 0..5 {
            speak(&mut fleet, now, i, sample(100, 5_000));
        }
        // Node 4 is too hot: round-robin must skip it, not stall on it.
        let hot = TelemetrySample {
            temp_millic: Some(95_000),
            ..sample(100, 5_000)
        };
        speak(&mut fleet, now, 4, hot);

        let picks: Vec<NodeId> = (0..8)
            .map(|_| {
                fleet
                    .registry
                    .select(now, &any(), Strategy::RoundRobin, &[])
                    .unwrap()
            })
            .collect();
        let mut eligible: Vec<NodeId> = (0..4).map(|i| fleet.id(i)).collect();
        eligible.sort();
        assert_eq!(&picks[..4], &eligible[..], "one full turn in node-id order");
        assert_eq!(&picks[4..], &eligible[..], "then it wraps around");
    }

    #[test]
    fn least_loaded_prefers_the_idle_node() {
        let mut fleet = Fleet::new(3);
        let now = t0();
        speak(&mut fleet, now, 0, sample(700, 1_000));
        speak(&mut fleet, now, 1, sample(50, 90_000));
        speak(&mut fleet, now, 2, sample(400, 1_000));
        let pick = fleet
            .registry
            .select(now, &any(), Strategy::LeastLoaded, &[]);
        assert_eq!(pick, Some(fleet.id(1)));
    }

    #[test]
    fn least_loaded_counts_tasks_in_flight() {
        let mut fleet = Fleet::with(2, |a| a.max_concurrency = 4);
        let now = t0();
        speak(&mut fleet, now, 0, sample(100, 1_000));
        speak(&mut fleet, now, 1, sample(200, 1_000));
        let idle = fleet.id(0);
        assert_eq!(
            fleet
                .registry
                .select(now, &any(), Strategy::LeastLoaded, &[]),
            Some(idle)
        );
        // Keys: node 0 = 100 + 1000·1/4 = 350, node 1 = 200: the dispatch moves the choice.
        fleet.registry.task_started(&idle);
        assert_eq!(
            fleet
                .registry
                .select(now, &any(), Strategy::LeastLoaded, &[]),
            Some(fleet.id(1))
        );
        fleet.registry.task_finished(&idle);
        assert_eq!(
            fleet
                .registry
                .select(now, &any(), Strategy::LeastLoaded, &[]),
            Some(idle)
        );
    }

    #[test]
    fn latency_aware_prefers_the_closest_node_and_puts_unknown_latency_last() {
        let mut fleet = Fleet::new(3);
        let now = t0();
        fleet.report(
            now,
            0,
            TelemetrySample {
                latency_us: None,
                ..sample(0, 0)
            },
        );
        speak(&mut fleet, now, 1, sample(900, 3_000));
        speak(&mut fleet, now, 2, sample(0, 40_000));
        let order: Vec<_> = (0..3)
            .scan(Vec::new(), |seen: &mut Vec<NodeId>, _| {
                let pick = fleet
                    .registry
                    .select(now, &any(), Strategy::LatencyAware, seen)?;
                seen.push(pick);
                Some(pick)
            })
            .collect();
        assert_eq!(order, vec![fleet.id(1), fleet.id(2), fleet.id(0)]);
    }

    fn rate(fuel_per_s: u64) -> Option<std::num::NonZeroU64> {
        std::num::NonZeroU64::new(fuel_per_s)
    }

    #[test]
    fn latency_aware_sends_a_large_task_to_the_faster_board_and_a_small_one_to_the_closer() {
        // Node 0: 2 ms away, a Pi at 100M fuel/s. Node 1: 20 ms away, a desktop at 1G fuel/s.
        // Node 2: 1 ms away, no rate announced. Node 3: no latency reported.
        let mut fleet = Fleet::new(4);
        let now = t0();
        for (i, (latency_us, fuel_per_s)) in [(2_000, 100_000_000), (20_000, 1_000_000_000)]
            .into_iter()
            .enumerate()
        {
            fleet.reannounce(now, i, |a| a.fuel_per_s = rate(fuel_per_s));
            speak(&mut fleet, now, i, sample(0, latency_us));
        }
        speak(&mut fleet, now, 2, sample(0, 1_000));
        fleet.reannounce(now, 3, |a| a.fuel_per_s = rate(10_000_000_000));
        fleet.report(
            now,
            3,
            TelemetrySample {
                latency_us: None,
                ..sample(0, 0)
            },
        );
        let pick = |fleet: &mut Fleet, fuel: u64, exclude: &[NodeId]| {
            let req = Requirements { fuel, ..any() };
            fleet
                .registry
                .select(now, &req, Strategy::LatencyAware, exclude)
        };
        // 10^8 fuel: 1 s + 2 ms on the Pi, 100 ms + 20 ms on the desktop.
        assert_eq!(pick(&mut fleet, 100_000_000, &[]), Some(fleet.id(1)));
        // 10^6 fuel: 10 ms + 2 ms on the Pi, 1 ms + 20 ms on the desktop.
        assert_eq!(pick(&mut fleet, 1_000_000, &[]), Some(fleet.id(0)));
        // Without a known rate a node comes after those with one, however close; without a
        // latency, last.
        let (a, b) = (fleet.id(0), fleet.id(1));
        assert_eq!(pick(&mut fleet, 1_000_000, &[a, b]), Some(fleet.id(2)));
        let c = fleet.id(2);
        assert_eq!(pick(&mut fleet, 1_000_000, &[a, b, c]), Some(fleet.id(3)));
        // A task that names no fuel is placed by latency alone.
        assert_eq!(pick(&mut fleet, 0, &[]), Some(fleet.id(2)));
    }

    #[test]
    fn expected_time_is_latency_plus_fuel_over_rate_rounded_up_and_saturates() {
        assert_eq!(expected_us(2_000, 100_000_000, 100_000_000), 1_002_000);
        assert_eq!(expected_us(0, 3_000_000, 1), 1, "a third of a µs rounds up");
        assert_eq!(expected_us(5, 0, 0), 5, "no fuel: latency alone");
        assert_eq!(expected_us(5, 0, 1), u64::MAX, "unknown rate");
        assert_eq!(expected_us(u64::MAX, 1, 1), u64::MAX, "unknown latency");
        assert_eq!(expected_us(0, 1, u64::MAX), u64::MAX);
    }

    #[test]
    fn a_pulley_node_takes_tasks_asking_for_wasmtime_and_only_it_takes_tasks_asking_for_pulley() {
        let mut fleet = Fleet::with(2, |_| {});
        let now = t0();
        fleet.reannounce(now, 1, |a| a.engine = Engine::WasmtimePulley);
        for i in 0..2 {
            speak(&mut fleet, now, i, sample(100, 1_000));
        }
        let wanting = |engine| Requirements {
            engine: Some(engine),
            ..any()
        };
        let (cranelift, pulley) = (fleet.id(0), fleet.id(1));
        let mut takers = |engine| {
            let mut seen = Vec::new();
            while let Some(pick) =
                fleet
                    .registry
                    .select(now, &wanting(engine), Strategy::RoundRobin, &seen)
            {
                seen.push(pick);
            }
            seen.sort();
            seen
        };
        let mut both = vec![cranelift, pulley];
        both.sort();
        assert_eq!(takers(Engine::Wasmtime), both);
        assert_eq!(takers(Engine::WasmtimePulley), vec![pulley]);
        assert_eq!(takers(Engine::WasmEdge), vec![]);
    }

    #[test]
    fn requirements_filter_by_memory_engine_arch_and_labels() {
        let mut fleet = Fleet::with(4, |a| a.arch = "aarch64".parse().unwrap());
        let now = t0();
        fleet.reannounce(now, 1, |a| a.engine = Engine::WasmEdge);
        fleet.reannounce(now, 2, |a| a.arch = "riscv64".parse().unwrap());
        fleet.reannounce(now, 3, |a| {
            a.labels.push("gpu".parse().unwrap()).unwrap();
            a.labels.push("room-2".parse().unwrap()).unwrap();
        });
        for i in 0..4 {
            speak(&mut fleet, now, i, sample(100, 1_000));
        }
        fleet.report(
            now,
            0,
            TelemetrySample {
                mem_free_bytes: Some(64 << 20),
                ..sample(0, 500)
            },
        );

        let mut pick =
            |req: Requirements| fleet.registry.select(now, &req, Strategy::Weighted, &[]);
        let engine = pick(Requirements {
            engine: Some(Engine::WasmEdge),
            ..any()
        });
        let arch = pick(Requirements {
            arch: Some("riscv64".into()),
            ..any()
        });
        let labels = pick(Requirements {
            labels: vec!["room-2".into(), "gpu".into()],
            ..any()
        });
        let memory = pick(Requirements {
            memory_bytes: 1 << 30,
            labels: vec![],
            ..any()
        });
        let nobody = pick(Requirements {
            labels: vec!["gpu".into(), "tpu".into()],
            ..any()
        });
        let too_big = pick(Requirements {
            memory_bytes: 3 << 30,
            ..any()
        });
        let combination = pick(Requirements {
            engine: Some(Engine::WasmEdge),
            arch: Some("riscv64".into()),
            ..any()
        });

        assert_eq!(engine, Some(fleet.id(1)));
        assert_eq!(arch, Some(fleet.id(2)));
        assert_eq!(labels, Some(fleet.id(3)));
        assert_ne!(
            memory,
            Some(fleet.id(0)),
            "64 MiB free is not enough for 1 GiB"
        );
        assert!(memory.is_some());
        assert_eq!(nobody, None);
        assert_eq!(too_big, None);
        assert_eq!(
            combination, None,
            "each is offered, but never by the same node"
        );
    }

    #[test]
    fn a_node_without_a_memory_reading_is_judged_by_its_announced_total() {
        let mut fleet = Fleet::with(1, |a| a.mem_total_bytes = 1 << 30);
        let now = t0();
        let req = |memory_bytes| Requirements {
            memory_bytes,
            ..any()
        };
        assert_eq!(
            fleet
                .registry
                .select(now, &req(1 << 30), Strategy::Weighted, &[]),
            Some(fleet.id(0))
        );
        assert_eq!(
            fleet
                .registry
                .select(now, &req((1 << 30) + 1), Strategy::Weighted, &[]),
            None
        );
        fleet.report(
            now,
            0,
            TelemetrySample {
                mem_free_bytes: None,
                ..sample(100, 1_000)
            },
        );
        assert_eq!(
            fleet
                .registry
                .select(now, &req(1 << 30), Strategy::Weighted, &[]),
            Some(fleet.id(0))
        );
    }

    #[test]
    fn excluded_nodes_are_never_selected() {
        let mut fleet = Fleet::new(3);
        let now = t0();
        for i in 0..3 {
            speak(&mut fleet, now, i, sample(100 * i as u16, 1_000));
        }
        let all: Vec<NodeId> = (0..3).map(|i| fleet.id(i)).collect();
        for strategy in Strategy::ALL {
            for skip in 0..3 {
                let exclude: Vec<NodeId> =
                    all.iter().copied().filter(|id| *id != all[skip]).collect();
                assert_eq!(
                    fleet.registry.select(now, &any(), strategy, &exclude),
                    Some(all[skip]),
                    "{strategy}"
                );
            }
            assert_eq!(
                fleet.registry.select(now, &any(), strategy, &all),
                None,
                "{strategy}"
            );
        }
    }

    #[test]
    fn an_empty_registry_selects_nobody() {
        let mut registry = Registry::new(Default::default());
        for strategy in Strategy::ALL {
            assert_eq!(registry.select(t0(), &any(), strategy, &[]), None);
        }
    }

    /// The best eligible node by a linear scan over the views: the definition the indexes speed up.
    fn reference(views: &[NodeView], req: &Requirements, strategy: Strategy) -> Option<NodeId> {
        let eligible = views.iter().filter(|v| {
            let mem = v
                .sample
                .as_ref()
                .and_then(|s| s.mem_free_bytes)
                .unwrap_or(v.mem_total_bytes);
            v.online
                && v.breaker == ambient_core::BreakerState::Closed
                && v.in_flight < 2
                && mem >= req.memory_bytes
                && req.labels.iter().all(|l| v.labels.contains(l))
        });
        match strategy {
            Strategy::Weighted => eligible.min_by_key(|v| (Reverse(v.terms.score), v.node)),
            Strategy::LeastLoaded => eligible.min_by_key(|v| {
                let load = v.sample.as_ref().and_then(|s| s.cpu_load_permille);
                (Keys::load_key(load, v.in_flight, 2), v.in_flight, v.node)
            }),
            Strategy::LatencyAware => eligible.min_by_key(|v| {
                let latency = v.observed_latency_us.map_or(u64::MAX, u64::from);
                let rate = v.fuel_per_s.unwrap_or(0);
                (expected_us(latency, rate, req.fuel), latency, v.node)
            }),
            Strategy::RoundRobin => {
                unreachable!("round-robin depends on history, checked elsewhere")
            }
        }
        .map(|v| v.node)
    }

    #[test]
    fn the_indexes_agree_with_a_linear_scan_after_random_changes() {
        const NODES: usize = 12;
        let mut fleet = Fleet::with(NODES, |a| a.max_concurrency = 2);
        for i in (0..NODES).step_by(3) {
            fleet.reannounce(t0(), i, |a| a.labels.push("gpu".parse().unwrap()).unwrap());
        }
        let mut rng = StdRng::seed_from_u64(7);
        let mut now = t0();
        let mut in_flight = [0u32; NODES];
        for step in 0..1000 {
            now += Duration::from_millis(rng.random_range(0..1500));
            let i = rng.random_range(0..NODES);
            let id = fleet.id(i);
            match rng.random_range(0..12) {
                0..=3 => {
                    let s = TelemetrySample {
                        bandwidth_kbps: Some(rng.random_range(0..120_000)),
                        latency_us: rng.random_bool(0.9).then(|| rng.random_range(0..90_000)),
                        cpu_load_permille: rng.random_bool(0.9).then(|| rng.random_range(0..1000)),
                        mem_free_bytes: rng
                            .random_bool(0.9)
                            .then(|| rng.random_range(0..4u64 << 30)),
                        temp_millic: Some(rng.random_range(40_000..80_000)),
                        ..Default::default()
                    };
                    speak(&mut fleet, now, i, s);
                }
                4 if in_flight[i] < 2 => {
                    fleet.registry.task_started(&id);
                    in_flight[i] += 1;
                }
                5 if in_flight[i] > 0 => {
                    fleet.registry.task_finished(&id);
                    in_flight[i] -= 1;
                }
                6 => fleet.registry.on_status(now, id, rng.random_bool(0.7)),
                8 => {
                    let announced = rng.random_bool(0.8).then(|| rng.random_range(1..2_000));
                    fleet.reannounce(now, i, |a| {
                        a.fuel_per_s = rate(announced.unwrap_or(0) << 20)
                    });
                }
                9 => {
                    let fuel = rng.random_range(0..4u64 << 30);
                    let elapsed = Duration::from_micros(rng.random_range(1..10_000_000));
                    fleet.registry.observe_run(&id, fuel, elapsed);
                }
                7 => {
                    let outcome = [Outcome::Verified, Outcome::Completed, Outcome::Failed]
                        [rng.random_range(0..3)];
                    fleet.registry.record(now, &id, outcome);
                }
                _ => fleet.registry.touch(now, id),
            }
            let req = Requirements {
                memory_bytes: rng.random_range(0..3u64 << 30),
                labels: if rng.random_bool(0.3) {
                    vec!["gpu".into()]
                } else {
                    vec![]
                },
                fuel: if rng.random_bool(0.2) {
                    0
                } else {
                    // From a few fuel to 10^10: latency decides some, speed others.
                    let bits = rng.random_range(1..34);
                    rng.random_range(1..1u64 << bits)
                },
                ..any()
            };
            // Only Closed breakers here: the reference cannot see whether a probe slot is taken.
            let views = fleet.registry.views(now);
            if views
                .iter()
                .any(|v| v.breaker != ambient_core::BreakerState::Closed)
            {
                continue;
            }
            for strategy in [
                Strategy::Weighted,
                Strategy::LeastLoaded,
                Strategy::LatencyAware,
            ] {
                let expected = reference(&views, &req, strategy);
                let got = fleet.registry.select(now, &req, strategy, &[]);
                assert_eq!(got, expected, "step {step}, {strategy}, {req:?}");
            }
            let got = fleet.registry.select(now, &req, Strategy::RoundRobin, &[]);
            let any_eligible = reference(&views, &req, Strategy::Weighted);
            assert_eq!(
                got.is_some(),
                any_eligible.is_some(),
                "step {step}, round-robin"
            );
        }
        assert_eq!(fleet.registry.len(), NODES);
    }
}
