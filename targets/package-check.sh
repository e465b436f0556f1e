#!/usr/bin/env bash
# Checks the Debian packages: builds both x86_64 .deb files with targets/package.sh from the
# debug binaries that `cargo test` and qemu-smoke.sh already built (so CI compiles nothing new
# for it), then reads their control fields, conffiles and maintainer scripts, extracts them into
# a scratch root, runs the extracted binaries, creates the `ambient` user there with
# systemd-sysusers, and verifies the units with systemd-analyze against that root.
#
#   bash targets/package-check.sh
#
# The packages' layout, metadata and scripts do not depend on the build profile, so debug
# binaries check them as well as release ones would; release packages are
# `bash targets/package.sh`. systemd-sysusers and systemd-analyze may be missing (containers):
# those parts are then skipped with a line saying so, everything else always runs.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

fail() { echo "package-check: FAIL: $*" >&2; exit 1; }
ok() { echo "package-check: ok: $*"; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# AMBIENT_BIN_DIR: package the binaries there instead (see targets/qemu-smoke.sh).
bins="${AMBIENT_BIN_DIR:-}"
if [ -z "$bins" ]; then
  cargo build -q -p ambient-cli --bin ambient
  cargo build -q -p ambient-agent --bin ambient-agent
  bins=target/debug
fi

start=$SECONDS
BINARIES_FROM="$bins" OUT="$work/debs" DEB_FLAGS=--fast \
  bash targets/package.sh "$(uname -m)" >"$work/built"
echo "package-check: packaged in $((SECONDS - start)) s:"
while read -r deb; do
  printf '  %s  %s\n' "$(du -h "$deb" | cut -f1)" "$(basename "$deb")"
done <"$work/built"

version="$(cargo metadata --no-deps --format-version 1 \
  | python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "ambient-agent"))')"
arch="$(dpkg --print-architecture)"

# package, binary, config file, unit
for spec in "ambient-agent ambient-agent agent.toml" "ambient-coordinator ambient coordinator.toml"; do
  read -r package binary config <<<"$spec"
  unit="$package.service"
  deb="$work/debs/${package}_${version}-1_${arch}.deb"
  [ -f "$deb" ] || fail "$deb was not built (built: $(tr '\n' ' ' <"$work/built"))"

  field() { dpkg-deb -f "$deb" "$1"; }
  [ "$(field Package)" = "$package" ] || fail "$deb: Package is $(field Package)"
  [ "$(field Version)" = "$version-1" ] || fail "$deb: Version is $(field Version), not $version-1"
  [ "$(field Architecture)" = "$arch" ] || fail "$deb: Architecture is $(field Architecture)"
  field Depends | grep -q 'libc6' || fail "$deb: Depends has no libc6: $(field Depends)"
  field Depends | grep -q 'systemd-sysusers' || fail "$deb: Depends does not bring systemd-sysusers: $(field Depends)"
  [ -n "$(field Maintainer)" ] && [ -n "$(field Description)" ] || fail "$deb: no Maintainer or Description"
  dpkg-deb -I "$deb" conffiles | grep -qx "/etc/ambient/$config" \
    || fail "$deb: /etc/ambient/$config is not a conffile"

  listing="$(dpkg-deb -c "$deb" | awk '{print $1, $6}')"
  for entry in "-rwxr-xr-x ./usr/bin/$binary" \
    "-rw-r--r-- ./etc/ambient/$config" \
    "-rw-r--r-- ./usr/lib/systemd/system/$unit" \
    "-rw-r--r-- ./usr/lib/sysusers.d/$package.conf"; do
    grep -qxF -- "$entry" <<<"$listing" || fail "$deb does not hold $entry; it has:
$listing"
  done

  # Maintainer scripts: valid sh, the user created before the unit is enabled and started.
  dpkg-deb -e "$deb" "$work/control-$package"
  for script in postinst prerm postrm; do
    sh -n "$work/control-$package/$script" || fail "$deb: $script is not valid sh"
  done
  postinst="$work/control-$package/postinst"
  grep -q "systemd-sysusers.* $package.conf" "$postinst" || fail "$deb: postinst does not create the user"
  grep -q "deb-systemd-helper enable $unit" "$postinst" || fail "$deb: postinst does not enable $unit"
  [ "$(grep -n systemd-sysusers "$postinst" | head -1 | cut -d: -f1)" -lt \
    "$(grep -n 'deb-systemd-invoke' "$postinst" | head -1 | cut -d: -f1)" ] \
    || fail "$deb: postinst starts $unit before it creates the user"

  # The files as dpkg would install them: byte for byte what targets/ holds.
  dpkg -x "$deb" "$work/root"
  cmp "$work/root/usr/lib/systemd/system/$unit" "targets/systemd/$unit" || fail "$unit differs from targets/systemd"
  cmp "$work/root/etc/ambient/$config" "targets/config/$config" || fail "$config differs from targets/config"
  # The unit names its binary without a directory (found in /usr/local/bin or /usr/bin).
  exec_start="$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$work/root/usr/lib/systemd/system/$unit")"
  [ -x "$work/root/usr/bin/$exec_start" ] || fail "$unit runs $exec_start, which the package does not put in /usr/bin"
  ok "$package: control fields, conffile /etc/ambient/$config, $unit, sysusers, scripts"
done

for binary in ambient ambient-agent; do
  out="$("$work/root/usr/bin/$binary" --version)" || fail "usr/bin/$binary --version failed"
  [ "$out" = "$binary $version" ] || fail "usr/bin/$binary --version printed '$out', not '$binary $version'"
  ok "extracted usr/bin/$binary --version: $out"
done

if command -v systemd-sysusers >/dev/null; then
  mkdir -p "$work/root/etc"
  systemd-sysusers --root="$work/root" ambient-agent.conf ambient-coordinator.conf
  grep -q '^ambient:x:[0-9]*:[0-9]*:.*:/usr/sbin/nologin$' "$work/root/etc/passwd" \
    || fail "systemd-sysusers did not create the system user ambient: $(cat "$work/root/etc/passwd")"
  ok "systemd-sysusers creates $(grep '^ambient:' "$work/root/etc/passwd")"
else
  echo "package-check: skipped: systemd-sysusers is not installed here (the user is not created)"
fi

if command -v systemd-analyze >/dev/null; then
  # systemd-analyze resolves ExecStart= and the units' dependencies inside --root, so the
  # scratch root also gets this machine's own units (targets, sockets).
  cp -an /usr/lib/systemd/system/. "$work/root/usr/lib/systemd/system/"
  # It prints a bad setting as a warning and still exits 0: any output fails the check.
  if ! report="$(systemd-analyze verify --root="$work/root" ambient-agent.service ambient-coordinator.service 2>&1)" \
    || [ -n "$report" ]; then
    fail "systemd-analyze verify: $report"
  fi
  ok "systemd-analyze verify: both units load, their ExecStart= binaries exist"
else
  echo "package-check: skipped: systemd-analyze is not installed here (units not verified)"
fi
echo "package-check: passed"
