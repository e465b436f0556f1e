#!/usr/bin/env bash
# Cross-builds a workspace binary for Raspberry Pi 4/5 and Jetson (aarch64-unknown-linux-gnu) with
# Debian's rustc-web, as TOOLCHAINS.md describes, and prints the path of what it built.
#
#   bash targets/cross-aarch64.sh                                  # ambient-agent, release
#   bash targets/cross-aarch64.sh ambient-cli                      # `ambient`
#   bash targets/cross-aarch64.sh ambient-core --example receipt   # extra args go to cargo build
#   RUN=1 bash targets/cross-aarch64.sh ambient-core --example receipt   # and run it under qemu
#
# Environment: CARGO_TARGET_DIR (default target/cross, so rustup's and Debian's compilers never
# share artifacts), PROFILE (default release), RUN=1 to run the binary under qemu-aarch64.
# Needs targets/setup-toolchains.sh. The binary links against glibc 2.36 (Debian 12); for older
# device OSes see targets/README.md (cargo-zigbuild with a pinned glibc).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

target=aarch64-unknown-linux-gnu
package="${1:-ambient-agent}"
shift || true
profile="${PROFILE:-release}"
gcc=aarch64-linux-gnu-gcc
sysroot=/usr/aarch64-linux-gnu

fail() { echo "cross-aarch64: $*" >&2; exit 1; }
[ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] || fail "Debian's rustc-web is missing: run targets/setup-toolchains.sh"
command -v "$gcc" >/dev/null || fail "$gcc is missing: run targets/setup-toolchains.sh"
[ -d "/usr/lib/rustlib/$target" ] || fail "no $target standard library (libstd-rust-web-dev:arm64): run targets/setup-toolchains.sh"

export RUSTC=/usr/bin/rustc
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/cross}"
# The linker for Rust, and the C toolchain for crates that build C or assembly (ring, zstd, ...).
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER="$gcc"
export CC_aarch64_unknown_linux_gnu="$gcc"
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# qemu: take the loader *and* the libraries from the cross sysroot. With `-L` alone, libraries
# resolve through the host's ld.so.cache to the multiarch libc6:arm64, a different glibc build
# than the sysroot's loader, and the first pthread_create spins forever.
qemu=(qemu-aarch64 -L "$sysroot" -E "LD_LIBRARY_PATH=$sysroot/lib")
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="${qemu[*]}"

# Cargo's JSON messages name every executable it produced; the human output goes to stderr.
messages=$(/usr/bin/cargo build --profile "$profile" --target "$target" -p "$package" \
  --message-format=json-render-diagnostics "$@")
mapfile -t executables < <(printf '%s\n' "$messages" \
  | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | sort -u)
[ "${#executables[@]}" -gt 0 ] || fail "cargo built no executable for $package ${*:-}"

for exe in "${executables[@]}"; do
  echo "$exe"
done
echo "run it with: ${qemu[*]} <binary>   (or copy it to the device)" >&2

if [ "${RUN:-0}" = 1 ]; then
  command -v qemu-aarch64 >/dev/null || fail "qemu-aarch64 is missing: run targets/setup-toolchains.sh"
  for exe in "${executables[@]}"; do
    "${qemu[@]}" "$exe"
  done
fi
