//! Measures the agent's resident memory around compiling large modules: idle, right after
//! each compile, and with the compiled modules still cached.
//!
//! ```sh
//! cargo run --release -p ambient-agent --example compile_rss
//! ```
//!
//! Linux only (reads `/proc/self/status`). The modules are generated: 6,000 functions of 160
//! instructions each, about 1.9 MB, different bytes each time so nothing is cached.

use ambient_agent::engine::{Sandbox, SandboxConfig, Wasmtime};
use ambient_core::sha3_256;

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    kib / 1024.0
}

fn module(functions: usize, seed: usize) -> Vec<u8> {
    let mut text = String::from(r#"(module (memory (export "memory") 1)"#);
    for f in 0..functions {
        text.push_str("(func (param i32) (result i32) (local.get 0)");
        for k in 0..40 {
            text.push_str(&format!(
                " (i32.const {}) (i32.mul) (i32.const {}) (i32.add)",
                k + f + seed,
                k * 3 + 1
            ));
        }
        text.push(')');
    }
    text.push_str(r#"(func (export "_start")))"#);
    wat::parse_str(&text).expect("generated WAT is valid")
}

fn main() {
    let sandbox = Wasmtime::new(SandboxConfig {
        max_cached_modules: 2,
        ..SandboxConfig::default()
    })
    .expect("engine");
    println!("idle: {:.1} MiB", rss_mib());
    for seed in 0..4 {
        let bytes = module(6_000, seed);
        let started = std::time::Instant::now();
        sandbox
            .prepare(sha3_256(&bytes), &bytes)
            .expect("the module compiles");
        println!(
            "after compiling module {} ({} bytes, {:.0} ms; at most 2 kept compiled): {:.1} MiB",
            seed + 1,
            bytes.len(),
            started.elapsed().as_secs_f64() * 1e3,
            rss_mib()
        );
    }
}
