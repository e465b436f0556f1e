#!/usr/bin/env bash
# Builds the Debian packages ambient-agent and ambient-coordinator (the `ambient` binary and its
# service) with cargo-deb, from the `[package.metadata.deb]` of agent/Cargo.toml and
# coordinator/Cargo.toml, and prints the path of each .deb.
#
#   bash targets/package.sh                   # this machine's architecture, release build
#   bash targets/package.sh x86_64 aarch64    # and Raspberry Pi 4/5 / Jetson with a 64-bit OS
#
# aarch64 on an x86_64 machine is cross-built with targets/cross.sh (Debian's rustc-web:
# run targets/setup-toolchains.sh once; 10 to 20 minutes per binary on two cores).
#
# Environment:
#   OUT            where the .deb files go (default target/debian)
#   PACKAGES       which packages (default "ambient-agent ambient-coordinator")
#   BINARIES_FROM  package the binaries already in this directory (e.g. target/debug, which
#                  `cargo test` fills) instead of building release ones; this machine's
#                  architecture only. targets/package-check.sh uses it.
#   DEB_FLAGS      more cargo-deb flags, e.g. --fast (quicker, larger compression)
# Needs cargo-deb; installs the pinned version below (about 1.5 minutes) when it is missing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

cargo_deb_version=3.8.0
out="${OUT:-$root/target/debian}"
read -r -a packages <<<"${PACKAGES:-ambient-agent ambient-coordinator}"
read -r -a deb_flags <<<"${DEB_FLAGS:-}"
host="$(uname -m)"
arches=("$@")
[ "${#arches[@]}" -gt 0 ] || arches=("$host")

fail() { echo "package: $*" >&2; exit 1; }

# The binary each package ships, and the Cargo package that builds it and holds its
# [package.metadata.deb] (the coordinator's package ships `ambient`, from cli/).
binary_of() {
  case "$1" in
    ambient-agent) echo ambient-agent ;;
    ambient-coordinator) echo ambient ;;
    *) fail "unknown package $1 (ambient-agent or ambient-coordinator)" ;;
  esac
}
crate_of() {
  case "$1" in
    ambient-agent) echo ambient-agent ;;
    ambient-coordinator) echo ambient-cli ;;
    *) fail "unknown package $1 (ambient-agent or ambient-coordinator)" ;;
  esac
}

if ! cargo deb --version >/dev/null 2>&1; then
  echo "package: installing cargo-deb $cargo_deb_version" >&2
  cargo install cargo-deb --version "$cargo_deb_version" --locked
fi
mkdir -p "$out"

for arch in "${arches[@]}"; do
  case "$arch" in
    x86_64 | aarch64) ;;
    *) fail "unknown architecture $arch (x86_64 or aarch64)" ;;
  esac
  if [ -n "${BINARIES_FROM:-}" ]; then
    [ "$arch" = "$host" ] || fail "BINARIES_FROM packages this machine's binaries ($host), not $arch"
    # cargo-deb takes binaries from <target dir>/release/ (it rewrites the assets'
    # target/release/ prefix). Give it a target directory whose release/ holds the binaries we
    # were pointed at: hard links, so nothing large is copied, in a directory on the same file
    # system. (`cargo deb --profile dev` would do it too, but cargo-deb warns that it will
    # refuse that.)
    staged="$root/target/package-staged"
    rm -rf "$staged"
    mkdir -p "$staged/release"
    for p in "${packages[@]}"; do
      bin="$(binary_of "$p")"
      [ -x "$BINARIES_FROM/$bin" ] || fail "no $BINARIES_FROM/$bin: build it first (cargo build -p $(crate_of "$p"))"
      ln -f "$BINARIES_FROM/$bin" "$staged/release/$bin" 2>/dev/null \
        || cp "$BINARIES_FROM/$bin" "$staged/release/$bin"
    done
    for p in "${packages[@]}"; do
      CARGO_TARGET_DIR="$staged" cargo deb -p "$(crate_of "$p")" --no-build -o "$out" "${deb_flags[@]}"
    done
  elif [ "$arch" = "$host" ]; then
    for p in "${packages[@]}"; do
      cargo deb -p "$(crate_of "$p")" -o "$out" "${deb_flags[@]}"
    done
  elif [ "$arch" = aarch64 ]; then
    target=aarch64-unknown-linux-gnu
    cross_dir="$root/target/cross"
    for p in "${packages[@]}"; do
      CARGO_TARGET_DIR="$cross_dir" bash targets/cross.sh aarch64 "$(crate_of "$p")" --bin "$(binary_of "$p")" >/dev/null
    done
    # The cross build is done (with Debian's compiler); cargo-deb only strips with the aarch64
    # binutils and packs.
    for p in "${packages[@]}"; do
      CARGO_TARGET_DIR="$cross_dir" cargo deb -p "$(crate_of "$p")" --target "$target" --no-build \
        -o "$out" "${deb_flags[@]}"
    done
  else
    fail "cannot build $arch packages on $host: build them on an $arch machine"
  fi
done
