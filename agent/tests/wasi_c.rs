//! Unmodified C programs from `tasks/c/`, built with clang and Debian's wasi-libc, run in the
//! sandbox and print exactly what the same programs built natively print.
//!
//! Needs `clang`, `lld`, `wasi-libc` and `libclang-rt-dev-wasm32` (Debian's packages; `.ci/run`
//! installs them) and a native C compiler (`cc`). Without them the tests fail and say so.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ambient_agent::engine::{Call, Execution, Sandbox, SandboxConfig, Wasmtime};
use ambient_core::{Abi, Exit, Limits, sha3_256};

fn source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tasks/c")
        .join(format!("{name}.c"))
}

fn compile(compiler: &str, args: &[&str], name: &str, out: &Path) {
    let status = Command::new(compiler)
        .args(args)
        .arg(source(name))
        .arg("-o")
        .arg(out)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {compiler} ({e}): install clang lld wasi-libc libclang-rt-dev-wasm32 (Debian) and a C compiler"
            )
        });
    assert!(
        status.success(),
        "{compiler} failed on {name}.c: is wasi-libc installed (apt-get install wasi-libc libclang-rt-dev-wasm32)?"
    );
}

/// Builds `name.c` both ways and returns the WASM bytes and the native binary.
fn build(dir: &Path, name: &str) -> (Vec<u8>, PathBuf) {
    let wasm = dir.join(format!("{name}.wasm"));
    compile("clang", &["--target=wasm32-wasi", "-O2"], name, &wasm);
    let native = dir.join(name);
    compile("cc", &["-O2"], name, &native);
    (std::fs::read(&wasm).unwrap(), native)
}

fn run_native(binary: &Path, input: &[u8]) -> (Vec<u8>, Option<i32>) {
    let mut child = Command::new(binary)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.stdout, out.status.code())
}

fn run_sandboxed(bytes: &[u8], input: &[u8]) -> Execution {
    let sandbox = Wasmtime::new(SandboxConfig::default()).expect("engine");
    let module = sandbox
        .prepare(sha3_256(bytes), bytes)
        .unwrap_or_else(|e| panic!("the sandbox refused the module: {e}"));
    let limits = Limits {
        fuel: 10_000_000_000,
        ..Limits::default()
    };
    sandbox.execute(&module, &Call::new(Abi::Wasi, "_start", input, limits, 7))
}

/// Runs `name` on each input both ways and checks that the outputs are the same.
fn same_output(name: &str, inputs: &[&[u8]]) -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let (wasm, native) = build(dir.path(), name);
    inputs
        .iter()
        .map(|input| {
            let (expected, status) = run_native(&native, input);
            assert_eq!(status, Some(0), "{name} natively");
            let run = run_sandboxed(&wasm, input);
            assert_eq!(run.exit, Exit::Ok, "{name}: {}", run.message);
            assert_eq!(
                String::from_utf8_lossy(&run.output),
                String::from_utf8_lossy(&expected),
                "{name}: sandboxed output differs from native"
            );
            run.output
        })
        .collect()
}

#[test]
fn sha256sum_matches_the_native_build_and_the_fips_test_vectors() {
    let long: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let out = same_output("sha256sum", &[b"abc", b"", &long]);
    assert_eq!(
        out[0],
        b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  -\n"
    );
    assert_eq!(
        out[1],
        b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  -\n"
    );
}

#[test]
fn word_count_base64_and_sort_match_the_native_builds() {
    same_output("wc", &[b"", b"one\ntwo words\n\tthree  spaced   words\n"]);
    let bytes: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    same_output("base64", &[b"", b"f", b"fo", b"foo", &bytes]);
    same_output("sort", &[b"5 3 -8 13 0 21 1 1 2", b""]);
}

#[test]
fn a_program_that_links_fopen_runs_and_its_fopen_fails_as_natively() {
    let out = same_output("upper", &[b"hello, wasi\n"]);
    assert_eq!(out[0], b"settings: none\nHELLO, WASI\n");
}

#[test]
fn a_sleep_returns_at_once_under_the_frozen_clock() {
    let out = same_output("nap", &[b""]);
    assert_eq!(out[0], b"before\nafter\n");
}

#[test]
fn a_non_zero_exit_status_ends_the_run_with_the_status_and_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let (wasm, native) = build(dir.path(), "exit3");
    assert_eq!(run_native(&native, b"").1, Some(3));
    let run = run_sandboxed(&wasm, b"");
    assert_eq!(run.exit, Exit::ExitStatus(3));
    assert!(run.message.contains("status 3"), "{}", run.message);
    assert!(run.message.contains("giving up"), "{}", run.message);
}
