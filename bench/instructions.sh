#!/usr/bin/env bash
# User-space instructions the gateway executes per proxied request, counted by
# callgrind: the steady measure for comparing two builds on a noisy machine, where
# req/s and CPU time move by ±10 % between identical runs and this count by ±0.2 %.
#
# Starts a 64-byte upstream and the release gateway under valgrind's callgrind; warms
# up (TLS handshakes, upstream pool), then counts the instructions of N requests from
# oha over 10 keep-alive connections, for HTTP/1.1 and for HTTP/2. It counts only user
# space (the kernel's TCP work, about half of all CPU, is not in it) and runs about
# fifty times slower than native, so it says nothing about req/s or latency.
#
# Usage: bench/instructions.sh [N]      (default 4000; needs valgrind, oha, curl)
#        BUILD=pgo bench/instructions.sh   the gateway built afresh by bench/pgo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-4000}

. bench/common.sh
need valgrind "apt-get install valgrind"
need callgrind_annotate "apt-get install valgrind"
need oha "cargo install oha --locked"
need curl "apt-get install curl"
need python3 "apt-get install python3"

cargo build --release --quiet --bin covata-gateway
BIN=$PWD/target/release/covata-gateway
GATEWAY_BIN=$(gateway_binary "$BIN")
UP=$(free_port); GW=$(free_port)
export TOKIO_WORKER_THREADS=1
"$BIN" demo-upstream --listen 127.0.0.1:$UP --body-size 64 >"$WORK/up.log" 2>&1 & PIDS+=($!)
bench_config "$BIN" $GW $UP $UP >"$WORK/gateway.toml"

count() { # label -- oha args
  local label=$1; shift 2
  RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$WORK/cg.out" "$GATEWAY_BIN" --config "$WORK/gateway.toml" >"$WORK/gw.log" 2>&1 &
  local vg=$!
  PIDS+=($vg)
  wait_port $GW
  bench_tokens $GW
  local url="https://127.0.0.1:$GW/api/v1/x" auth="Authorization: Bearer $ACCESS"
  oha --no-tui -n 500 -c 10 --insecure -H "$auth" "$@" "$url" >/dev/null 2>&1
  callgrind_control -i on $vg >/dev/null
  oha --no-tui --output-format json -n "$N" -c 10 --insecure -H "$auth" "$@" "$url" >"$WORK/oha.json"
  callgrind_control -i off $vg >/dev/null
  callgrind_control -d $vg >/dev/null
  kill $vg; wait $vg 2>/dev/null || true
  local dump
  dump=$(ls "$WORK"/cg.out.* | head -1)
  local total
  total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}')
  rm -f "$WORK"/cg.out*
  python3 - "$label" "$WORK/oha.json" "$total" <<'PY'
import json, sys
label, path, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
codes = json.load(open(path)).get("statusCodeDistribution", {})
n = sum(codes.values())
ok = codes.get("200", 0)
print(f"| {label} | {n:,} | {ok:,} | {total / n:,.0f} |")
if ok != n:
    sys.exit(f"instructions: {n - ok} requests did not get 200: {codes}")
PY
}

echo "gateway ${BUILD:-release} build"
echo
echo "| protocol | requests | 200 | instructions per request |"
echo "|---|---:|---:|---:|"
count "HTTP/1.1" -- --http-version 1.1
count "HTTP/2" -- --http2
