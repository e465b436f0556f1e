#!/usr/bin/env bash
# Cross-builds a workspace binary for a board with Debian's rustc-web, as TOOLCHAINS.md
# describes, and prints the path of what it built.
#
#   aarch64: Raspberry Pi 4/5 on 64-bit Pi OS, Jetson (aarch64-unknown-linux-gnu), Cranelift
#   armv7:   Raspberry Pi Zero 2 W, 3, 4 on 32-bit Pi OS (armv7-unknown-linux-gnueabihf); wasmtime
#            has no Cranelift backend there and runs tasks on its Pulley interpreter
#
#   bash targets/cross.sh                                          # aarch64 ambient-agent, release
#   bash targets/cross.sh armv7                                    # the same for 32-bit Pi OS
#   bash targets/cross.sh aarch64 ambient-cli                      # `ambient`
#   bash targets/cross.sh aarch64 ambient-core --example receipt   # extra args go to cargo build
#   RUN=1 bash targets/cross.sh armv7 ambient-core --example receipt   # and run it under qemu
#   bash targets/cross.sh armv7 --qemu                             # print the qemu command and exit
#
# Environment: CARGO_TARGET_DIR (default target/cross, so rustup's and Debian's compilers never
# share artifacts), PROFILE (default release), RUN=1 to run the binary under qemu.
# Needs targets/setup-toolchains.sh. The binary links against
# glibc 2.36 (Debian 12); for older device OSes see targets/README.md (cargo-zigbuild with a
# pinned glibc).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

fail() { echo "cross: $*" >&2; exit 1; }

arch="${1:-aarch64}"
shift || true
case "$arch" in
  aarch64) target=aarch64-unknown-linux-gnu gnu=aarch64-linux-gnu qemu_bin=qemu-aarch64 deb=arm64 ;;
  armv7) target=armv7-unknown-linux-gnueabihf gnu=arm-linux-gnueabihf qemu_bin=qemu-arm deb=armhf ;;
  *) fail "unknown architecture '$arch': aarch64 (64-bit Pi OS, Jetson) or armv7 (32-bit Pi OS)" ;;
esac
sysroot="/usr/$gnu"
# qemu: take the loader *and* the libraries from the cross sysroot. With `-L` alone, libraries
# resolve through the host's ld.so.cache to the multiarch libc6 of that architecture, a different
# glibc build than the sysroot's loader, and the first pthread_create spins forever.
qemu=("$qemu_bin" -L "$sysroot" -E "LD_LIBRARY_PATH=$sysroot/lib")
if [ "${1:-}" = --qemu ]; then
  echo "${qemu[*]}"
  exit 0
fi

package="${1:-ambient-agent}"
shift || true
profile="${PROFILE:-release}"
gcc="$gnu-gcc"
setup="run bash targets/setup-toolchains.sh"
[ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] || fail "Debian's rustc-web is missing: $setup"
command -v "$gcc" >/dev/null || fail "$gcc is missing: $setup"
[ -d "/usr/lib/rustlib/$target" ] || fail "no $target standard library (libstd-rust-web-dev:$deb): $setup"

export RUSTC=/usr/bin/rustc
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target/cross}"
# The linker for Rust, and the C toolchain for crates that build C or assembly (ring, zstd, ...).
env_target=$(echo "$target" | tr 'a-z-' 'A-Z_')
export "CARGO_TARGET_${env_target}_LINKER=$gcc"
export "CARGO_TARGET_${env_target}_RUNNER=${qemu[*]}"
export "CC_${target//-/_}=$gcc" "CXX_${target//-/_}=$gnu-g++" "AR_${target//-/_}=$gnu-ar"

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
  command -v "$qemu_bin" >/dev/null || fail "$qemu_bin is missing: $setup"
  for exe in "${executables[@]}"; do
    "${qemu[@]}" "$exe"
  done
fi
