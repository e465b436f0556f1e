//! The synthetic pool both scheduling benchmarks measure (`cargo bench --bench scheduling` and
//! `ambient bench`'s section 2), so the two figures are of one thing. Not part of the API.
//!
//! Every node is announced, reports once and answers the coordinator's first probe with real,
//! signed traffic (its pong comes back after the round trip its sample names); scores, loads
//! and latencies vary, fuel rates come in four board classes (10^8 to 3·10^9 fuel/s), about 3% of
//! nodes are out (overheated, offline, or short of memory for the [`request`]), and the
//! [`DECOYS`] best-ranked nodes by every strategy lack the memory the request asks for, so each
//! decision has to skip a few.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::time::Instant;

use std::time::Duration;

use ambient_core::{
    Announce, Engine, Identity, NodeId, Pong, SignedAnnounce, SignedTelemetry, Telemetry,
    TelemetrySample, sign_message,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{Registry, RegistryConfig, Requirements};

/// Nodes ranked first by every strategy but short of the memory [`request`] needs.
pub const DECOYS: usize = 8;

/// What every measured decision asks for: a task of 10^8 fuel, which takes from 33 ms to a
/// second on the pool's boards, so latency-aware placement weighs speed against distance.
pub fn request() -> Requirements {
    Requirements {
        memory_bytes: 256 << 20,
        engine: Some(Engine::Wasmtime),
        fuel: 100_000_000,
        ..Requirements::default()
    }
}

/// Node `i`'s announced fuel rate: the decoys fastest, the others in four classes.
fn fuel_per_s(i: usize) -> Option<NonZeroU64> {
    let rate = if i < DECOYS {
        10_000_000_000
    } else {
        [100_000_000, 300_000_000, 1_000_000_000, 3_000_000_000][i % 4]
    };
    NonZeroU64::new(rate)
}

/// Node `i`'s key.
pub fn identity(i: usize) -> Identity {
    let mut secret = [0xa5; 32];
    secret[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Identity::from_secret(&secret)
}

/// Node `i`'s reading: random but reproducible, with the decoys and the out-of-pool nodes
/// placed deliberately.
pub fn sample(i: usize, rng: &mut StdRng) -> TelemetrySample {
    let mut s = TelemetrySample {
        bandwidth_kbps: Some(rng.random_range(1_000..100_000)),
        latency_us: Some(rng.random_range(1_000..95_000)),
        cpu_load_permille: Some(rng.random_range(50..1000)),
        mem_free_bytes: Some(rng.random_range(512u64 << 20..4 << 30)),
        temp_millic: Some(rng.random_range(40_000..78_000)),
        ..TelemetrySample::default()
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

fn signed(i: usize, seq: u64, rng: &mut StdRng) -> SignedTelemetry {
    let id = identity(i);
    let telemetry = Telemetry {
        node: id.node_id(),
        seq,
        boot_id: 1,
        sample: sample(i, rng),
    };
    let signature = sign_message(&id, SignedTelemetry::TAG, &telemetry).expect("fits");
    SignedTelemetry {
        telemetry,
        signature,
    }
}

/// Signed announces, first samples and pongs of `n` nodes, signed on every core. Node `i`'s
/// pong answers the probe with nonce `i + 1`: the coordinator's first probe of it, when the
/// nodes register in this order ([`registry`]).
pub fn traffic(n: usize) -> Vec<(SignedAnnounce, SignedTelemetry, Pong)> {
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
                                arch: "aarch64".try_into().expect("short"),
                                cores: if i < DECOYS { 8 } else { [2, 4, 6, 8][i % 4] },
                                mem_total_bytes: 8 << 30,
                                engine: Engine::Wasmtime,
                                agent_version: "0.1.0".try_into().expect("short"),
                                labels: Default::default(),
                                profile: None,
                                max_concurrency: 4,
                                fuel_per_s: fuel_per_s(i),
                            };
                            let signature =
                                sign_message(&id, SignedAnnounce::TAG, &announce).expect("fits");
                            let announce = SignedAnnounce {
                                announce,
                                signature,
                            };
                            let pong = Pong::sign(&id, &id.node_id(), i as u64 + 1);
                            (announce, signed(i, 1, &mut rng), pong)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a signing thread panicked"))
            .collect()
    })
}

/// A registry holding `traffic`'s nodes as of `now`, each probed once (the pong back after
/// the round trip its sample names), every 103rd (but the decoys) offline.
///
/// # Panics
///
/// When the registry refuses the traffic (it never does: it is validly signed).
pub fn registry(traffic: &[(SignedAnnounce, SignedTelemetry, Pong)], now: Instant) -> Registry {
    let mut registry = Registry::new(RegistryConfig {
        joins_per_s: u32::MAX,
        max_nodes: traffic.len().max(1),
        ..RegistryConfig::default()
    });
    for (announce, telemetry, _) in traffic {
        registry.on_announce(now, announce).expect("joins");
        registry.on_telemetry(now, telemetry).expect("accepted");
    }
    // One call sends at most `MAX_PROBES_PER_CALL`; the rest stay due for the next call. A
    // new node is probed ahead of those registered before it, so the probes go out last node
    // first, and node i's pong answers nonce i + 1.
    let index: HashMap<NodeId, u64> = traffic
        .iter()
        .zip(1..)
        .map(|((a, ..), nonce)| (a.announce.node, nonce))
        .collect();
    let mut nonce = traffic.len() as u64 + 1;
    let mut probed = 0;
    loop {
        let sent = registry.probes(now, || {
            nonce -= 1;
            nonce
        });
        if sent.is_empty() {
            break;
        }
        for p in &sent {
            assert_eq!(
                Some(&p.nonce),
                index.get(&p.node),
                "probed in registration order, reversed"
            );
        }
        probed += sent.len();
    }
    assert_eq!(probed, traffic.len(), "every node probed once");
    for (announce, telemetry, pong) in traffic {
        let rtt = telemetry.telemetry.sample.latency_us.unwrap_or(0);
        let back = now + Duration::from_micros(rtt.into());
        registry
            .on_pong(now, back, announce.announce.node, pong)
            .expect("answers its probe");
    }
    for (i, (announce, ..)) in traffic.iter().enumerate() {
        if i.is_multiple_of(103) && i >= DECOYS {
            registry.on_status(now, announce.announce.node, false);
        }
    }
    registry
}

/// Samples 2..=`rounds`+1 of the first `nodes` nodes, in delivery order, with each node's key.
pub fn ingest_samples(nodes: usize, rounds: u64) -> Vec<(SignedTelemetry, [u8; 32])> {
    let mut rng = StdRng::seed_from_u64(99);
    let keys: Vec<[u8; 32]> = (0..nodes).map(|i| identity(i).public_key()).collect();
    (2..rounds + 2)
        .flat_map(|seq| (0..nodes).map(move |i| (seq, i)))
        .map(|(seq, i)| (signed(i, seq, &mut rng), keys[i]))
        .collect()
}
