//! Prometheus metrics, served as text by the HTTP API at `GET /metrics`.
//!
//! Two kinds:
//!
//! - measured by the service as it runs (since this start): tasks ended by status, submission
//!   to final event latency, journal commit time and operations per commit, tasks unfinished
//!   and waiting for a node;
//! - read at each scrape: tasks in the journal by status, nodes in the registry snapshot by
//!   presence and breaker state, inputs dropped by reason (as `ambient nodes` shows them), and
//!   whether the broker is connected.
//!
//! Beside them, [`Series`] keeps tasks ended and their latency per second over the last five
//! minutes, for the dashboard's chart ([`crate::dashboard`]).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use serde::Serialize;

use crate::dispatcher::Ended;
use crate::store::{Store, StoreError, TaskStatus};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Status {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpotOutcome {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeState {
    online: String,
    breaker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

/// Every metric, registered once.
pub struct Metrics {
    registry: Registry,
    ended: Family<Status, Counter>,
    spot_checks: Family<SpotOutcome, Counter>,
    latency: Histogram,
    commit_seconds: Histogram,
    commit_ops: Histogram,
    unfinished: Gauge,
    queued: Gauge,
    journal: Family<Status, Gauge>,
    nodes: Family<NodeState, Gauge>,
    dropped: Family<Reason, Gauge>,
    broker_connected: Gauge,
    series: Mutex<Series>,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            registry: Registry::with_prefix("ambient"),
            ended: Family::default(),
            spot_checks: Family::default(),
            // 0.5 ms to about 65 s.
            latency: Histogram::new(exponential_buckets(0.000_5, 2.0, 18)),
            // 50 µs to about 1.6 s: an fsync on an SD card takes milliseconds.
            commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            commit_ops: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            unfinished: Gauge::default(),
            queued: Gauge::default(),
            journal: Family::default(),
            nodes: Family::default(),
            dropped: Family::default(),
            broker_connected: Gauge::default(),
            series: Mutex::default(),
        };
        let mut r = m.registry;
        r.register(
            "tasks_ended",
            "Tasks that ended since this start, by final status",
            m.ended.clone(),
        );
        r.register(
            "spot_checks",
            "Spot checks drawn since this start, by outcome (agreed, disagreed, missed)",
            m.spot_checks.clone(),
        );
        r.register(
            "task_latency_seconds",
            "Submission to final event at the coordinator",
            m.latency.clone(),
        );
        r.register(
            "journal_commit_seconds",
            "Time of one loop turn's journal commit, from its write until the fsync that made it durable",
            m.commit_seconds.clone(),
        );
        r.register(
            "journal_commit_operations",
            "Journal operations in one commit",
            m.commit_ops.clone(),
        );
        r.register(
            "tasks_unfinished",
            "Tasks accepted and not yet ended",
            m.unfinished.clone(),
        );
        r.register(
            "tasks_queued",
            "Tasks waiting for an eligible node",
            m.queued.clone(),
        );
        r.register(
            "journal_tasks",
            "Tasks in the journal, by status",
            m.journal.clone(),
        );
        r.register(
            "nodes",
            "Registered nodes by presence and the coordinator's breaker state",
            m.nodes.clone(),
        );
        r.register(
            "inputs_dropped",
            "Inputs dropped since this start, by reason (as of the last registry snapshot)",
            m.dropped.clone(),
        );
        r.register(
            "broker_connected",
            "1 while the coordinator is connected to its broker",
            m.broker_connected.clone(),
        );
        Self { registry: r, ..m }
    }
}

impl Metrics {
    /// A task ended: by status, its latency, and its spot check's outcome.
    pub fn task_ended(&self, ended: &Ended) {
        let Ended {
            status,
            latency_ms,
            spot_check,
        } = *ended;
        self.ended
            .get_or_create(&Status {
                status: status.as_str().into(),
            })
            .inc();
        if let Some(spot) = spot_check {
            self.spot_checks
                .get_or_create(&SpotOutcome {
                    outcome: spot.as_str().into(),
                })
                .inc();
        }
        self.latency.observe(latency_ms / 1e3);
        let now_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Ok(mut series) = self.series.lock() {
            series.record(now_s, status == TaskStatus::Completed, latency_ms);
        }
    }

    /// The per-second series up to the second `now_s` (Unix seconds).
    pub fn series(&self, now_s: u64) -> Vec<Point> {
        self.series
            .lock()
            .map(|mut s| s.points(now_s))
            .unwrap_or_default()
    }

    /// A turn's journal commit of `ops` operations took `seconds`, write to fsync.
    pub fn committed(&self, ops: usize, seconds: f64) {
        self.commit_ops.observe(ops as f64);
        self.commit_seconds.observe(seconds);
    }

    /// The dispatcher's task counts.
    pub fn tasks(&self, unfinished: usize, queued: usize) {
        self.unfinished.set(unfinished as i64);
        self.queued.set(queued as i64);
    }

    /// Reads the values kept in the store, then the whole exposition as Prometheus text.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn render(&self, store: &Store, broker_connected: bool) -> Result<String, StoreError> {
        self.journal.clear();
        for (status, n) in store.task_counts()? {
            self.journal
                .get_or_create(&Status {
                    status: status.as_str().into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.nodes.clear();
        for view in store.node_views()? {
            let state = NodeState {
                online: view.online.to_string(),
                breaker: format!("{:?}", view.breaker).to_lowercase(),
            };
            self.nodes.get_or_create(&state).inc();
        }
        for (reason, n) in store.dropped()? {
            self.dropped
                .get_or_create(&Reason { reason })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.broker_connected.set(i64::from(broker_connected));
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        Ok(text)
    }
}

/// Tasks ended per second, with their mean and highest latency, over the last
/// [`Series::SECONDS`] seconds. Seconds in which no task ended hold no point.
#[derive(Debug, Default)]
pub struct Series {
    points: VecDeque<Point>,
}

/// One second of [`Series`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// The second, in Unix seconds.
    pub t_s: u64,
    /// Tasks that completed in it.
    pub completed: u32,
    /// Tasks that failed in it.
    pub failed: u32,
    /// Mean submission to final event latency of those tasks, in milliseconds.
    pub mean_latency_ms: f64,
    /// The highest of those latencies, in milliseconds.
    pub max_latency_ms: f64,
}

impl Series {
    /// How far back the series reaches, in seconds.
    pub const SECONDS: u64 = 300;

    /// A task ended at `now_s` (Unix seconds), completed or not, `latency_ms` after it was
    /// submitted. A clock that steps back adds to the newest second.
    pub fn record(&mut self, now_s: u64, completed: bool, latency_ms: f64) {
        let newest = self.points.back().map_or(0, |p| p.t_s);
        if self.points.is_empty() || now_s > newest {
            self.points.push_back(Point {
                t_s: now_s,
                completed: 0,
                failed: 0,
                mean_latency_ms: 0.0,
                max_latency_ms: 0.0,
            });
        }
        if let Some(p) = self.points.back_mut() {
            let n = f64::from(p.completed + p.failed);
            p.mean_latency_ms = (p.mean_latency_ms * n + latency_ms) / (n + 1.0);
            p.max_latency_ms = p.max_latency_ms.max(latency_ms);
            if completed {
                p.completed += 1;
            } else {
                p.failed += 1;
            }
        }
        self.forget_before(now_s);
    }

    /// The points of the window that ends at `now_s`, oldest first.
    pub fn points(&mut self, now_s: u64) -> Vec<Point> {
        self.forget_before(now_s);
        self.points.iter().copied().collect()
    }

    fn forget_before(&mut self, now_s: u64) {
        let oldest = now_s.saturating_sub(Self::SECONDS - 1);
        while self.points.front().is_some_and(|p| p.t_s < oldest) {
            self.points.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_series_counts_each_second_and_averages_its_latencies() {
        let mut s = Series::default();
        s.record(1_000, true, 2.0);
        s.record(1_000, false, 4.0);
        s.record(1_002, true, 1.0);
        let points = s.points(1_002);
        assert_eq!(points.len(), 2, "a second without tasks holds no point");
        assert_eq!((points[0].completed, points[0].failed), (1, 1));
        assert_eq!(points[0].mean_latency_ms, 3.0);
        assert_eq!(points[0].max_latency_ms, 4.0);
        assert_eq!((points[1].t_s, points[1].completed), (1_002, 1));
    }

    #[test]
    fn the_series_forgets_seconds_older_than_its_window() {
        let mut s = Series::default();
        s.record(1_000, true, 1.0);
        s.record(1_100, true, 1.0);
        assert_eq!(s.points(1_000 + Series::SECONDS - 1).len(), 2);
        let points = s.points(1_000 + Series::SECONDS);
        assert_eq!(points.len(), 1);
        assert_eq!(points[0].t_s, 1_100);
    }

    #[test]
    fn a_clock_stepping_back_adds_to_the_newest_second() {
        let mut s = Series::default();
        s.record(1_000, true, 1.0);
        s.record(999, true, 3.0);
        let points = s.points(1_000);
        assert_eq!(points.len(), 1);
        assert_eq!(points[0].completed, 2);
    }
}
