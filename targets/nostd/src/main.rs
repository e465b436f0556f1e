//! Firmware-style proof that `ambient-core` builds and links without `std` or `alloc`, and a
//! measure of what it costs in flash.
//!
//! It does what a microcontroller node does per sample and per task: score itself, step the
//! safety breaker, commit to a receipt and sign it with ed25519. `black_box` keeps inputs
//! opaque and results alive, so the optimiser cannot fold the work away and the size that
//! `targets/nostd-check.sh` prints is the size of the real code.
//!
//! ```sh
//! bash targets/nostd-check.sh   # builds for thumbv7em-none-eabihf and riscv32imac-unknown-none-elf
//! ```
#![no_std]
#![no_main]

use core::hint::black_box;

use ambient_core::{
    Admission, Breaker, Engine, Exit, Identity, Limits, Receipt, SafetyPolicy, ScoreConfig, TaskId,
    TelemetrySample, health_score, sha3_256,
};

/// One sample and one task, as a device would handle them.
fn work() {
    let sample = black_box(TelemetrySample {
        bandwidth_kbps: Some(2_000),
        latency_us: Some(15_000),
        cpu_load_permille: Some(300),
        mem_free_bytes: Some(96 << 10),
        temp_millic: Some(48_000),
        ..TelemetrySample::default()
    });
    let terms = health_score(
        &ScoreConfig::default(),
        &sample,
        black_box(1),
        black_box(5_000),
    );

    let mut breaker = Breaker::new(SafetyPolicy::default());
    let transition = breaker.observe(black_box(1_000), &sample);
    let admission = breaker.admit(black_box(1_001));

    if admission != Admission::Admit {
        black_box((terms, transition, admission));
        return;
    }
    let identity = Identity::from_secret(black_box(&[7; 32]));
    let Some(task_id) = TaskId::new(black_box("task-001")) else {
        return;
    };
    let receipt = Receipt {
        task_id,
        attempt: 1,
        node: identity.node_id(),
        module: sha3_256(black_box(b"module")),
        input: sha3_256(black_box(b"input")),
        output: sha3_256(black_box(b"output")),
        fuel_used: black_box(807),
        limits: Limits::default(),
        engine: Engine::Wasmtime,
        exit: Exit::Ok,
    };
    let commitment = receipt.commitment();
    let signed = receipt.sign(&identity);
    black_box((terms, transition, commitment, &signed));
}

/// Runs the work once, then idles.
extern "C" fn main() -> ! {
    work();
    loop {
        core::hint::spin_loop();
    }
}

/// Cortex-M reset vector: the hardware has already loaded the stack pointer from word 0.
#[cfg(target_arch = "arm")]
#[unsafe(link_section = ".vector_table.reset_vector")]
#[used]
static RESET_VECTOR: extern "C" fn() -> ! = reset;

/// The reset handler named by `ENTRY(reset)` in `cortex-m.x`.
#[cfg(target_arch = "arm")]
#[unsafe(no_mangle)]
extern "C" fn reset() -> ! {
    main()
}

// RISC-V starts with no stack: set `sp` from the linker script, then enter Rust.
#[cfg(target_arch = "riscv32")]
core::arch::global_asm!(
    ".section .text.start, \"ax\"",
    ".global _start",
    "_start:",
    "  la sp, _stack_top",
    "  call {main}",
    "1:",
    "  j 1b",
    main = sym main,
);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {
        core::hint::spin_loop();
    }
}
