//! Execution (section 3): the agent's sandbox beside wasmtime alone, and the digits kernel in WASM
//! beside the same kernel compiled natively.

use std::hint::black_box;

use ambient_agent::calibrate::DIGITS_WASM;
use ambient_agent::engine::{Call, Sandbox, SandboxConfig, Wasmtime};
use ambient_core::{Abi, Exit, Limits, sha3_256};
use anyhow::Context as _;

use super::harness::{Timing, progress, time_calls};
use super::report::{Figure, Goal};
use super::{Plan, TRIVIAL_WAT};

pub(super) const EXECUTION: &str = "3. execution";

/// Whether a raw wasmtime engine meters fuel, as the sandbox always does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metering {
    Fuel,
    Off,
}

/// wasmtime alone, configured as the agent's sandbox is (epochs, pooling, and fuel unless
/// `metering` is off), running one plain-ABI call per invocation: a fresh instance, `alloc`,
/// the input written, the entry called, the output copied out. The floor the sandbox adds its
/// checks and bookkeeping to.
fn wasmtime_plain<'a>(
    bytes: &[u8],
    entry: &'a str,
    input: &'a [u8],
    metering: Metering,
    config: &SandboxConfig,
) -> anyhow::Result<impl FnMut() -> wasmtime::Result<Vec<u8>> + 'a> {
    // wasmtime's error type is not `std::error::Error`; keep its whole chain in the message.
    let setup = |e: wasmtime::Error| anyhow::anyhow!("wasmtime baseline: {e:#}");
    let mut c = wasmtime::Config::new();
    c.consume_fuel(metering == Metering::Fuel)
        .epoch_interruption(true)
        .cranelift_nan_canonicalization(true)
        .relaxed_simd_deterministic(true)
        .wasm_backtrace_max_frames(None);
    let mut pool = wasmtime::PoolingAllocationConfig::new();
    pool.total_core_instances(config.max_instances)
        .total_memories(config.max_instances)
        .total_tables(config.max_instances)
        .max_memory_size(usize::try_from(config.max_memory_bytes).unwrap_or(usize::MAX));
    c.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    let engine = wasmtime::Engine::new(&c).map_err(setup)?;
    let module = wasmtime::Module::new(&engine, bytes).map_err(setup)?;
    let pre = wasmtime::Linker::<()>::new(&engine)
        .instantiate_pre(&module)
        .map_err(setup)?;
    let fuel = Limits::default().fuel;
    let len = i32::try_from(input.len()).map_err(|_| anyhow::anyhow!("input too large"))?;
    Ok(move || {
        let mut store = wasmtime::Store::new(&engine, ());
        if metering == Metering::Fuel {
            store.set_fuel(fuel)?;
        }
        store.set_epoch_deadline(1);
        let instance = pre.instantiate(&mut store)?;
        let alloc = instance.get_typed_func::<i32, i32>(&mut store, "alloc")?;
        let call = instance.get_typed_func::<(i32, i32), i64>(&mut store, entry)?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| wasmtime::Error::msg("no memory export"))?;
        let ptr = alloc.call(&mut store, len)?;
        memory.write(&mut store, ptr as u32 as usize, input)?;
        let packed = call.call(&mut store, (ptr, len))? as u64;
        let (at, n) = ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize);
        let output = memory
            .data(&store)
            .get(at..at + n)
            .ok_or_else(|| wasmtime::Error::msg("output out of bounds"))?;
        Ok(output.to_vec())
    })
}

/// Runs a raw wasmtime call once to check it, then times it.
fn time_wasmtime(
    plan: &Plan,
    mut f: impl FnMut() -> wasmtime::Result<Vec<u8>>,
) -> anyhow::Result<(Vec<u8>, Timing)> {
    let output = f().map_err(|e| anyhow::anyhow!("wasmtime baseline: {e:#}"))?;
    Ok((output, time_calls(plan, f)))
}

pub(super) fn section_execution(plan: Plan) -> anyhow::Result<Vec<Figure>> {
    progress("3. execution");
    let config = SandboxConfig::default();
    let sandbox = Wasmtime::new(config.clone())?;
    let trivial = wat::parse_str(TRIVIAL_WAT).context("the trivial module does not assemble")?;
    let module = sandbox.prepare(sha3_256(&trivial), &trivial)?;
    let call = Call::new(Abi::Plain, "run", b"", Limits::default(), 0);
    let first = sandbox.execute(&module, &call);
    anyhow::ensure!(
        first.exit == Exit::Ok,
        "the trivial module ended {:?}: {}",
        first.exit,
        first.message
    );
    let t = time_calls(&plan, || sandbox.execute(&module, &call));
    let (_, floor) = time_wasmtime(
        &plan,
        wasmtime_plain(&trivial, "run", b"", Metering::Fuel, &config)?,
    )?;
    let mut figures = vec![
        Figure::new(
            EXECUTION,
            "sandbox.trivial_us",
            "instantiate + run, cached trivial module",
            t.median_ns / 1e3,
            "µs",
        )
        .against(
            floor.median_ns / 1e3,
            "wasmtime alone, same engine settings: instantiate, alloc, run, copy output",
        )
        .goal(Goal::AtMost(2.0))
        .note(format!("{} runs per sample", t.calls_per_sample)),
    ];

    let images: Vec<u8> = ambient_digits::heldout()
        .flat_map(|(image, _)| *image)
        .collect();
    let count = images.len() / ambient_digits::IMAGE_BYTES;
    let mut native = vec![0u8; count];
    ambient_digits::classify_batch(&images, &mut native)?;
    let digits = sandbox.prepare(sha3_256(DIGITS_WASM), DIGITS_WASM)?;
    let call = Call::new(Abi::Plain, "classify", &images, Limits::default(), 0);
    let run = sandbox.execute(&digits, &call);
    anyhow::ensure!(
        run.exit == Exit::Ok,
        "digits.wasm ended {:?}: {}",
        run.exit,
        run.message
    );
    anyhow::ensure!(
        run.output == native,
        "digits.wasm disagrees with the native classifier"
    );
    let wasm = time_calls(&plan, || sandbox.execute(&digits, &call));
    let mut labels = vec![0u8; count];
    let native_t = time_calls(&plan, || {
        ambient_digits::classify_batch(black_box(&images), &mut labels)
    });
    let per_s = |ns: f64| count as f64 / (ns / 1e9);
    figures.push(
        Figure::new(
            EXECUTION,
            "digits.wasm_images_per_s",
            format!("digits classifier in WASM, {count} images"),
            per_s(wasm.median_ns),
            "images/s",
        )
        .against(
            per_s(native_t.median_ns),
            "native ambient_digits::classify_batch, same input",
        )
        .goal(Goal::RatioAtLeast(0.5))
        .note(format!(
            "fuel metered; {} fuel per image; includes instantiation",
            run.fuel_used / count as u64
        )),
    );
    // What a task's fuel limit means in time on this machine: the agent's own measurement,
    // the rate it announces (ambient_agent::calibrate).
    let calibration = ambient_agent::calibrate::fuel_rate(&sandbox)?;
    let fuel_per_s = calibration.fuel_per_s.get() as f64;
    figures.push(
        Figure::new(
            EXECUTION,
            "digits.fuel_per_s",
            "fuel per second on this machine, as an agent here announces it",
            fuel_per_s,
            "fuel/s",
        )
        .note(format!(
            "digits kernel, {} images a run, median of {}; the default fuel limit ({}) lasts {:.1} s here",
            ambient_agent::calibrate::IMAGES,
            ambient_agent::calibrate::RUNS,
            Limits::default().fuel,
            Limits::default().fuel as f64 / fuel_per_s
        )),
    );
    // Splits the gap to native: what fuel metering costs, and what is left to code generation.
    let (output, unmetered) = time_wasmtime(
        &plan,
        wasmtime_plain(DIGITS_WASM, "classify", &images, Metering::Off, &config)?,
    )?;
    anyhow::ensure!(
        output == native,
        "digits.wasm without fuel disagrees with the native classifier"
    );
    figures.push(
        Figure::new(
            EXECUTION,
            "digits.wasmtime_no_fuel_images_per_s",
            "context: digits in wasmtime alone, no fuel",
            per_s(unmetered.median_ns),
            "images/s",
        )
        .against(
            per_s(native_t.median_ns),
            "native ambient_digits::classify_batch, same input",
        )
        .note(
            "not a product figure: the sandbox always meters fuel; this shows what metering costs",
        ),
    );
    Ok(figures)
}
