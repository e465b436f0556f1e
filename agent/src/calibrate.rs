//! The node's fuel rate: fuel burnt per second on a real kernel, measured once when the agent
//! starts and announced.
//!
//! A task's fuel limit says how much work it may do, not how long that takes: the same fuel is
//! about a millisecond on a desktop core and tens on a 32-bit Pi running Pulley. Announcing the
//! rate lets the coordinator turn a fuel limit into an expected run time per node, which
//! latency-aware placement ranks by.
//!
//! The measurement runs the digits classifier (`tasks/modules/digits.wasm`, 3.9 KB, embedded)
//! through the agent's own sandbox, the path every task takes: a fresh instance, fuel metered,
//! the input copied in and the output out. One run warms up (the module is compiled at the first
//! start and read from the sandbox's module cache at later ones), then [`RUNS`] runs of [`IMAGES`] blank images are timed and
//! the median rate is announced. `ambient bench` reports the same function's figure as
//! `digits.fuel_per_s`.

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use ambient_core::{Abi, Exit, Limits, sha3_256};

use crate::engine::{Call, ExecError, Sandbox};

/// The digit classifier, built from `tasks/digits-wasm` by `tasks/build.sh`.
pub const DIGITS_WASM: &[u8] = include_bytes!("../../tasks/modules/digits.wasm");
/// Bytes per image the classifier reads: 8 × 8 pixels (`ambient_digits::IMAGE_BYTES`).
pub const IMAGE_BYTES: usize = 64;
/// Images per timed run: about 1.1 million fuel, so the run, not the instantiation, dominates.
pub const IMAGES: usize = 256;
/// Timed runs; the median is announced.
pub const RUNS: usize = 5;
/// The memory limit of a calibration run: the kernel needs under 1 MiB, and a board configured
/// with a small `sandbox.max_memory_bytes` (a Pi Zero) must still measure its rate.
pub const MEMORY_BYTES: u64 = 16 << 20;

/// What [`fuel_rate`] measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Calibration {
    /// Median fuel per second over the timed runs.
    pub fuel_per_s: NonZeroU64,
    /// Fuel one run spent (the same every run: fuel is deterministic).
    pub fuel_per_run: u64,
    /// Median wall time of one run.
    pub median_run: Duration,
}

/// Why the rate could not be measured: the node still works, it announces no rate.
#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    /// The sandbox refused the classifier.
    #[error("the calibration kernel does not load: {0}")]
    Prepare(#[from] ExecError),
    /// The classifier ran but did not end well.
    #[error("the calibration kernel ended {exit:?}: {message}")]
    Run {
        /// How it ended.
        exit: Exit,
        /// The sandbox's detail.
        message: String,
    },
}

/// Measures this node's fuel rate through `sandbox`. Blocks for [`RUNS`] + 1 runs of the kernel
/// (a few milliseconds on a desktop core, under a second on an emulated 32-bit ARM board), plus
/// the module's compilation unless the sandbox has it cached.
///
/// # Errors
/// [`CalibrationError`] when the kernel cannot be loaded or does not end `Ok`.
pub fn fuel_rate(sandbox: &dyn Sandbox) -> Result<Calibration, CalibrationError> {
    // From the module cache when an earlier start compiled it: no compiler's worth of memory.
    let hash = sha3_256(DIGITS_WASM);
    let module = match sandbox.load(&hash)? {
        Some(module) => module,
        None => sandbox.prepare(hash, DIGITS_WASM)?,
    };
    let images = [0u8; IMAGES * IMAGE_BYTES];
    let limits = Limits {
        memory_bytes: MEMORY_BYTES,
        ..Limits::default()
    };
    let call = Call::new(Abi::Plain, "classify", &images, limits, 0);
    let run = || {
        let started = Instant::now();
        let run = sandbox.execute(&module, &call);
        let elapsed = started.elapsed();
        match run.exit {
            Exit::Ok => Ok((run.fuel_used, elapsed)),
            exit => Err(CalibrationError::Run {
                exit,
                message: run.message,
            }),
        }
    };
    run()?;
    let mut samples = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        samples.push(run()?);
    }
    let (fuel_per_run, _) = samples[0];
    samples.sort_by_key(|(_, elapsed)| *elapsed);
    let median_run = samples[RUNS / 2].1;
    Ok(Calibration {
        fuel_per_s: per_second(fuel_per_run, median_run),
        fuel_per_run,
        median_run,
    })
}

/// `fuel` spent in `elapsed`, per second; at least 1, and `u64::MAX` when `elapsed` is zero.
pub fn per_second(fuel: u64, elapsed: Duration) -> NonZeroU64 {
    let nanos = elapsed.as_nanos().max(1);
    let rate = u128::from(fuel) * 1_000_000_000 / nanos;
    NonZeroU64::new(u64::try_from(rate).unwrap_or(u64::MAX).max(1)).expect("at least 1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{SandboxConfig, Wasmtime};

    #[test]
    fn the_calibration_runs_the_digits_kernel_through_the_sandbox_and_reports_its_fuel() {
        assert_eq!(IMAGE_BYTES, ambient_digits::IMAGE_BYTES);
        let sandbox = Wasmtime::new(SandboxConfig::default()).unwrap();
        let c = fuel_rate(&sandbox).unwrap();
        // Fuel counts WASM operators: the same on every machine and engine (qemu-smoke checks
        // aarch64 and armv7 against x86_64 for the same kernel).
        assert_eq!(c.fuel_per_run, 1_135_956, "fuel of {IMAGES} blank images");
        assert!(c.median_run > Duration::ZERO);
        assert_eq!(c.fuel_per_s, per_second(c.fuel_per_run, c.median_run));
    }

    #[test]
    fn a_board_with_a_small_memory_cap_still_measures_its_rate() {
        let sandbox = Wasmtime::new(SandboxConfig {
            max_memory_bytes: MEMORY_BYTES,
            ..SandboxConfig::default()
        })
        .unwrap();
        assert!(fuel_rate(&sandbox).is_ok());
    }

    #[test]
    fn a_sandbox_that_refuses_the_kernel_gives_an_error_not_a_rate() {
        let sandbox = Wasmtime::new(SandboxConfig {
            max_module_bytes: 1024,
            ..SandboxConfig::default()
        })
        .unwrap();
        let err = fuel_rate(&sandbox).unwrap_err();
        assert!(matches!(err, CalibrationError::Prepare(_)), "{err}");
    }

    #[test]
    fn a_rate_is_fuel_over_seconds_and_never_zero() {
        assert_eq!(
            per_second(1_000_000, Duration::from_millis(2)).get(),
            500_000_000
        );
        assert_eq!(per_second(0, Duration::from_secs(1)).get(), 1);
        assert_eq!(per_second(u64::MAX, Duration::ZERO).get(), u64::MAX);
    }
}
