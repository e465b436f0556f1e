#!/usr/bin/env bash
# The dashboard in headless Chromium: installs Debian's chromium and chromedriver if they are
# missing, builds `ambient`, and runs tests/browser/dashboard.py (screenshots go to target/).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver fonts-dejavu-core
fi
# AMBIENT_BIN_DIR: take `ambient` from there instead of building it (see targets/qemu-smoke.sh).
bins="${AMBIENT_BIN_DIR:-}"
if [ -z "$bins" ]; then
  cargo build -q -p ambient-cli --bin ambient
  bins=target/debug
fi
python3 tests/browser/dashboard.py "$bins/ambient"
