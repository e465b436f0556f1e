//! Links with the minimal linker script of the target's architecture.

use std::env;
use std::path::PathBuf;

fn main() {
    let target = env::var("TARGET").unwrap_or_default();
    let script = if target.starts_with("thumb") {
        "cortex-m.x"
    } else if target.starts_with("riscv32") {
        "riscv32.x"
    } else {
        panic!(
            "ambient-nostd-check is built for thumbv7em-none-eabihf or riscv32imac-unknown-none-elf, not {target}"
        );
    };
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    println!("cargo:rustc-link-arg-bins=-T{}", dir.join(script).display());
    println!("cargo:rerun-if-changed={script}");
    println!("cargo:rerun-if-changed=build.rs");
}
