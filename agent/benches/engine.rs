//! Sandbox overheads: instantiating and running a cached trivial module, the digits classifier
//! in WASM (fuel on) against the same model compiled natively, and compiling that module (what
//! a node spends once per module it has not seen).
//!
//! Run with `cargo bench -p ambient-agent --bench engine`.

use std::hint::black_box;

use ambient_agent::calibrate::DIGITS_WASM;
use ambient_agent::engine::{Call, Sandbox, SandboxConfig, Wasmtime};
use ambient_core::{Abi, Exit, Limits, sha3_256};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use ambient_testkit::wat::TRIVIAL;

fn limits() -> Limits {
    Limits {
        memory_bytes: 64 << 20,
        timeout_ms: 10_000,
        fuel: 10_000_000_000,
    }
}

fn trivial(c: &mut Criterion) {
    let sandbox = Wasmtime::new(SandboxConfig::default()).unwrap();
    eprintln!("pooling allocator: {}", sandbox.is_pooling());
    let bytes = wat::parse_str(TRIVIAL).unwrap();
    let module = sandbox.prepare(sha3_256(&bytes), &bytes).unwrap();
    let call = Call::new(Abi::Plain, "run", b"", limits(), 0);
    assert_eq!(sandbox.execute(&module, &call).exit, Exit::Ok);
    c.bench_function("instantiate_and_run_cached_trivial_plain", |b| {
        b.iter(|| black_box(sandbox.execute(black_box(&module), black_box(&call))))
    });
}

fn digits(c: &mut Criterion) {
    let bytes = DIGITS_WASM.to_vec();
    const BATCH: usize = 256;
    let images: Vec<u8> = ambient_digits::heldout()
        .cycle()
        .take(BATCH)
        .flat_map(|(img, _)| img.iter().copied())
        .collect();
    let sandbox = Wasmtime::new(SandboxConfig::default()).unwrap();
    let module = sandbox.prepare(sha3_256(&bytes), &bytes).unwrap();
    let call = Call::new(Abi::Plain, "classify", &images, limits(), 0);
    let run = sandbox.execute(&module, &call);
    assert_eq!(run.exit, Exit::Ok, "{}", run.message);
    let mut native = vec![0u8; BATCH];
    ambient_digits::classify_batch(&images, &mut native).unwrap();
    assert_eq!(run.output, native);
    eprintln!(
        "digits: {} fuel for {BATCH} images ({} per image)",
        run.fuel_used,
        run.fuel_used / BATCH as u64
    );

    let mut group = c.benchmark_group("digits_classify_256");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("wasm_fuel_metered", |b| {
        b.iter(|| black_box(sandbox.execute(black_box(&module), black_box(&call))))
    });
    group.bench_function("native", |b| {
        let mut labels = vec![0u8; BATCH];
        b.iter(|| {
            ambient_digits::classify_batch(black_box(&images), &mut labels).unwrap();
            black_box(&labels);
        })
    });
    group.finish();

    // Each iteration compiles the same code under a new hash: the module with a custom section
    // holding the iteration's number, so the sandbox's cache never answers.
    let mut n = 0u64;
    c.bench_function("compile_digits_module", |b| {
        b.iter(|| {
            n += 1;
            let mut unique = bytes.clone();
            unique.extend_from_slice(&[0, 10, 1, b'n']);
            unique.extend_from_slice(&n.to_le_bytes());
            black_box(sandbox.prepare(sha3_256(&unique), &unique).unwrap())
        })
    });
}

criterion_group!(benches, trivial, digits);
criterion_main!(benches);
