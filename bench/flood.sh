#!/usr/bin/env bash
# A telemetry flood against a coordinator on mosquitto (which, without ACLs, lets anyone publish
# in a node's name): two simulated agents, 20 probe tasks before and 20 during 30 s of forged
# telemetry in one node's name at RATE frames/s (default 40,000). Prints probe latency (p50 and
# max, from the coordinator's own timestamps), the coordinator's RSS idle and at peak, each
# node's presence and breaker, and the drop counters.
#
#   cargo build --release --workspace --bins && bash bench/flood.sh
#
# Needs mosquitto and python3. Timing depends on the machine: nothing here is asserted.
set -u
cd "$(dirname "$0")/.."
B=target/release
for bin in ambient ambient-agent; do
  [ -x "$B/$bin" ] || { echo "build first: cargo build --release --workspace --bins" >&2; exit 1; }
done
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ -x "$MOSQUITTO" ] || { echo "needs mosquitto: apt-get install mosquitto" >&2; exit 1; }
D=$(mktemp -d)
P=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
printf "listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000\n" "$P" > "$D/m.conf"
"$MOSQUITTO" -c "$D/m.conf" >/dev/null 2>&1 & MQ=$!
trap 'kill $MQ ${CO:-} ${A0:-} ${A1:-} ${FL:-} 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
sleep 0.5
URL=mqtt://127.0.0.1:$P
$B/ambient coordinator --data-dir "$D/c" --broker "$URL" 2>"$D/c.log" & CO=$!
sleep 1
for p in pi5 jetson-orin-nano; do
  AMBIENT_AGENT_TELEMETRY_INTERVAL_MS=1000 $B/ambient-agent --broker "$URL" --state-dir "$D/$p" \
    --simulate $p --name $p 2>/dev/null &
done
sleep 4
rss() { awk '/VmRSS/{print $2/1024}' /proc/$CO/status; }
probes() {
  for i in $(seq 1 20); do
    $B/ambient submit tasks/modules/wasi-upper.wasm --abi wasi --input-text "$1-$i" --client "$1" \
      --broker "$URL" --wait >/dev/null 2>&1 || echo "probe $1-$i failed"
  done
}
latency() {
  $B/ambient tasks --data-dir "$D/c" --json --limit 1000 | python3 -c "
import json, sys
ms = sorted(r['finished_ms'] - r['submitted_ms'] for r in json.load(sys.stdin)
            if r.get('client') == '$1' and r.get('finished_ms'))
print('probes $1: n=%d p50=%s ms max=%s ms' % (len(ms), ms[len(ms)//2] if ms else '-', ms[-1] if ms else '-'))"
}
echo "coordinator RSS idle: $(rss) MiB"
probes calm; latency calm
VICTIM=$($B/ambient nodes --data-dir "$D/c" --json | python3 -c \
  "import json,sys; print([n['node'] for n in json.load(sys.stdin)['nodes'] if n['profile']=='pi5'][0])")
python3 bench/flood.py 127.0.0.1 "$P" "$VICTIM" "${RATE:-40000}" 30 & FL=$!
sleep 3
(while kill -0 $FL 2>/dev/null; do rss >> "$D/rss"; sleep 0.5; done) &
probes flood; latency flood
wait $FL
echo "coordinator RSS peak under the flood: $(sort -n "$D/rss" | tail -1) MiB"
$B/ambient nodes --data-dir "$D/c" --json | python3 -c "
import json, sys
d = json.load(sys.stdin)
for n in d['nodes']:
    print('%-18s %-8s breaker %s' % (n['profile'], 'online' if n['online'] else 'OFFLINE', n['breaker']))
print('dropped', d['dropped'])"
