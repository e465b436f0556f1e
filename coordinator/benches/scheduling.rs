//! Scheduling decisions and telemetry ingest at pool sizes of 1k, 10k and 100k nodes.
//!
//! Every node is announced and reports once with real, signed traffic; scores, loads and
//! latencies vary, about 3% of nodes are out (overheated, offline, or short of memory for the
//! request), and the eight best-ranked nodes by every strategy lack the memory the request asks
//! for, so each decision has to skip a few. Setup signs and verifies ~100k announces and samples
//! and takes a while.
//!
//! ```text
//! cargo bench -p ambient-coordinator --bench scheduling -- --warm-up-time 1 --measurement-time 3
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use ambient_coordinator::{Registry, RegistryConfig, Requirements, Strategy};
use ambient_core::{
    Announce, Engine, Identity, NodeId, SignedAnnounce, SignedTelemetry, Telemetry,
    TelemetrySample, sign_message, verify_message,
};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIZES: [usize; 3] = [1_000, 10_000, 100_000];
/// Nodes whose samples the ingest benchmark replays, and samples per node.
const INGEST_NODES: usize = 1_000;
const INGEST_ROUNDS: u64 = 20;
/// Nodes ranked first by every strategy but short of the memory the request needs.
const DECOYS: usize = 8;

fn request() -> Requirements {
    Requirements {
        memory_bytes: 256 << 20,
        engine: Some(Engine::Wasmtime),
        ..Default::default()
    }
}

fn identity(i: usize) -> Identity {
    let mut secret = [0xa5; 32];
    secret[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Identity::from_secret(&secret)
}

/// The reading of node `i`: random but reproducible, with the decoys and the out-of-pool nodes
/// placed deliberately.
fn sample(i: usize, rng: &mut StdRng) -> TelemetrySample {
    let mut s = TelemetrySample {
        bandwidth_kbps: Some(rng.random_range(1_000..100_000)),
        latency_us: Some(rng.random_range(1_000..95_000)),
        cpu_load_permille: Some(rng.random_range(50..1000)),
        mem_free_bytes: Some(rng.random_range(512u64 << 20..4 << 30)),
        temp_millic: Some(rng.random_range(40_000..78_000)),
        ..Default::default()
    };
    if i < DECOYS {
        // Best by every strategy, and too little memory for the request.
        s.bandwidth_kbps = Some(200_000);
        s.latency_us = Some(100 + i as u32);
        s.cpu_load_permille = Some(0);
        s.mem_free_bytes = Some(64 << 20);
    } else if i.is_multiple_of(97) {
        s.mem_free_bytes = Some(32 << 20);
    } else if i.is_multiple_of(101) {
        s.temp_millic = Some(90_000);
    }
    s
}

/// Signed announces and first samples for `n` nodes, signed on every core.
fn traffic(n: usize) -> Vec<(SignedAnnounce, SignedTelemetry)> {
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    let chunk = n.div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(t as u64);
                    (t * chunk..((t + 1) * chunk).min(n))
                        .map(|i| {
                            let id = identity(i);
                            let announce = Announce {
                                node: id.node_id(),
                                public_key: id.public_key(),
                                arch: "aarch64".parse().unwrap(),
                                cores: if i < DECOYS { 8 } else { [2, 4, 6, 8][i % 4] },
                                mem_total_bytes: 8 << 30,
                                engine: Engine::Wasmtime,
                                agent_version: "0.1.0".parse().unwrap(),
                                labels: Default::default(),
                                profile: None,
                                max_concurrency: 4,
                            };
                            let signature =
                                sign_message(&id, SignedAnnounce::TAG, &announce).unwrap();
                            let announce = SignedAnnounce {
                                announce,
                                signature,
                            };
                            let telemetry = Telemetry {
                                node: id.node_id(),
                                seq: 1,
                                boot_id: 1,
                                sample: sample(i, &mut rng),
                            };
                            let signature =
                                sign_message(&id, SignedTelemetry::TAG, &telemetry).unwrap();
                            (
                                announce,
                                SignedTelemetry {
                                    telemetry,
                                    signature,
                                },
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
}

fn registry(traffic: &[(SignedAnnounce, SignedTelemetry)], now: Instant) -> Registry {
    let mut registry = Registry::new(RegistryConfig::default());
    for (i, (announce, telemetry)) in traffic.iter().enumerate() {
        registry.on_announce(now, announce).unwrap();
        registry.on_telemetry(now, telemetry).unwrap();
        if i.is_multiple_of(103) && i >= DECOYS {
            registry.on_status(now, announce.announce.node, false);
        }
    }
    registry
}

/// Samples 2..=INGEST_ROUNDS+1 of the first INGEST_NODES nodes, in delivery order.
fn ingest_samples() -> Vec<SignedTelemetry> {
    let mut rng = StdRng::seed_from_u64(99);
    let identities: Vec<Identity> = (0..INGEST_NODES).map(identity).collect();
    (2..INGEST_ROUNDS + 2)
        .flat_map(|seq| (0..INGEST_NODES).map(move |i| (seq, i)))
        .map(|(seq, i)| {
            let telemetry = Telemetry {
                node: identities[i].node_id(),
                seq,
                boot_id: 1,
                sample: sample(i, &mut rng),
            };
            let signature = sign_message(&identities[i], SignedTelemetry::TAG, &telemetry).unwrap();
            SignedTelemetry {
                telemetry,
                signature,
            }
        })
        .collect()
}

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
            let decoys: Vec<NodeId> = all[..DECOYS].iter().map(|(a, _)| a.announce.node).collect();
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

    let samples = ingest_samples();
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
                    for s in batch {
                        black_box(fresh.on_telemetry(now, s)).unwrap();
                    }
                    spent += start.elapsed();
                    left -= batch.len();
                }
                spent
            })
        });
    }
    let keys: Vec<[u8; 32]> = (0..INGEST_NODES)
        .map(|i| identity(i).public_key())
        .collect();
    let mut next = 0;
    ingest.bench_function("verify_message_alone", |b| {
        b.iter(|| {
            let k = next % samples.len();
            next += 1;
            let (s, key) = (&samples[k], &keys[k % INGEST_NODES]);
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
