//! Benchmarks of the decisions every device makes per sample or per task.
//!
//! Run with `cargo bench -p ambient-core -- --warm-up-time 1 --measurement-time 3`;
//! `targets/bench-sha3.sh` compares the sha3-256 throughput with OpenSSL's.

use std::hint::black_box;

use ambient_core::{
    Breaker, Engine, Envelope, Exit, Identity, Limits, Message, PublicKey, Receipt, SafetyPolicy,
    ScoreConfig, SignedTelemetry, TaskId, Telemetry, TelemetrySample, ThrottleFlags, health_score,
    sha3_256, sign_message,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn sample() -> TelemetrySample {
    TelemetrySample {
        bandwidth_kbps: Some(50_000),
        latency_us: Some(20_000),
        cpu_load_permille: Some(250),
        mem_free_bytes: Some(1 << 30),
        temp_millic: Some(61_500),
        throttle: ThrottleFlags::default(),
        tasks_running: 1,
        ..Default::default()
    }
}

fn receipt(identity: &Identity) -> Receipt {
    Receipt {
        task_id: TaskId::new("bench-task-0001").expect("a valid task id"),
        attempt: 1,
        node: identity.node_id(),
        module: sha3_256(b"module"),
        input: sha3_256(b"input"),
        output: sha3_256(b"output"),
        fuel_used: 123_456_789,
        limits: Limits::default(),
        engine: Engine::Wasmtime,
        exit: Exit::Ok,
    }
}

fn scoring(c: &mut Criterion) {
    let config = ScoreConfig::default();
    let sample = sample();
    c.bench_function("health_score", |b| {
        b.iter(|| health_score(black_box(&config), black_box(&sample), 4, black_box(9_000)))
    });

    // One telemetry tick: observe the sample, then ask whether a task may start.
    let mut breaker = Breaker::new(SafetyPolicy::raspberry_pi());
    let mut now = 0u64;
    c.bench_function("breaker observe+admit", |b| {
        b.iter(|| {
            now += 1_000;
            breaker.observe(now, black_box(&sample));
            breaker.admit(now)
        })
    });
}

fn proofs(c: &mut Criterion) {
    let identity = Identity::from_secret(&[7; 32]);
    let receipt = receipt(&identity);
    c.bench_function("receipt commitment", |b| {
        b.iter(|| black_box(&receipt).commitment())
    });
    c.bench_function("receipt sign", |b| {
        b.iter(|| black_box(receipt.clone()).sign(&identity))
    });
    let signed = receipt.clone().sign(&identity);
    let public_key = identity.public_key();
    c.bench_function("receipt verify signature", |b| {
        b.iter(|| black_box(&signed).verify_signature(&public_key))
    });
    let key = PublicKey::from_bytes(&public_key).expect("a valid key");
    c.bench_function("receipt verify signature, key decompressed once", |b| {
        b.iter(|| black_box(&signed).verify_signature_by(&key))
    });
}

fn wire(c: &mut Criterion) {
    let identity = Identity::from_secret(&[7; 32]);
    let telemetry = Telemetry {
        node: identity.node_id(),
        seq: 42,
        boot_id: 7,
        sample: sample(),
    };
    let signature =
        sign_message(&identity, SignedTelemetry::TAG, &telemetry).expect("telemetry fits");
    let envelope = Envelope::new(Message::Telemetry(SignedTelemetry {
        telemetry,
        signature,
    }));
    let mut buf = [0u8; 256];
    c.bench_function("telemetry envelope encode", |b| {
        b.iter(|| {
            black_box(&envelope)
                .encode_to_slice(&mut buf)
                .map(|f| f.len())
        })
    });
    let frame = envelope.to_vec();
    c.bench_function("telemetry envelope decode", |b| {
        b.iter(|| Envelope::decode(black_box(&frame)))
    });
}

fn hashing(c: &mut Criterion) {
    // 1 MiB of non-trivial bytes; the content does not change Keccak's speed.
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut group = c.benchmark_group("sha3-256");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("1 MiB", |b| b.iter(|| sha3_256(black_box(&data))));
    group.finish();
}

criterion_group!(benches, scoring, proofs, wire, hashing);
criterion_main!(benches);
