#!/usr/bin/env bash
# Installs the cross toolchains of TOOLCHAINS.md once per machine: Debian's rustc-web 1.96 with the
# aarch64 and armv7 (armhf) standard libraries and library source (for -Zbuild-std), lld, both C
# toolchains and qemu-user. Idempotent: when every package is already installed it touches nothing (no apt, no
# network), so `.ci/run` can call it every time.
#
#   bash targets/setup-toolchains.sh
#
# Needs root (or sudo) only when something is missing. ARCHES=arm64 (or armhf) installs one of
# the two: 64-bit (Pi 4/5, Jetson) or 32-bit Raspberry Pi OS.
set -euo pipefail

arches="${ARCHES:-arm64 armhf}"
packages=(rustc-web cargo-web rust-web-src lld-22 qemu-user binutils)
for arch in $arches; do
  case "$arch" in
    arm64) packages+=(libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
    armhf) packages+=(libstd-rust-web-dev:armhf gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) ;;
    *) echo "setup-toolchains: unknown architecture $arch (arm64 or armhf)" >&2; exit 1 ;;
  esac
done

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$p")
  fi
done
missing_arches=()
for arch in $arches; do
  [ "$arch" = "$(dpkg --print-architecture)" ] && continue
  dpkg --print-foreign-architectures | grep -qx "$arch" || missing_arches+=("$arch")
done

if [ "${#missing[@]}" -eq 0 ] && [ "${#missing_arches[@]}" -eq 0 ]; then
  echo "setup-toolchains: everything is installed ($(/usr/bin/rustc --version))"
  exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup-toolchains: need root to install: ${missing[*]}" >&2; exit 1; }
  sudo=sudo
fi
for arch in "${missing_arches[@]}"; do
  $sudo dpkg --add-architecture "$arch"
done
echo "setup-toolchains: installing ${missing[*]}"
$sudo apt-get update
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
/usr/bin/rustc --version
