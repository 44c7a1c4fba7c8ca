#!/usr/bin/env bash
# Measures the MIGlet agent idle: registered runner (stand-in), no job, connected to a real
# controller over gRPC with TLS, enrolled with a bootstrap secret (the secure default). Prints the agent's RSS and CPU share over the sample window.
# Usage: bench/agent_idle.sh [SECONDS]   (default 60). Loopback only; cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}
cargo build --release --locked -q -p miglet -p mig-controller -p miglet-sim
BIN=target/release
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
TOKEN=BENCHTOKEN$RANDOM$RANDOM

"$BIN/miglet-sim" github --token "$TOKEN" --addr-file "$WORK/gh" 2>/dev/null & PIDS+=($!)
"$BIN/miglet-sim" install-runner "$WORK/runner"
for _ in $(seq 50); do [ -s "$WORK/gh" ] && break; sleep 0.1; done
GH=$(cat "$WORK/gh")
"$BIN/mig-controller" certs init --out "$WORK/tls" --host 127.0.0.1 2>/dev/null
MIG_CONTROLLER_STATIC_TOKEN=$TOKEN MIG_CONTROLLER_RUNNER_URL="http://$GH/bench-org" \
  "$BIN/mig-controller" serve --http-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 \
  --tls-cert "$WORK/tls/server.pem" --tls-key "$WORK/tls/server-key.pem" \
  --data-dir "$WORK/ctl" --addr-file "$WORK/ctl.json" 2>"$WORK/ctl.log" & PIDS+=($!)
for _ in $(seq 100); do [ -s "$WORK/ctl.json" ] && break; sleep 0.1; done
HTTP=$(python3 -c "import json,sys;print(json.load(open('$WORK/ctl.json'))['http_addr'])")
GRPC=$(python3 -c "import json,sys;print(json.load(open('$WORK/ctl.json'))['grpc_addr'])")

MIGLET_POOL_ID=bench MIGLET_VM_ID=vm-bench MIGLET_CONTROLLER_ENDPOINT="https://$HTTP" \
MIGLET_CONTROLLER_GRPC_ENDPOINT="https://$GRPC" MIGLET_DATA_DIR="$WORK/agent" \
MIGLET_CA_FILE="$WORK/tls/ca.pem" MIGLET_BOOTSTRAP_SECRET_FILE="$WORK/ctl/dev-bootstrap-secret" \
MIGLET_RUNNER_DIR="$WORK/runner" MIGLET_METADATA=false MIGLET_HEARTBEAT_INTERVAL=15s \
  "$BIN/miglet" --runner-user= 2>"$WORK/agent.log" & AGENT=$!; PIDS+=($AGENT)

for _ in $(seq 200); do grep -q "Listening for Jobs" "$WORK/agent.log" && break; sleep 0.1; done
grep -q "Listening for Jobs" "$WORK/agent.log" || { echo "agent did not reach idle"; tail -20 "$WORK/agent.log"; exit 1; }
sleep 2
TCK=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' "/proc/$AGENT/stat"; }
rss() { awk '/VmRSS/{print $2}' "/proc/$AGENT/status"; }
C0=$(cpu); T0=$(date +%s.%N); PEAK=0
for _ in $(seq "$SECS"); do r=$(rss); [ "$r" -gt "$PEAK" ] && PEAK=$r; sleep 1; done
C1=$(cpu); T1=$(date +%s.%N)
python3 - "$C0" "$C1" "$T0" "$T1" "$TCK" "$(rss)" "$PEAK" "$SECS" <<'PY'
import sys
c0,c1,t0,t1,tck,rss,peak,secs=map(float,sys.argv[1:])
share=(c1-c0)/tck/(t1-t0)*100
print(f"agent idle over {secs:.0f} s: RSS {rss/1024:.1f} MiB (peak {peak/1024:.1f} MiB), CPU {share:.3f} % of one core ({(c1-c0):.0f} ticks)")
PY
