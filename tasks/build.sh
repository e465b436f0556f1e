#!/usr/bin/env bash
# Rebuilds the WASM task modules and records their hashes.
#
#   tasks/build.sh          build digits.wasm and wasi-upper.wasm into tasks/modules/ and
#                           rewrite tasks/modules/SOURCES.sha3
#   tasks/build.sh --check  build both from a copy of the sources in a temporary directory and
#                           fail unless the bytes equal the committed ones (what CI runs)
#
# Toolchain: Debian's rustc-web (see shared TOOLCHAINS.md), because rustup's toolchain here has
# no wasm32 target. Override with RUSTC_WASM=/path/to/rustc and CARGO_WASM=/path/to/cargo.
# The build is reproducible: one codegen unit, no debug info, and the checkout path remapped
# to /ambient so it does not leak into the module. The same sources and the same rustc give
# the same bytes; another rustc version may not, which SOURCES.sha3 records.
set -euo pipefail

TASKS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$TASKS")"
RUSTC_WASM="${RUSTC_WASM:-/usr/bin/rustc}"
CARGO_WASM="${CARGO_WASM:-/usr/bin/cargo}"
TARGET=wasm32-unknown-unknown

# name of the committed module : crate directory under tasks/ : file cargo writes : features
# digits uses 128-bit SIMD (integer SIMD is deterministic: same output and fuel everywhere);
# wasi-upper stays WebAssembly 1.0.
MODULES=("digits:digits-wasm:digits_wasm:+simd128" "wasi-upper:wasi-upper:wasi_upper:")

usage() {
    echo "usage: tasks/build.sh [--check]" >&2
    exit 2
}

mode=build
case "${1-}" in
    "") ;;
    --check) mode=check ;;
    *) usage ;;
esac
[[ $# -le 1 ]] || usage

for tool in "$RUSTC_WASM" "$CARGO_WASM" python3; do
    command -v "$tool" >/dev/null || {
        echo "build.sh: $tool not found; see TOOLCHAINS.md for the wasm toolchain setup" >&2
        exit 1
    }
done

# build_modules SRC_ROOT TARGET_DIR OUT_DIR [cargo flags...]
# Builds every module from SRC_ROOT/tasks and copies the .wasm files into OUT_DIR.
build_modules() {
    local src_root="$1" target_dir="$2" out_dir="$3"
    shift 3
    # mvp: WebAssembly 1.0 plus the module's listed features, nothing the host CPU has.
    # stack-size: 64 KiB instead of 1 MiB; both modules use a few KiB, and a smaller
    # initial memory means a cheaper instance per task.
    local base="--remap-path-prefix=$src_root=/ambient -Ctarget-cpu=mvp -Clink-arg=-zstack-size=65536"
    local entry name crate artifact features rustflags
    mkdir -p "$out_dir"
    for entry in "${MODULES[@]}"; do
        IFS=: read -r name crate artifact features <<<"$entry"
        rustflags="$base${features:+ -Ctarget-feature=$features}"
        echo "build.sh: building $name.wasm" >&2
        (
            cd "$src_root/tasks/$crate"
            RUSTC_BOOTSTRAP=1 RUSTC="$RUSTC_WASM" CARGO_TARGET_DIR="$target_dir" RUSTFLAGS="$rustflags" \
                "$CARGO_WASM" build --quiet --release "$@" \
                -Zbuild-std=core,panic_abort --target "$TARGET"
        )
        install -m 0644 "$target_dir/$TARGET/release/$artifact.wasm" "$out_dir/$name.wasm"
    done
}

# write_hashes TASKS_DIR MODULES_DIR: writes MODULES_DIR/SOURCES.sha3. The sources hash is
# mirrored by tasks/digits-model/tests/committed_modules.rs; change both together.
write_hashes() {
    python3 - "$1" "$2" "$("$RUSTC_WASM" --version)" <<'PY'
import hashlib
import pathlib
import sys

tasks, modules, rustc = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]

# Files and directories (every file below, recursively, except names starting with '.'),
# relative to tasks/.
SOURCES = {
    "digits.wasm": [
        "digits-wasm/Cargo.toml", "digits-wasm/Cargo.lock", "digits-wasm/src",
        "digits-model/Cargo.toml", "digits-model/src", "digits-model/data",
    ],
    "wasi-upper.wasm": ["wasi-upper/Cargo.toml", "wasi-upper/Cargo.lock", "wasi-upper/src"],
}


def files(entry):
    path = tasks / entry
    if path.is_file():
        return [entry]
    if not path.is_dir():
        sys.exit(f"build.sh: {entry} is missing under {tasks}")
    found = []
    for child in path.rglob("*"):
        rel = child.relative_to(tasks)
        if child.is_file() and not any(part.startswith(".") for part in rel.parts):
            found.append(rel.as_posix())
    return found


def sources_hash(entries):
    # For each file in byte order of its path relative to tasks/:
    # path (UTF-8), one 0x00 byte, content length as u64 big-endian, content.
    h = hashlib.sha3_256()
    for rel in sorted({f for entry in entries for f in files(entry)}, key=lambda p: p.encode()):
        data = (tasks / rel).read_bytes()
        h.update(rel.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


lines = [
    "# Written by tasks/build.sh: do not edit. Checked by tasks/build.sh --check and by",
    "# tasks/digits-model/tests/committed_modules.rs.",
    "# Columns: module, sha3-256 of the .wasm, sha3-256 of the sources it is built from.",
    f"# Built with {rustc}.",
]
for module, entries in SOURCES.items():
    wasm = hashlib.sha3_256((modules / module).read_bytes()).hexdigest()
    lines.append(f"{module} {wasm} {sources_hash(entries)}")
(modules / "SOURCES.sha3").write_text("\n".join(lines) + "\n")
PY
}

if [[ $mode == build ]]; then
    build_modules "$ROOT" "$ROOT/target/wasm-tasks" "$TASKS/modules"
    write_hashes "$TASKS" "$TASKS/modules"
    for entry in "${MODULES[@]}"; do
        IFS=: read -r name _ _ _ <<<"$entry"
        echo "build.sh: tasks/modules/$name.wasm $(wc -c <"$TASKS/modules/$name.wasm") bytes" >&2
    done
    exit 0
fi

# --check: a copy in a fresh directory, a fresh target dir and --locked, so neither the
# checkout path, a stale build cache nor an out-of-date Cargo.lock can hide a difference.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/src/tasks"
# The crates inherit package fields from the root workspace manifest.
cp "$ROOT/Cargo.toml" "$scratch/src/"
tar -C "$TASKS" --exclude=target -cf - digits-model digits-wasm wasi-upper | tar -C "$scratch/src/tasks" -xf -
build_modules "$scratch/src" "$scratch/target" "$scratch/modules" --locked
write_hashes "$scratch/src/tasks" "$scratch/modules"

stale=0
for file in digits.wasm wasi-upper.wasm SOURCES.sha3; do
    if ! cmp -s "$scratch/modules/$file" "$TASKS/modules/$file"; then
        echo "build.sh --check: tasks/modules/$file differs from a fresh build of the committed sources" >&2
        stale=1
    fi
done
if [[ $stale -ne 0 ]]; then
    diff -u "$TASKS/modules/SOURCES.sha3" "$scratch/modules/SOURCES.sha3" >&2 || true
    echo "build.sh --check: run tasks/build.sh and commit tasks/modules/ (and any Cargo.lock it updated)" >&2
    exit 1
fi
echo "build.sh --check: tasks/modules/ matches a fresh build of the sources" >&2
