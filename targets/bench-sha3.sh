#!/usr/bin/env bash
# Compares ambient-core's sha3-256 throughput with OpenSSL's on this machine.
#
#   bash targets/bench-sha3.sh            # criterion bench (3 s) + `openssl speed` (3 s)
#   SECONDS_PER_RUN=10 bash targets/bench-sha3.sh
#
# Ours: the median of criterion's `sha3-256/1 MiB` benchmark (benches/core.rs).
# OpenSSL's: `openssl speed -elapsed -evp sha3-256 -bytes 16384 -seconds N`, before and after. `-elapsed` makes
# OpenSSL divide by wall-clock time, as criterion does; without it OpenSSL divides by its CPU
# time, which flatters it on a busy machine. Both are reported in MB/s (10^6 bytes per second).
# The goal is a ratio of at least 0.8; the script prints the ratio and exits 0 either way
# (exit 1 only if a measurement could not be made), since a busy machine moves both numbers.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${SECONDS_PER_RUN:-3}"
command -v openssl >/dev/null || { echo "bench-sha3: openssl not found" >&2; exit 1; }

# OpenSSL runs before and after ours and the two are averaged, so a load change during the run
# moves both sides alike. `-mr` prints `+F:<n>:sha3-256:<bytes per second>`.
openssl_speed() {
  openssl speed -mr -elapsed -evp sha3-256 -bytes 16384 -seconds "$secs" 2>/dev/null \
    | awk -F: '/^\+F:/ { print $4 }'
}
openssl_before=$(openssl_speed)

cargo bench -p ambient-core --bench core -- --warm-up-time 1 --measurement-time "$secs" 'sha3-256' >&2

openssl_after=$(openssl_speed)
[ -n "$openssl_before" ] && [ -n "$openssl_after" ] \
  || { echo "bench-sha3: could not parse openssl speed output" >&2; exit 1; }
openssl_bps=$(awk -v a="$openssl_before" -v b="$openssl_after" 'BEGIN { print (a + b) / 2 }')

target_dir="${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps \
  | grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)}"
estimates="$target_dir/criterion/sha3-256/1 MiB/new/estimates.json"
[ -f "$estimates" ] || { echo "bench-sha3: no criterion result at $estimates" >&2; exit 1; }
median_ns=$(sed -E 's/.*"median":\{"confidence_interval":\{[^}]*\},"point_estimate":([0-9.eE+-]+).*/\1/' "$estimates")

awk -v ns="$median_ns" -v obps="$openssl_bps" 'BEGIN {
  ours = 1048576 / (ns / 1e9) / 1e6
  theirs = obps / 1e6
  printf "sha3-256   ambient-core (sha3 crate, 1 MiB, median) %8.1f MB/s\n", ours
  printf "sha3-256   OpenSSL %-38s %8.1f MB/s\n", "(EVP, 16 KiB buffers, mean of 2)", theirs
  printf "ratio      %.2fx OpenSSL (goal >= 0.80x)\n", ours / theirs
}'
