//! The wasmtime sandbox against real WASM: every way a run can end, and determinism.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ambient_agent::engine::{
    Call, ExecError, FUEL_SAVE_EVERY, Prepared, Sandbox, SandboxConfig, Wasmtime,
};
use ambient_core::{Abi, Exit, Limits, ModuleError, sha3_256};

fn sandbox() -> Wasmtime {
    Wasmtime::new(SandboxConfig {
        max_memory_bytes: 64 << 20,
        ..SandboxConfig::default()
    })
    .expect("engine")
}

fn prepare(sandbox: &Wasmtime, wat: &str) -> Result<Arc<Prepared>, ExecError> {
    let bytes = wat::parse_str(wat).expect("valid WAT");
    sandbox.prepare(sha3_256(&bytes), &bytes)
}

fn limits() -> Limits {
    Limits {
        memory_bytes: 16 << 20,
        timeout_ms: 10_000,
        fuel: 10_000_000,
    }
}

use ambient_testkit::wat::REVERSE;

fn plain_module(body: &str) -> String {
    format!(
        r#"(module
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "run") (param i32 i32) (result i64) {body}))"#
    )
}

#[test]
fn a_plain_module_gets_its_input_and_returns_its_output() {
    let s = sandbox();
    let m = prepare(&s, REVERSE).unwrap();
    let run = s.execute(&m, &Call::new(Abi::Plain, "reverse", b"hello", limits(), 0));
    assert_eq!(run.exit, Exit::Ok, "{}", run.message);
    assert_eq!(run.output, b"olleh");
    assert!(run.fuel_used > 0 && run.fuel_used < limits().fuel);
    assert!(run.message.is_empty());
}

#[test]
fn the_same_module_and_input_give_the_same_output_and_fuel_twice_and_on_two_engines() {
    let a = sandbox();
    let b = sandbox();
    let input = b"determinism is what makes replication work";
    let runs: Vec<_> = [&a, &a, &b]
        .iter()
        .map(|s| {
            let m = prepare(s, REVERSE).unwrap();
            s.execute(&m, &Call::new(Abi::Plain, "reverse", input, limits(), 0))
        })
        .collect();
    assert_eq!(runs[0].exit, Exit::Ok);
    assert_eq!(runs[0], runs[1]);
    assert_eq!(runs[0], runs[2]);
}

#[test]
fn an_infinite_loop_runs_out_of_fuel() {
    let s = sandbox();
    let m = prepare(&s, &plain_module("(loop $l (br $l)) (i64.const 0)")).unwrap();
    let run = s.execute(&m, &Call::new(Abi::Plain, "run", b"", limits(), 0));
    assert_eq!(run.exit, Exit::OutOfFuel, "{}", run.message);
    assert_eq!(run.fuel_used, limits().fuel);
    assert!(run.output.is_empty());
}

#[test]
fn an_infinite_loop_with_huge_fuel_is_stopped_by_the_wall_clock_and_reports_the_fuel_it_burnt() {
    let s = sandbox();
    let m = prepare(&s, &plain_module("(loop $l (br $l)) (i64.const 0)")).unwrap();
    let limits = Limits {
        timeout_ms: 200,
        fuel: u64::MAX,
        ..limits()
    };
    let run = s.execute(&m, &Call::new(Abi::Plain, "run", b"", limits, 0));
    assert_eq!(run.exit, Exit::TimedOut, "{}", run.message);
    // It reports the fuel it burnt: 200 ms of a loop is hundreds of millions on any machine
    // this runs on, where the count kept in a register alone would have said 2.
    assert!(run.fuel_used > 10 * FUEL_SAVE_EVERY, "{}", run.fuel_used);
}

/// Counts `n` down to 0, then `tail`.
fn countdown(n: u32, tail: &str) -> String {
    plain_module(&format!(
        "(local $i i32) (local.set $i (i32.const {n}))
         (loop $l
           (local.set $i (i32.sub (local.get $i) (i32.const 1)))
           (br_if $l (local.get $i)))
         {tail}"
    ))
}

#[test]
fn a_run_that_traps_reports_the_fuel_burnt_up_to_the_trap_the_same_on_every_engine() {
    // The same loop, then a result, or a load 16 bytes below address 0 (an address computed
    // at run time, so the trap is the memory's, not one the compiler can see coming).
    let (a, b) = (sandbox(), sandbox());
    let ok = prepare(&a, &countdown(1_000_000, "(i64.const 0)")).unwrap();
    let ok = a.execute(&ok, &Call::new(Abi::Plain, "run", b"", limits(), 0));
    assert_eq!(ok.exit, Exit::Ok, "{}", ok.message);
    let trap = countdown(
        1_000_000,
        "(i64.load (i32.sub (local.get $i) (i32.const 16)))",
    );
    let runs: Vec<_> = [&a, &b]
        .iter()
        .map(|s| {
            let m = prepare(s, &trap).unwrap();
            s.execute(&m, &Call::new(Abi::Plain, "run", b"", limits(), 0))
        })
        .collect();
    assert_eq!(runs[0].exit, Exit::Trapped, "{}", runs[0].message);
    assert!(
        runs[0].fuel_used + FUEL_SAVE_EVERY > ok.fuel_used,
        "{} burnt before the trap, {} by the whole loop",
        runs[0].fuel_used,
        ok.fuel_used
    );
    assert!(runs[0].fuel_used <= ok.fuel_used + 8);
    assert_eq!(runs[0], runs[1]);
}

#[test]
fn a_memory_bomb_runs_out_of_memory() {
    let s = sandbox();
    let body = "(loop $l (drop (memory.grow (i32.const 16))) (br $l)) (i64.const 0)";
    let m = prepare(&s, &plain_module(body)).unwrap();
    let run = s.execute(&m, &Call::new(Abi::Plain, "run", b"", limits(), 0));
    assert_eq!(run.exit, Exit::OutOfMemory, "{}", run.message);
    assert!(run.message.contains("limit"), "{}", run.message);
}

#[test]
fn a_module_whose_initial_memory_is_over_the_limit_runs_out_of_memory() {
    let s = sandbox();
    // 512 pages = 32 MiB, over the 16 MiB limit.
    let wat = plain_module("(i64.const 0)").replace(
        "(memory (export \"memory\") 1)",
        "(memory (export \"memory\") 512)",
    );
    let m = prepare(&s, &wat).unwrap();
    let run = s.execute(&m, &Call::new(Abi::Plain, "run", b"", limits(), 0));
    assert_eq!(run.exit, Exit::OutOfMemory, "{}", run.message);
}

#[test]
fn unreachable_traps_with_the_trap_message() {
    let s = sandbox();
    let m = prepare(&s, &plain_module("unreachable")).unwrap();
    let run = s.execute(&m, &Call::new(Abi::Plain, "run", b"", limits(), 0));
    assert_eq!(run.exit, Exit::Trapped);
    assert!(run.message.contains("unreachable"), "{}", run.message);
}

#[test]
fn an_output_range_outside_memory_traps() {
    let s = sandbox();
    let m = prepare(&s, &plain_module("(i64.const 0x0000fff000001000)")).unwrap();
    let run = s.execute(&m, &Call::new(Abi::Plain, "run", b"", limits(), 0));
    assert_eq!(run.exit, Exit::Trapped);
    assert!(run.message.contains("outside memory"), "{}", run.message);
}

#[test]
fn a_forbidden_import_is_rejected_with_a_message_naming_it() {
    let s = sandbox();
    let wat = r#"(module (import "env" "socket" (func (param i32) (result i32))) (memory (export "memory") 1))"#;
    let err = prepare(&s, wat).unwrap_err();
    assert!(matches!(
        err,
        ExecError::Module(ModuleError::ForbiddenImport { .. })
    ));
    assert_eq!(
        err.to_string(),
        "module imports env.socket, which the sandbox does not offer (it links wasi_snapshot_preview1 functions only)"
    );
}

/// Appends `v` in LEB128.
fn leb(mut v: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A module of about `mb` MiB: one function of `i32.const 1; drop` pairs that imports
/// `env.x`. Built as bytes, since the text would be ten times larger.
fn big_module_importing_env(mb: usize) -> Vec<u8> {
    let mut body = vec![0u8]; // no locals
    for _ in 0..(mb << 20) / 3 {
        body.extend_from_slice(&[0x41, 0x01, 0x1a]);
    }
    body.push(0x0b);
    let section = |id: u8, content: &[u8], out: &mut Vec<u8>| {
        out.push(id);
        leb(content.len(), out);
        out.extend_from_slice(content);
    };
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    section(1, &[1, 0x60, 0, 0], &mut m); // type 0: () -> ()
    section(2, &[1, 3, b'e', b'n', b'v', 1, b'x', 0, 0], &mut m); // env.x: func type 0
    section(3, &[1, 0], &mut m); // one function of type 0
    let mut code = vec![1];
    leb(body.len(), &mut code);
    code.extend_from_slice(&body);
    section(10, &code, &mut m);
    m
}

#[test]
fn a_large_module_with_a_forbidden_import_is_refused_before_any_compile_and_remembered() {
    // No compile can finish in zero time: a refusal naming the import proves it came first.
    let s = Wasmtime::new(SandboxConfig {
        compile_timeout: Duration::ZERO,
        ..SandboxConfig::default()
    })
    .unwrap();
    let bytes = big_module_importing_env(4);
    assert!(bytes.len() > 4_000_000);
    let hash = sha3_256(&bytes);
    for _ in 0..2 {
        let err = s.prepare(hash, &bytes).unwrap_err();
        assert!(err.to_string().contains("env.x"), "{err}");
    }
}

#[test]
fn an_import_outside_wasi_preview_1_is_rejected_and_one_inside_it_is_linked() {
    let s = sandbox();
    // WasmEdge's socket extension, not part of preview 1.
    let wat = r#"(module (import "wasi_snapshot_preview1" "sock_open" (func (param i32 i32 i32) (result i32))))"#;
    let err = prepare(&s, wat).unwrap_err();
    assert!(
        err.to_string().contains("wasi_snapshot_preview1.sock_open"),
        "{err}"
    );
    let wat = r#"(module
      (import "wasi_snapshot_preview1" "path_open" (func (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "_start")))"#;
    let m = prepare(&s, wat).unwrap();
    let run = s.execute(&m, &Call::new(Abi::Wasi, "_start", b"", limits(), 0));
    assert_eq!(run.exit, Exit::Ok, "{}", run.message);
}

#[test]
fn a_plain_call_of_a_module_with_imports_is_rejected() {
    let s = sandbox();
    let wat = r#"(module
      (import "wasi_snapshot_preview1" "sched_yield" (func (result i32)))
      (memory (export "memory") 1)
      (func (export "alloc") (param i32) (result i32) (i32.const 0))
      (func (export "run") (param i32 i32) (result i64) (i64.const 0)))"#;
    let m = prepare(&s, wat).unwrap();
    let run = s.execute(&m, &Call::new(Abi::Plain, "run", b"", limits(), 0));
    assert_eq!(run.exit, Exit::Rejected);
    assert!(run.message.contains("sched_yield"), "{}", run.message);
    assert_eq!(run.fuel_used, 0);
}

#[test]
fn a_missing_entry_or_a_wrong_signature_is_rejected() {
    let s = sandbox();
    let m = prepare(&s, REVERSE).unwrap();
    let run = s.execute(&m, &Call::new(Abi::Plain, "nope", b"", limits(), 0));
    assert_eq!(run.exit, Exit::Rejected);
    assert!(run.message.contains("`nope`"), "{}", run.message);
    let run = s.execute(&m, &Call::new(Abi::Plain, "alloc", b"", limits(), 0));
    assert_eq!(run.exit, Exit::Rejected);
    assert!(
        run.message.contains("expected (i32, i32) -> (i64)"),
        "{}",
        run.message
    );
}

#[test]
fn bytes_that_are_not_wasm_are_rejected() {
    let s = sandbox();
    let bytes = b"definitely not a module";
    let err = s.prepare(sha3_256(bytes), bytes).unwrap_err();
    assert!(
        matches!(err, ExecError::Module(ModuleError::NotWasm { text: false })),
        "{err}"
    );
}

#[test]
fn bytes_that_do_not_match_their_hash_are_refused() {
    let s = sandbox();
    let bytes = wat::parse_str(REVERSE).unwrap();
    let err = s.prepare(sha3_256(b"something else"), &bytes).unwrap_err();
    assert!(matches!(err, ExecError::HashMismatch { .. }), "{err}");
}

#[test]
fn an_oversize_module_is_rejected() {
    let s = Wasmtime::new(SandboxConfig {
        max_module_bytes: 100,
        ..SandboxConfig::default()
    })
    .unwrap();
    let bytes = wat::parse_str(REVERSE).unwrap();
    assert!(bytes.len() > 100);
    let err = s.prepare(sha3_256(&bytes), &bytes).unwrap_err();
    assert!(matches!(err, ExecError::TooLarge { max: 100, .. }), "{err}");
}

#[test]
fn a_task_asking_for_more_memory_than_the_node_allows_is_rejected() {
    let s = sandbox();
    let m = prepare(&s, REVERSE).unwrap();
    let limits = Limits {
        memory_bytes: 1 << 40,
        ..limits()
    };
    let run = s.execute(&m, &Call::new(Abi::Plain, "reverse", b"x", limits, 0));
    assert_eq!(run.exit, Exit::Rejected);
}

#[test]
fn a_compile_that_takes_too_long_is_rejected() {
    let s = Wasmtime::new(SandboxConfig {
        compile_timeout: Duration::ZERO,
        ..SandboxConfig::default()
    })
    .unwrap();
    let bytes = wat::parse_str(REVERSE).unwrap();
    let err = s.prepare(sha3_256(&bytes), &bytes).unwrap_err();
    assert!(matches!(err, ExecError::CompileTimeout { .. }), "{err}");
}

/// A WASI command that copies stdin to stdout, then appends 8 random bytes and the clock.
const WASI_ECHO: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  ;; iovec at 0: buf 1024, len 4096; nread/nwritten at 16
  (func (export "_start")
    (local $n i32)
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 4096))
    (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)) (then (call $exit (i32.const 3))))
    (local.set $n (i32.load (i32.const 16)))
    ;; 8 random bytes after the input, then the 8-byte clock
    (drop (call $random_get (i32.add (i32.const 1024) (local.get $n)) (i32.const 8)))
    (drop (call $clock (i32.const 0) (i64.const 1) (i32.add (i32.const 1032) (local.get $n))))
    (i32.store (i32.const 4) (i32.add (local.get $n) (i32.const 16)))
    (if (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)) (then (call $exit (i32.const 4))))))
"#;

#[test]
fn a_wasi_module_reads_stdin_writes_stdout_and_sees_a_fixed_clock_and_seeded_random() {
    let s = sandbox();
    let m = prepare(&s, WASI_ECHO).unwrap();
    let run = |seed| {
        s.execute(
            &m,
            &Call::new(Abi::Wasi, "ignored", b"ping", limits(), seed),
        )
    };
    let a = run(42);
    assert_eq!(a.exit, Exit::Ok, "{}", a.message);
    assert_eq!(a.output.len(), 4 + 8 + 8);
    assert_eq!(&a.output[..4], b"ping");
    assert_eq!(&a.output[12..], &[0u8; 8], "the clock reads 0");
    assert_eq!(run(42), a, "same seed, same bytes, same fuel");
    assert_ne!(
        run(43).output[4..12],
        a.output[4..12],
        "another seed, other random bytes"
    );
}

#[test]
fn a_wasi_exit_with_a_non_zero_status_ends_with_that_status_and_carries_stderr() {
    let s = sandbox();
    let wat = r#"(module
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (data (i32.const 100) "bad input")
      (func (export "_start")
        (i32.store (i32.const 0) (i32.const 100))
        (i32.store (i32.const 4) (i32.const 9))
        (drop (call $w (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
        (call $exit (i32.const 7))))"#;
    let m = prepare(&s, wat).unwrap();
    let run = s.execute(&m, &Call::new(Abi::Wasi, "", b"", limits(), 0));
    assert_eq!(run.exit, Exit::ExitStatus(7));
    assert_eq!(run.message, "exited with status 7; stderr: bad input");
    assert!(run.output.is_empty());
}

#[test]
fn a_wasi_exit_with_status_zero_is_success() {
    let s = sandbox();
    let wat = r#"(module
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") 1)
      (func (export "_start") (call $exit (i32.const 0)) unreachable))"#;
    let m = prepare(&s, wat).unwrap();
    let run = s.execute(&m, &Call::new(Abi::Wasi, "", b"", limits(), 0));
    assert_eq!(run.exit, Exit::Ok, "{}", run.message);
}

#[test]
fn a_module_is_reloaded_from_the_disk_cache_by_a_new_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let config = SandboxConfig {
        cache_dir: Some(dir.path().join("modules")),
        ..SandboxConfig::default()
    };
    let bytes = wat::parse_str(REVERSE).unwrap();
    let hash = sha3_256(&bytes);
    let first = Wasmtime::new(config.clone()).unwrap();
    assert!(first.load(&hash).unwrap().is_none());
    first.prepare(hash, &bytes).unwrap();
    assert!(dir.path().join(format!("modules/{hash}.cwasm")).exists());

    let second = Wasmtime::new(config).unwrap();
    assert!(second.cached(&hash).is_none());
    let m = second.load(&hash).unwrap().expect("found on disk");
    let run = second.execute(&m, &Call::new(Abi::Plain, "reverse", b"abc", limits(), 0));
    assert_eq!(run.output, b"cba");
}

#[test]
fn a_damaged_compiled_module_on_disk_is_recompiled_from_the_raw_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let config = SandboxConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..SandboxConfig::default()
    };
    let bytes = wat::parse_str(REVERSE).unwrap();
    let hash = sha3_256(&bytes);
    Wasmtime::new(config.clone())
        .unwrap()
        .prepare(hash, &bytes)
        .unwrap();
    let cwasm = dir.path().join(format!("{hash}.cwasm"));
    let mut damaged = std::fs::read(&cwasm).unwrap();
    let last = damaged.len() - 1;
    damaged[last] ^= 0xff;
    std::fs::write(&cwasm, damaged).unwrap();

    let s = Wasmtime::new(config).unwrap();
    let m = s.load(&hash).unwrap().expect("recompiled");
    assert_eq!(
        s.execute(&m, &Call::new(Abi::Plain, "reverse", b"xy", limits(), 0))
            .output,
        b"yx"
    );
}

#[test]
fn a_damaged_raw_module_on_disk_counts_as_missing() {
    let dir = tempfile::tempdir().unwrap();
    let config = SandboxConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..SandboxConfig::default()
    };
    let bytes = wat::parse_str(REVERSE).unwrap();
    let hash = sha3_256(&bytes);
    std::fs::write(dir.path().join(format!("{hash}.wasm")), b"tampered").unwrap();
    assert!(
        Wasmtime::new(config)
            .unwrap()
            .load(&hash)
            .unwrap()
            .is_none()
    );
}

#[test]
fn many_runs_at_once_share_one_prepared_module() {
    let s = Arc::new(sandbox());
    let m = prepare(&s, REVERSE).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let (s, m) = (s.clone(), m.clone());
            std::thread::spawn(move || {
                let input = format!("task {i}");
                let run = s.execute(
                    &m,
                    &Call::new(Abi::Plain, "reverse", input.as_bytes(), limits(), 0),
                );
                assert_eq!(run.output, input.bytes().rev().collect::<Vec<_>>());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn committed_module(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tasks/modules")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{} is committed: {e}", path.display()))
}

#[test]
fn the_digits_module_classifies_every_image_like_the_native_model_with_the_same_fuel_twice() {
    let bytes = committed_module("digits.wasm");
    let s = sandbox();
    let m = s.prepare(sha3_256(&bytes), &bytes).unwrap();
    // Every held-out image, then 200 of arbitrary bytes (pixels over 16 are clamped), so the
    // module's SIMD kernel is checked against the scalar native one on both.
    let mut images: Vec<u8> = ambient_digits::heldout()
        .flat_map(|(img, _)| img.iter().copied())
        .collect();
    images.extend((0..200 * 64u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    let mut native = vec![0u8; images.len() / 64];
    ambient_digits::classify_batch(&images, &mut native).unwrap();
    let limits = Limits {
        fuel: 1_000_000_000,
        ..limits()
    };
    let run = s.execute(&m, &Call::new(Abi::Plain, "classify", &images, limits, 0));
    assert_eq!(run.exit, Exit::Ok, "{}", run.message);
    assert_eq!(run.output, native);
    let again = s.execute(&m, &Call::new(Abi::Plain, "classify", &images, limits, 0));
    assert_eq!(again.fuel_used, run.fuel_used);
}

#[test]
fn the_committed_wasi_module_upper_cases_stdin() {
    let bytes = committed_module("wasi-upper.wasm");
    let s = sandbox();
    let m = s.prepare(sha3_256(&bytes), &bytes).unwrap();
    let run = s.execute(
        &m,
        &Call::new(Abi::Wasi, "_start", b"hello, edge", limits(), 0),
    );
    assert_eq!(run.exit, Exit::Ok, "{}", run.message);
    assert_eq!(run.output, b"HELLO, EDGE");
}

#[test]
fn the_compiled_module_cache_keeps_the_newest_within_its_byte_bound() {
    let s = Wasmtime::new(SandboxConfig {
        max_cached_bytes: 1,
        ..SandboxConfig::default()
    })
    .unwrap();
    let first = wat::parse_str(REVERSE).unwrap();
    let second = wat::parse_str(plain_module("(i64.const 0)")).unwrap();
    s.prepare(sha3_256(&first), &first).unwrap();
    s.prepare(sha3_256(&second), &second).unwrap();
    assert!(
        s.cached(&sha3_256(&first)).is_none(),
        "over the bound: dropped"
    );
    assert!(
        s.cached(&sha3_256(&second)).is_some(),
        "the newest stays whatever its size"
    );
}

#[test]
fn the_module_cache_directory_drops_the_oldest_modules_past_its_byte_bound() {
    let dir = tempfile::tempdir().unwrap();
    let s = Wasmtime::new(SandboxConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        max_cache_dir_bytes: 1,
        ..SandboxConfig::default()
    })
    .unwrap();
    let modules: Vec<Vec<u8>> = ["(i64.const 0)", "(i64.const 1)", "(i64.const 2)"]
        .iter()
        .map(|body| wat::parse_str(plain_module(body)).unwrap())
        .collect();
    for m in &modules {
        s.prepare(sha3_256(m), m).unwrap();
    }
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    let last = sha3_256(&modules[2]).to_hex();
    assert_eq!(files, [format!("{last}.cwasm"), format!("{last}.wasm")]);
}
