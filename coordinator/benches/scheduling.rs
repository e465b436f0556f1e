//! Scheduling decisions and telemetry ingest at pool sizes of 1k, 10k and 100k nodes.
//!
//! The pool is `ambient_coordinator::fixture`'s, the one `ambient bench` measures too. Setup signs
//! and verifies ~100k announces and samples and takes a while.
//!
//! ```text
//! cargo bench -p ambient-coordinator --bench scheduling -- --warm-up-time 1 --measurement-time 3
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use ambient_coordinator::fixture::{DECOYS, ingest_samples, registry, request, traffic};
use ambient_coordinator::{Registry, Requirements, Strategy};
use ambient_core::{NodeId, SignedTelemetry, verify_message};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

const SIZES: [usize; 3] = [1_000, 10_000, 100_000];
/// Nodes whose samples the ingest benchmark replays, and samples per node.
const INGEST_NODES: usize = 1_000;
const INGEST_ROUNDS: u64 = 20;

fn benches(c: &mut Criterion) {
    let t0 = Instant::now();
    let now = t0 + Duration::from_secs(1);
    let all = traffic(SIZES[SIZES.len() - 1]);
    let registries: Vec<(usize, Registry)> = SIZES
        .iter()
        .map(|&n| (n, registry(&all[..n], t0)))
        .collect();
    let req = request();

    let mut select = c.benchmark_group("select");
    for (n, registry) in &registries {
        for strategy in Strategy::ALL {
            let mut registry = registry.clone();
            let decoys: Vec<NodeId> = all[..DECOYS]
                .iter()
                .map(|(a, ..)| a.announce.node)
                .collect();
            if strategy != Strategy::RoundRobin {
                let any = Requirements::default();
                let best = registry.select(now, &any, strategy, &[]).unwrap();
                assert!(
                    decoys.contains(&best),
                    "{strategy}: the decoys must rank first"
                );
            }
            let first = registry.select(now, &req, strategy, &[]).unwrap();
            assert!(
                !decoys.contains(&first),
                "{strategy}: the decoys must be skipped"
            );
            select.bench_with_input(BenchmarkId::new(strategy.as_str(), n), n, |b, _| {
                b.iter(|| black_box(registry.select(now, black_box(&req), strategy, &[])))
            });
        }
    }
    select.finish();

    // A whole placement: choose, count the task in flight, and count it finished again, which
    // moves the node in the least-loaded index twice.
    let mut dispatch = c.benchmark_group("select_start_finish");
    for (n, registry) in &registries {
        let mut registry = registry.clone();
        dispatch.bench_with_input(BenchmarkId::new("least-loaded", n), n, |b, _| {
            b.iter(|| {
                let node = registry
                    .select(now, &req, Strategy::LeastLoaded, &[])
                    .unwrap();
                registry.task_started(&node);
                registry.task_finished(&node);
                black_box(node)
            })
        });
    }
    dispatch.finish();

    let samples = ingest_samples(INGEST_NODES, INGEST_ROUNDS);
    let mut ingest = c.benchmark_group("telemetry_ingest");
    for (n, registry) in registries.iter().filter(|(n, _)| *n != 10_000) {
        // Each sample is accepted once, so replay the set into fresh copies of the registry and
        // time only the ingest.
        ingest.bench_with_input(BenchmarkId::new("signed_sample", n), n, |b, _| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                let mut left = iters as usize;
                while left > 0 {
                    let mut fresh = registry.clone();
                    let batch = &samples[..left.min(samples.len())];
                    let start = Instant::now();
                    for (s, _) in batch {
                        black_box(fresh.on_telemetry(now, s)).unwrap();
                    }
                    spent += start.elapsed();
                    left -= batch.len();
                }
                spent
            })
        });
    }
    let mut next = 0;
    ingest.bench_function("verify_message_alone", |b| {
        b.iter(|| {
            let k = next % samples.len();
            next += 1;
            let (s, key) = &samples[k];
            black_box(verify_message(
                key,
                SignedTelemetry::TAG,
                &s.telemetry,
                &s.signature,
            ))
            .unwrap()
        })
    });
    ingest.finish();
}

criterion_group!(scheduling, benches);
criterion_main!(scheduling);
