#!/usr/bin/env bash
# Agents for older systems: builds ambient-agent against an older glibc with cargo-zigbuild,
# and checks which glibc a binary needs.
#
#   bash targets/glibc.sh check BINARY [MAX]   # fails when BINARY needs a glibc newer than MAX (default 2.31)
#   bash targets/glibc.sh build [GLIBC] [PROFILE]  # x86_64 agent for GLIBC (default 2.31); release or dev
#
# Why: a build on this machine links against its own glibc (2.36) and then needs 2.34, newer
# than Debian 11 / Raspberry Pi OS bullseye and L4T 35 (Jetson) ship, both 2.31. zig's linker
# links against the symbol versions of the glibc you name instead. The check reads the binary's
# dynamic symbol versions (`objdump -T`), so it holds for binaries built any way.
#
# Needs: objdump (binutils) for `check`; for `build`, zig from PyPI (`pip install ziglang`) and
# cargo-zigbuild from crates.io, both installed here when missing (no download at build time
# beyond the package registries).
#
# aarch64 (Pi 4/5, Jetson) for glibc 2.31: the same with Debian's cross Rust (see
# ../shared/TOOLCHAINS.md and targets/cross.sh):
#   RUSTC=/usr/bin/rustc /usr/bin/cargo zigbuild --release -p ambient-agent \
#     --target aarch64-unknown-linux-gnu.2.31 --target-dir target/cross
set -euo pipefail
cd "$(dirname "$0")/.."

zigbuild_version=0.24.1
ziglang_version=0.17.1

# The newest GLIBC_x.y version BINARY refers to.
needed() {
  objdump -T "$1" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -t. -k1,1n -k2,2n -k3,3n -u | tail -n 1
}

# Whether version $1 is newer than $2.
newer() {
  [ "$1" != "$2" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -t. -k1,1n -k2,2n -k3,3n | tail -n 1)" = "$1" ]
}

case "${1:-}" in
  check)
    binary="${2:?usage: glibc.sh check BINARY [MAX]}"
    max="${3:-2.31}"
    [ -x "$binary" ] || { echo "glibc: $binary is not an executable" >&2; exit 1; }
    need="$(needed "$binary")"
    [ -n "$need" ] || { echo "glibc: $binary refers to no glibc symbol version (static?)"; exit 0; }
    if newer "$need" "$max"; then
      echo "glibc: FAIL: $binary needs glibc $need, newer than $max; these symbols ask for it:" >&2
      objdump -T "$binary" | grep -E "GLIBC_$need( |\)|$)" | awk '{print "  " $NF " " $(NF-1)}' >&2
      exit 1
    fi
    echo "glibc: ok: $binary needs glibc $need (at most $max)"
    ;;
  build)
    glibc="${2:-2.31}"
    profile="${3:-release}"
    case "$profile" in
      release) dir=release ;;
      dev) dir=debug ;;
      *) echo "glibc: unknown profile $profile (release or dev)" >&2; exit 2 ;;
    esac
    if ! python3 -m ziglang version >/dev/null 2>&1; then
      echo "glibc: installing zig $ziglang_version from PyPI" >&2
      python3 -m pip install -q "ziglang==$ziglang_version" >&2
    fi
    if ! cargo zigbuild --help >/dev/null 2>&1; then
      echo "glibc: installing cargo-zigbuild $zigbuild_version" >&2
      cargo install -q cargo-zigbuild --version "$zigbuild_version" --locked >&2
    fi
    target="x86_64-unknown-linux-gnu"
    cargo zigbuild -q --profile "$profile" -p ambient-agent --bin ambient-agent \
      --target "$target.$glibc" --target-dir target/glibc >&2
    echo "target/glibc/$target/$dir/ambient-agent"
    ;;
  *)
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
