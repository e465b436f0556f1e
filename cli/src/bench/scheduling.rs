//! Scheduling (section 2): registry decisions over pools of up to 100,000 nodes beside one step of
//! an ordered index, and signed telemetry ingest beside ed25519 verification alone.

use std::ops::Bound;
use std::time::{Duration, Instant};

use ambient_coordinator::{Registry, RegistryConfig, Requirements, Strategy};
use ambient_core::{
    Announce, Engine, Identity, NodeId, SignedAnnounce, SignedTelemetry, Telemetry,
    TelemetrySample, sign_message, verify_message,
};
use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use super::Plan;
use super::harness::{percentile, progress, time_calls};
use super::report::{Figure, Goal, num};

/// Pool sizes the scheduler is measured at; the goal applies at the largest.
const POOL_SIZES: [usize; 3] = [1_000, 10_000, 100_000];
/// Nodes ranked first by every strategy but short of the memory the request asks for, so every
/// decision skips a few, as real ones do.
const DECOYS: usize = 8;
/// Nodes whose signed samples the ingest figure replays.
const INGEST_NODES: usize = 1_000;

pub(super) const SCHEDULING: &str = "2. scheduling";

fn node_identity(i: usize) -> Identity {
    let mut secret = [0x5c; 32];
    secret[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Identity::from_secret(&secret)
}

/// Node `i`'s reading: reproducible, varied, with the decoys and some unavailable nodes placed
/// on purpose.
fn node_sample(i: usize, rng: &mut StdRng) -> TelemetrySample {
    let mut s = TelemetrySample {
        bandwidth_kbps: Some(rng.random_range(1_000..100_000)),
        latency_us: Some(rng.random_range(1_000..95_000)),
        cpu_load_permille: Some(rng.random_range(50..1000)),
        mem_free_bytes: Some(rng.random_range(512u64 << 20..4 << 30)),
        temp_millic: Some(rng.random_range(40_000..78_000)),
        ..TelemetrySample::default()
    };
    if i < DECOYS {
        s.bandwidth_kbps = Some(200_000);
        s.latency_us = Some(100 + i as u32);
        s.cpu_load_permille = Some(0);
        s.mem_free_bytes = Some(64 << 20);
    } else if i.is_multiple_of(101) {
        s.temp_millic = Some(90_000);
    }
    s
}

fn scheduling_request() -> Requirements {
    Requirements {
        memory_bytes: 256 << 20,
        engine: Some(Engine::Wasmtime),
        ..Requirements::default()
    }
}

/// Signed announces and first samples of `n` nodes, signed on every core.
fn signed_traffic(n: usize) -> anyhow::Result<Vec<(SignedAnnounce, SignedTelemetry)>> {
    let arch: heapless::String<16> = "aarch64"
        .try_into()
        .map_err(|_| anyhow::anyhow!("arch does not fit"))?;
    let version: heapless::String<16> = "0.1.0"
        .try_into()
        .map_err(|_| anyhow::anyhow!("version does not fit"))?;
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    let chunk = n.div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (arch, version) = (arch.clone(), version.clone());
                scope.spawn(move || -> anyhow::Result<Vec<_>> {
                    let mut rng = StdRng::seed_from_u64(t as u64);
                    (t * chunk..((t + 1) * chunk).min(n))
                        .map(|i| {
                            let id = node_identity(i);
                            let announce = Announce {
                                node: id.node_id(),
                                public_key: id.public_key(),
                                arch: arch.clone(),
                                cores: [2, 4, 6, 8][i % 4],
                                mem_total_bytes: 8 << 30,
                                engine: Engine::Wasmtime,
                                agent_version: version.clone(),
                                labels: heapless::Vec::new(),
                                profile: None,
                                max_concurrency: 4,
                            };
                            let signature = sign_message(&id, SignedAnnounce::TAG, &announce)?;
                            let telemetry = Telemetry {
                                node: id.node_id(),
                                seq: 1,
                                boot_id: 1,
                                sample: node_sample(i, &mut rng),
                            };
                            let t_signature = sign_message(&id, SignedTelemetry::TAG, &telemetry)?;
                            Ok((
                                SignedAnnounce {
                                    announce,
                                    signature,
                                },
                                SignedTelemetry {
                                    telemetry,
                                    signature: t_signature,
                                },
                            ))
                        })
                        .collect()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for w in workers {
            all.extend(
                w.join()
                    .map_err(|_| anyhow::anyhow!("a signing thread panicked"))??,
            );
        }
        Ok(all)
    })
}

fn build_registry(
    traffic: &[(SignedAnnounce, SignedTelemetry)],
    now: Instant,
) -> anyhow::Result<Registry> {
    let mut registry = Registry::new(RegistryConfig::default());
    for (announce, telemetry) in traffic {
        registry.on_announce(now, announce)?;
        registry.on_telemetry(now, telemetry)?;
    }
    Ok(registry)
}

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
    let traffic = signed_traffic(largest)?;
    let t0 = Instant::now();
    let now = t0 + Duration::from_secs(1);
    progress("2. scheduling: registering nodes (every signature is verified)");
    // The largest registry on one thread, the smaller ones on another.
    let mut registries: Vec<(usize, Registry)> = std::thread::scope(|scope| {
        let big = scope.spawn(|| build_registry(&traffic, t0));
        let mut small = Vec::new();
        for &n in &POOL_SIZES[..POOL_SIZES.len() - 1] {
            small.push((n, build_registry(&traffic[..n], t0)?));
        }
        small.push((
            largest,
            big.join()
                .map_err(|_| anyhow::anyhow!("the registry thread panicked"))??,
        ));
        anyhow::Ok(small)
    })?;

    let req = scheduling_request();
    let decoys: Vec<NodeId> = traffic[..DECOYS]
        .iter()
        .map(|(a, _)| a.announce.node)
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
    let identities: Vec<Identity> = (0..INGEST_NODES).map(node_identity).collect();
    let mut rng = StdRng::seed_from_u64(99);
    let mut samples = Vec::new();
    for seq in 2..plan.ingest_rounds + 2 {
        for (i, id) in identities.iter().enumerate() {
            let telemetry = Telemetry {
                node: id.node_id(),
                seq,
                boot_id: 1,
                sample: node_sample(i, &mut rng),
            };
            let signature = sign_message(id, SignedTelemetry::TAG, &telemetry)?;
            samples.push((
                SignedTelemetry {
                    telemetry,
                    signature,
                },
                id.public_key(),
            ));
        }
    }
    let mut ingest = Vec::new();
    let mut verify = Vec::new();
    for _ in 0..plan.ingest_samples {
        let mut fresh = small.clone();
        let start = Instant::now();
        for (s, _) in &samples {
            fresh.on_telemetry(now, s)?;
        }
        ingest.push(samples.len() as f64 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        for (s, key) in &samples {
            verify_message(key, SignedTelemetry::TAG, &s.telemetry, &s.signature)?;
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
            "ed25519 verify_message alone, same samples",
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
