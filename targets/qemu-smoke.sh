#!/usr/bin/env bash
# Proves the board paths: cross-builds ambient-agent for each architecture, runs it under qemu
# against a coordinator on this host and has it classify real digits; then an x86_64 agent of
# this host runs the same tasks and must report the same output and fuel.
#
#   bash targets/qemu-smoke.sh                 # aarch64 (Cranelift) and armv7 (Pulley)
#   ARCHES=armv7 bash targets/qemu-smoke.sh    # one of them
#
# It ends with each architecture's announced fuel rate and its time for a batch of digits,
# emulated, beside x86_64's.
set -euo pipefail
cd "$(dirname "$0")/.."

read -r -a arches <<<"${ARCHES:-aarch64 armv7}"
# A dev build: output and fuel do not depend on the profile, and the release profile (fat
# LTO, one codegen unit) takes a quarter of an hour to cross-compile on two cores.
declare -A agent_bin qemu
for arch in "${arches[@]}"; do
  agent_bin[$arch]=$(PROFILE="${PROFILE:-dev}" bash targets/cross.sh "$arch" ambient-agent | tail -n 1)
  qemu[$arch]=$(bash targets/cross.sh "$arch" --qemu)
done
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
agent_pid=""
coordinator_pid=""
cleanup() {
  for p in $agent_pid $coordinator_pid; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$ambient" coordinator --listen 127.0.0.1:0 --http off --data-dir "$work/coordinator" 2>"$work/coordinator.log" &
coordinator_pid=$!
url=""
for _ in $(seq 1 100); do
  url=$(grep -o 'mqtt://127.0.0.1:[0-9]*' "$work/coordinator.log" | head -n 1 || true)
  [ -n "$url" ] && break
  sleep 0.1
done
[ -n "$url" ] || { cat "$work/coordinator.log"; echo "coordinator did not start" >&2; exit 1; }
echo "coordinator at $url"

# The first held-out digit (64 pixel bytes, then its label), and a batch of the first 300.
python3 - tasks/digits-model/data/heldout.bin "$work" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
records = [data[i:i + 65] for i in range(0, 300 * 65, 65)]
open(f"{sys.argv[2]}/digit.bin", "wb").write(records[0][:64])
open(f"{sys.argv[2]}/label", "w").write(str(records[0][64]))
open(f"{sys.argv[2]}/batch.bin", "wb").write(b"".join(r[:64] for r in records))
PY
label=$(cat "$work/label")

# Starts an agent (a command line) of architecture `arch` (as `ambient nodes` names it), waits
# until the coordinator has it online, runs the digit and then the batch on it, and saves both
# results as $work/<name>.{digit,batch}.json.
run_on() {
  local name=$1 arch=$2
  shift 2
  "$@" --broker "$url" --state-dir "$work/agent-$name" --name "$name" >"$work/$name.log" 2>&1 &
  agent_pid=$!
  # Wait until this agent is registered (the previous one, just stopped, may still show online):
  # a task no node can take fails after the coordinator's queue timeout (60 s), and the agent
  # starts slowly under emulation.
  local online=""
  for _ in $(seq 1 300); do
    if "$ambient" nodes --json --data-dir "$work/coordinator" 2>/dev/null \
      | python3 -c 'import json, sys; sys.exit(0 if any(n["online"] and n["arch"] == sys.argv[1] for n in json.load(sys.stdin)["nodes"]) else 1)' "$arch" 2>/dev/null; then
      online=yes
      break
    fi
    sleep 1
  done
  [ -n "$online" ] || { cat "$work/$name.log"; echo "the $name agent did not come online" >&2; exit 1; }
  local what
  for what in digit batch; do
    # The first task compiles the module (Cranelift is itself emulated), so allow it time.
    "$ambient" submit tasks/modules/digits.wasm --entry classify --input "$work/$what.bin" \
      --broker "$url" --wait --json --wait-secs 300 >"$work/$name.$what.json" \
      || { cat "$work/$name.log" "$work/$name.$what.json"; exit 1; }
  done
  kill "$agent_pid"
  wait "$agent_pid" 2>/dev/null || true
  agent_pid=""
}

declare -A node_arch=([aarch64]=aarch64 [armv7]=arm)
for arch in "${arches[@]}"; do
  run_on "qemu-$arch" "${node_arch[$arch]}" ${qemu[$arch]} "${agent_bin[$arch]}"
done
# The same tasks on an x86_64 agent of this host: the same output and the same fuel, which is
# what replicas on different boards vote on (digits.wasm uses 128-bit SIMD).
run_on host-x86_64 x86_64 "$bins/ambient-agent"

"$ambient" nodes --data-dir "$work/coordinator"
python3 - "$work" "$label" "$ambient" "${PROFILE:-dev}" "${arches[@]}" <<'PY'
import base64, json, subprocess, sys
work, label, ambient, profile, arches = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
engines = {"aarch64": "wasmtime", "armv7": "wasmtime-pulley"}
node_arch = {"aarch64": "aarch64", "armv7": "arm"}
nodes = json.loads(subprocess.check_output([ambient, "nodes", "--json", "--data-dir", f"{work}/coordinator"]))["nodes"]
by_id = {n["node"]: n for n in nodes}
def load(name, what):
    event = json.load(open(f"{work}/{name}.{what}.json"))
    assert event["status"] == "completed", event
    return event
native = {w: load("host-x86_64", w) for w in ("digit", "batch")}
for arch in arches:
    ran = {w: load(f"qemu-{arch}", w) for w in ("digit", "batch")}
    node = by_id[ran["digit"]["nodes"][0]]
    assert node["arch"] == node_arch[arch], f"ran on a node with arch {node['arch']}"
    assert node["engine"] == engines[arch], f"{arch} announced engine {node['engine']}"
    assert ran["digit"]["receipts"][0]["engine"] == engines[arch], ran["digit"]
    out = list(base64.b64decode(ran["digit"]["output_b64"]))
    assert out == [label], f"{arch} classified the digit as {out}, label {label}"
    for what in ("digit", "batch"):
        assert ran[what]["output_b64"] == native[what]["output_b64"], f"{arch} {what}: output differs from x86_64"
        fuel = [e["receipts"][0]["fuel_used"] for e in (ran[what], native[what])]
        assert fuel[0] == fuel[1], f"{arch} {what}: fuel {fuel[0]}, x86_64 {fuel[1]}"
    print(f"{arch} agent under qemu ({engines[arch]}): digit classified as {label}, receipts verified; "
          f"the same output and fuel as x86_64 for 1 and 300 digits "
          f"({ran['batch']['receipts'][0]['fuel_used']} fuel)")
# Each agent measured its fuel rate when it started and announced it (the latency-aware strategy
# turns a task's fuel limit into a run time with it).
rates = {}
for name, arch in [(f"qemu-{a}", a) for a in arches] + [("host-x86_64", "x86_64")]:
    node = by_id[load(name, "digit")["nodes"][0]]
    rate = node.get("announced_fuel_per_s")
    assert rate, f"the {arch} agent announced no fuel rate: {node}"
    rates[arch] = rate
print(f"fuel rate each agent measured at start and announced (digits kernel; {profile} builds, "
      "aarch64 and armv7 emulated under qemu-user, not a board's speed):")
for arch, r in rates.items():
    print(f"  {arch:8} {r / 1e6:9.1f}M fuel/s  {r / rates['x86_64']:.3f}x x86_64")
ms = {arch: load(f"qemu-{arch}", "batch")["latency_ms"] for arch in arches}
ms["x86_64"] = native["batch"]["latency_ms"]
print("300 digits, submit to verified result (module already compiled on the node; emulated "
      "under qemu-user on this host, not a board's speed):")
for arch, t in ms.items():
    than = [f"{t / ms[a]:.1f}x the time of {a}" for a in ("aarch64", "x86_64") if a in ms and a != arch and arch != "x86_64"]
    print(f"  {arch:8} {t:9.1f} ms  {', '.join(than)}")
PY
