//! Scheduling (section 2): registry decisions over pools of up to 100,000 nodes beside one step of
//! an ordered index, and signed telemetry ingest beside ed25519 verification alone.

use std::ops::Bound;
use std::time::{Duration, Instant};

use ambient_coordinator::fixture::{DECOYS, ingest_samples, registry, request, traffic};
use ambient_coordinator::{Registry, Strategy};
use ambient_core::{NodeId, PublicKey, SignedTelemetry, verify_message_by};
use anyhow::Context as _;

use super::Plan;
use super::harness::{percentile, progress, time_calls};
use super::report::{Figure, Goal, num};

/// Pool sizes the scheduler is measured at; the goal applies at the largest.
const POOL_SIZES: [usize; 3] = [1_000, 10_000, 100_000];
/// Nodes whose signed samples the ingest figure replays.
const INGEST_NODES: usize = 1_000;

pub(super) const SCHEDULING: &str = "2. scheduling";

pub(super) fn section_scheduling(plan: Plan) -> anyhow::Result<Vec<Figure>> {
    // The fixture overheats some nodes on purpose; their breaker warnings are not news.
    tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
        scheduling(plan)
    })
}

fn scheduling(plan: Plan) -> anyhow::Result<Vec<Figure>> {
    let largest = POOL_SIZES[POOL_SIZES.len() - 1];
    progress(&format!(
        "2. scheduling: signing {largest} announces and samples"
    ));
    let traffic = traffic(largest);
    let t0 = Instant::now();
    let now = t0 + Duration::from_secs(1);
    progress("2. scheduling: registering nodes (every signature is verified)");
    // The largest registry on one thread, the smaller ones on another.
    let mut registries: Vec<(usize, Registry)> = std::thread::scope(|scope| {
        let big = scope.spawn(|| registry(&traffic, t0));
        let mut small = Vec::new();
        for &n in &POOL_SIZES[..POOL_SIZES.len() - 1] {
            small.push((n, registry(&traffic[..n], t0)));
        }
        small.push((
            largest,
            big.join()
                .map_err(|_| anyhow::anyhow!("the registry thread panicked"))?,
        ));
        anyhow::Ok(small)
    })?;

    let req = request();
    let decoys: Vec<NodeId> = traffic[..DECOYS]
        .iter()
        .map(|(a, ..)| a.announce.node)
        .collect();
    let mut figures = Vec::new();
    for (n, registry) in &mut registries {
        let n = *n;
        // The floor of any decision that does not scan: one step in an ordered index of n.
        let index: std::collections::BTreeSet<(u64, u128)> = (0..n as u64)
            .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15), u128::from(i)))
            .collect();
        let keys: Vec<(u64, u128)> = index.iter().copied().step_by((n / 1024).max(1)).collect();
        let mut k = 0;
        let floor = time_calls(&plan, || {
            k = (k + 1) % keys.len();
            index
                .range((Bound::Excluded(keys[k]), Bound::Unbounded))
                .next()
                .copied()
        });
        for strategy in Strategy::ALL {
            let mut registry = registry.clone();
            let first = registry
                .select(now, &req, strategy, &[])
                .context("no node selected")?;
            anyhow::ensure!(
                !decoys.contains(&first),
                "{strategy}: a node without the memory asked for was chosen"
            );
            let t = time_calls(&plan, || registry.select(now, &req, strategy, &[]));
            let mut figure = Figure::new(
                SCHEDULING,
                format!("select.{strategy}.{n}"),
                format!("select, {strategy}, {} nodes", num(n as f64)),
                t.median_ns / 1e3,
                "µs",
            )
            .against(
                floor.median_ns / 1e3,
                format!("one BTreeSet range step over {} keys", num(n as f64)),
            );
            if n == largest {
                figure = figure.goal(Goal::AtMost(10.0));
            }
            figures.push(figure);
        }
    }

    // Ingest: replay pre-signed samples into fresh copies of the 1k registry, one core.
    let (_, small) = &registries[0];
    let samples = ingest_samples(INGEST_NODES, plan.ingest_rounds);
    let mut ingest = Vec::new();
    let mut verify = Vec::new();
    for _ in 0..plan.ingest_samples {
        let mut fresh = small.clone();
        let start = Instant::now();
        for (s, _) in &samples {
            fresh.on_telemetry(now, s)?;
        }
        ingest.push(samples.len() as f64 / start.elapsed().as_secs_f64());
        // The registry keeps each node's key decompressed, so the floor does too.
        let keys = samples
            .iter()
            .map(|(_, key)| PublicKey::from_bytes(key))
            .collect::<Result<Vec<_>, _>>()?;
        let start = Instant::now();
        for ((s, _), key) in samples.iter().zip(&keys) {
            verify_message_by(key, SignedTelemetry::TAG, &s.telemetry, &s.signature)?;
        }
        verify.push(samples.len() as f64 / start.elapsed().as_secs_f64());
    }
    ingest.sort_by(f64::total_cmp);
    verify.sort_by(f64::total_cmp);
    figures.push(
        Figure::new(
            SCHEDULING,
            "telemetry.ingest_per_s",
            "signed telemetry ingest, one core",
            percentile(&ingest, 0.5),
            "samples/s",
        )
        .against(
            percentile(&verify, 0.5),
            "ed25519 verify_message_by alone, same samples and keys decompressed",
        )
        .goal(Goal::AtLeast(30_000.0))
        .note(format!(
            "{} samples from {INGEST_NODES} nodes per run, median of {} runs",
            samples.len(),
            plan.ingest_samples
        )),
    );
    Ok(figures)
}
