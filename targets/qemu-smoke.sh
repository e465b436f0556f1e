#!/usr/bin/env bash
# Proves the Raspberry Pi 4/5 / Jetson path: cross-builds ambient-agent for aarch64, runs it
# under qemu-aarch64 against a coordinator on this host, and has it classify a real digit; then
# an x86_64 agent of this host runs the same task and must report the same output and fuel.
set -euo pipefail
cd "$(dirname "$0")/.."

# A dev build: output and fuel do not depend on the profile, and the release profile (fat
# LTO, one codegen unit) takes a quarter of an hour to cross-compile on two cores.
agent_bin=$(PROFILE="${PROFILE:-dev}" bash targets/cross-aarch64.sh ambient-agent | tail -n 1)
# AMBIENT_BIN_DIR: take `ambient` and `ambient-agent` from there instead of building them
# (.ci/run points it at the binaries its test step built: building one package alone unifies
# features differently and would compile much of the tree again).
bins="${AMBIENT_BIN_DIR:-}"
if [ -z "$bins" ]; then
  cargo build -q -p ambient-cli --bin ambient
  cargo build -q -p ambient-agent --bin ambient-agent
  bins=target/debug
fi
ambient="$bins/ambient"

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$ambient" coordinator --listen 127.0.0.1:0 --http off --data-dir "$work/coordinator" 2>"$work/coordinator.log" &
pids+=($!)
url=""
for _ in $(seq 1 100); do
  url=$(grep -o 'mqtt://127.0.0.1:[0-9]*' "$work/coordinator.log" | head -n 1 || true)
  [ -n "$url" ] && break
  sleep 0.1
done
[ -n "$url" ] || { cat "$work/coordinator.log"; echo "coordinator did not start" >&2; exit 1; }
echo "coordinator at $url"

qemu-aarch64 -L /usr/aarch64-linux-gnu -E LD_LIBRARY_PATH=/usr/aarch64-linux-gnu/lib "$agent_bin" --broker "$url" --state-dir "$work/agent" \
  --name qemu-aarch64 >"$work/agent.log" 2>&1 &
pids+=($!)

# Wait until the emulated agent is registered: a task no node can take fails after the
# coordinator's queue timeout (60 s), and the agent starts slowly under emulation.
online=""
for _ in $(seq 1 300); do
  if "$ambient" nodes --json --data-dir "$work/coordinator" 2>/dev/null \
    | python3 -c 'import json, sys; sys.exit(0 if any(n.get("online") for n in json.load(sys.stdin)["nodes"]) else 1)' 2>/dev/null; then
    online=yes
    break
  fi
  sleep 1
done
[ -n "$online" ] || { cat "$work/agent.log"; echo "the aarch64 agent did not come online" >&2; exit 1; }

# The first held-out digit: 64 pixel bytes, then its label.
head -c 64 tasks/digits-model/data/heldout.bin >"$work/digit.bin"
label=$(od -An -tu1 -j64 -N1 tasks/digits-model/data/heldout.bin | tr -d ' ')

# Cranelift compiles under emulation, so allow the first task time.
result=$("$ambient" submit tasks/modules/digits.wasm --entry classify --input "$work/digit.bin" \
  --broker "$url" --wait --json --wait-secs 300) || { cat "$work/agent.log"; echo "$result"; exit 1; }
echo "$result"
python3 - "$result" "$label" "$work/coordinator" "$ambient" <<'PY'
import base64, json, subprocess, sys
event = json.loads(sys.argv[1]); label = int(sys.argv[2])
assert event["status"] == "completed", event
out = base64.b64decode(event["output_b64"])
assert list(out) == [label], f"classified as {list(out)}, label {label}"
nodes = json.loads(subprocess.check_output([sys.argv[4], "nodes", "--json", "--data-dir", sys.argv[3]]))["nodes"]
archs = {n["node"]: n["arch"] for n in nodes}
ran_on = event["nodes"][0]
assert archs.get(ran_on) == "aarch64", f"ran on {ran_on} with arch {archs.get(ran_on)}"
print(f"aarch64 agent under qemu classified the digit as {label}; receipt verified, ledger credited")
PY

# The same task on an x86_64 agent of this host: the same output and the same fuel, which is
# what replicas on different boards vote on (digits.wasm uses 128-bit SIMD).
kill "${pids[1]}" 2>/dev/null || true
"$bins/ambient-agent" --broker "$url" --state-dir "$work/agent-x86" --name host-x86_64 \
  >"$work/agent-x86.log" 2>&1 &
pids+=($!)
native=$("$ambient" submit tasks/modules/digits.wasm --entry classify --input "$work/digit.bin" \
  --broker "$url" --wait --json --wait-secs 120) || { cat "$work/agent-x86.log"; echo "$native"; exit 1; }
python3 - "$result" "$native" <<'PY'
import json, sys
arm, x86 = json.loads(sys.argv[1]), json.loads(sys.argv[2])
assert x86["status"] == "completed", x86
assert x86["output_b64"] == arm["output_b64"], (arm, x86)
fuel = [e["receipts"][0]["fuel_used"] for e in (arm, x86)]
assert fuel[0] == fuel[1], f"fuel differs: aarch64 {fuel[0]}, x86_64 {fuel[1]}"
print(f"x86_64 agent: same output and the same fuel ({fuel[0]}) as aarch64 under qemu")
PY
