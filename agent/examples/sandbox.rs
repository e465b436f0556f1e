//! Runs one task in the wasmtime sandbox, the way the agent does for an assignment, and shows
//! how limits end runs. Run with `cargo run -p ambient-agent --example sandbox`.

use ambient_agent::engine::{Call, Sandbox, SandboxConfig, Wasmtime};
use ambient_core::{Abi, Limits, sha3_256};

const SUM: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  ;; Sums the input bytes into one output byte (mod 256), written at address 0.
  (func (export "sum") (param $ptr i32) (param $len i32) (result i64)
    (local $i i32) (local $acc i32)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
      (local.set $acc (i32.add (local.get $acc) (i32.load8_u (i32.add (local.get $ptr) (local.get $i)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (i32.store8 (i32.const 0) (local.get $acc))
    (i64.const 1))
  (func (export "spin") (param i32 i32) (result i64) (loop $l (br $l)) (i64.const 0)))"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sandbox = Wasmtime::new(SandboxConfig::default())?;
    let bytes = wat::parse_str(SUM)?;
    let module = sandbox.prepare(sha3_256(&bytes), &bytes)?;
    let limits = Limits {
        memory_bytes: 1 << 20,
        timeout_ms: 500,
        fuel: 1_000_000,
    };

    let run = sandbox.execute(
        &module,
        &Call::new(Abi::Plain, "sum", &[1, 2, 3, 4], limits, 0),
    );
    println!(
        "sum:  exit {:?}, output {:?}, fuel {}",
        run.exit, run.output, run.fuel_used
    );

    let run = sandbox.execute(&module, &Call::new(Abi::Plain, "spin", b"", limits, 0));
    println!(
        "spin: exit {:?} after {} fuel: {}",
        run.exit, run.fuel_used, run.message
    );

    let unbounded = Limits {
        fuel: u64::MAX,
        ..limits
    };
    let run = sandbox.execute(&module, &Call::new(Abi::Plain, "spin", b"", unbounded, 0));
    println!(
        "spin with unlimited fuel: exit {:?}: {}",
        run.exit, run.message
    );
    Ok(())
}
