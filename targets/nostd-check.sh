#!/usr/bin/env bash
# Proves that ambient-core builds and links without std (and without alloc) for microcontrollers,
# and prints what it costs in flash.
#
#   bash targets/nostd-check.sh
#
# 1. `cargo build -p ambient-core --no-default-features` on the host.
# 2. targets/nostd, a firmware-style binary that scores a sample, steps the breaker, commits to a
#    receipt and signs it, built per TOOLCHAINS.md with Debian's rustc-web and `-Zbuild-std=core`
#    for thumbv7em-none-eabihf (Cortex-M4F/M7) and riscv32imac-unknown-none-elf, and linked by
#    rust-lld with the minimal linker scripts in targets/nostd. If anything in the dependency tree
#    needs std or alloc, the build fails.
# 3. Prints each image's .text size and fails if the Cortex-M one exceeds its budget
#    (NOSTD_TEXT_BUDGET, bytes, default 32768).
#
# Needs the setup of targets/setup-toolchains.sh (rustc-web, rust-web-src, lld-22).
# Exits non-zero on any failure.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

budget="${NOSTD_TEXT_BUDGET:-32768}"
rustc_web="${RUSTC_WEB:-/usr/bin/rustc}"
cargo_web="${CARGO_WEB:-/usr/bin/cargo}"
targets=(thumbv7em-none-eabihf riscv32imac-unknown-none-elf)

fail() { echo "nostd-check: $*" >&2; exit 1; }

[ -x "$rustc_web" ] && [ -x "$cargo_web" ] \
  || fail "Debian's rustc-web is missing at $rustc_web / $cargo_web: run targets/setup-toolchains.sh"

size_tool=""
for t in llvm-size-22 llvm-size rust-size size; do
  if command -v "$t" >/dev/null; then size_tool="$t"; break; fi
done
[ -n "$size_tool" ] || fail "no size tool found (llvm-size, rust-size or binutils' size)"

echo "==> ambient-core builds on the host without default features"
cargo build -p ambient-core --no-default-features

export CARGO_TARGET_DIR="$root/targets/nostd/target"
status=0
for target in "${targets[@]}"; do
  echo "==> targets/nostd for $target (rustc-web, -Zbuild-std=core)"
  (cd targets/nostd && RUSTC_BOOTSTRAP=1 RUSTC="$rustc_web" "$cargo_web" build --release \
    -Zbuild-std=core --target "$target") || fail "build for $target failed"

  elf="$CARGO_TARGET_DIR/$target/release/ambient-nostd-check"
  [ -f "$elf" ] || fail "no image at $elf"
  text=$("$size_tool" -A "$elf" | awk '$1 == ".text" { print $2 }')
  rodata=$("$size_tool" -A "$elf" | awk '$1 == ".rodata" { print $2 }')
  [ -n "$text" ] || fail "$size_tool printed no .text size for $elf"
  printf '%-30s .text %6d bytes (%.1f KiB), .rodata %d bytes   %s\n' \
    "$target" "$text" "$(awk -v b="$text" 'BEGIN { print b / 1024 }')" "${rodata:-0}" "$elf"
  if [[ "$target" == thumbv7em-* ]] && (( text > budget )); then
    echo "nostd-check: $target .text is $text bytes, over the budget of $budget" >&2
    status=1
  fi
done
exit "$status"
