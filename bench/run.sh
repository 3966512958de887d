#!/usr/bin/env bash
# One command: how much does covata-gateway cost, and is it as fast as nginx?
#
# Builds the release binary; starts two fixed-body upstreams (small and 64 KiB) on
# loopback; starts the gateway in front of them with a benchmark config, and (when
# installed) nginx as a plain TLS reverse proxy to the same upstreams (no auth); gets a
# token; then runs oha (JSON output) against the upstream direct, nginx and the gateway,
# interleaved round by round, with the servers pinned to core 0 and oha to core 1.
# Prints a markdown table and exits non-zero if any request failed.
#
# Usage: bench/run.sh [--quick]      (env: DURATION=5s ROUNDS=3 CONCURRENCY=50)
#        BUILD=pgo bench/run.sh      the gateway built afresh by bench/pgo.sh (the
#                                    upstreams stay the plain release build)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
CONCURRENCY=${CONCURRENCY:-50}
if [ "${1:-}" = "--quick" ]; then DURATION=2s; ROUNDS=1; fi

. bench/common.sh
need oha "cargo install oha --locked"
need curl "apt-get install curl"
need python3 "apt-get install python3"
need taskset "apt-get install util-linux"
need setsid "apt-get install util-linux"
HAVE_NGINX=1
command -v nginx >/dev/null 2>&1 || { HAVE_NGINX=0; echo "bench: nginx not installed; comparing with the upstream only (apt-get install nginx-light)" >&2; }

CORES=$(nproc)
SERVER_CPU=0
CLIENT_CPU=$(( CORES > 1 ? 1 : 0 ))

echo "== building the release binary" >&2
cargo build --release --quiet --bin covata-gateway --example argon2_rate
BIN=$PWD/target/release/covata-gateway
GATEWAY_BIN=$(gateway_binary "$BIN")

UP=$(free_port); UP64=$(free_port); GW=$(free_port); NGX=$(free_port)

# One worker thread each, pinned to the server core: the same budget nginx's single
# worker gets.
export TOKIO_WORKER_THREADS=1
# Each server in its own session, as nginx puts itself when it daemonizes and as
# separate services run in production. With autogroup scheduling
# (/proc/sys/kernel/sched_autogroup_enabled) the processes of one session are
# scheduled as one group: a gateway started beside its upstream from this shell shared
# the upstream's group, every upstream wakeup preempted it, and the two ping-ponged one
# request at a time (574 involuntary switches per 1,000 requests against nginx's 196),
# which cost the gateway a tenth of its rate and had nothing to do with the gateway.
SERVE="setsid taskset -c $SERVER_CPU"
$SERVE "$BIN" demo-upstream --listen 127.0.0.1:$UP --body-size 64 >"$WORK/up.log" 2>&1 & PIDS+=($!)
$SERVE "$BIN" demo-upstream --listen 127.0.0.1:$UP64 --body-size 65536 >"$WORK/up64.log" 2>&1 & PIDS+=($!)

bench_config "$BIN" $GW $UP $UP64 >"$WORK/gateway.toml"
# Starting the gateway once generates the certificate pair nginx will share.
RUST_LOG=warn $SERVE "$GATEWAY_BIN" --config "$WORK/gateway.toml" >"$WORK/gateway.log" 2>&1 & GW_PID=$!; PIDS+=($GW_PID)
wait_port $UP; wait_port $UP64; wait_port $GW

if [ $HAVE_NGINX = 1 ]; then
  mkdir -p "$WORK/nginx"
  cat >"$WORK/nginx.conf" <<NGINX
worker_processes 1;
worker_cpu_affinity $(python3 -c "print(format(1 << $SERVER_CPU, 'b'))");
pid $WORK/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fastcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi;
  scgi_temp_path $WORK/nginx/scgi;
  upstream small { server 127.0.0.1:$UP; keepalive 64; }
  upstream big { server 127.0.0.1:$UP64; keepalive 64; }
  server {
    listen 127.0.0.1:$NGX ssl http2;
    # TLS 1.3 as well, as nginx >= 1.23.4 has by default and as the gateway offers:
    # Debian's 1.22 offers only TLS 1.2, and oha would then compare TLS 1.2 handshakes
    # against the gateway's TLS 1.3 ones.
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate $WORK/gateway.crt;
    ssl_certificate_key $WORK/gateway.key;
    keepalive_requests 1000000;
    location /big/ { proxy_pass http://big; proxy_http_version 1.1; proxy_set_header Connection ""; }
    location / { proxy_pass http://small; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
  taskset -c $SERVER_CPU nginx -c "$WORK/nginx.conf" -g 'daemon on;' -e "$WORK/nginx/error.log"
  wait_port $NGX
fi

bench_tokens $GW

RESULTS=$WORK/results.jsonl
: >"$RESULTS"
# CPU time a process has used so far, in clock ticks: "user system".
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat" 2>/dev/null || echo 0 0; }
run() { # scenario target round -- oha args...   (CPU_PID=pid: also record its CPU time)
  local scenario=$1 target=$2 round=$3; shift 4
  local out="$WORK/oha.json" before="0 0" after="0 0"
  [ -n "${CPU_PID:-}" ] && before=$(cpu_ticks "$CPU_PID")
  taskset -c $CLIENT_CPU oha --no-tui --output-format json "$@" >"$out" 2>"$WORK/oha.err" || true
  [ -n "${CPU_PID:-}" ] && after=$(cpu_ticks "$CPU_PID")
  python3 - "$scenario" "$target" "$round" "$out" "$before" "$after" "$(getconf CLK_TCK)" >>"$RESULTS" <<'PY'
import json, sys
scenario, target, rnd, path, before, after, hz = sys.argv[1:8]
user, system = (int(a) - int(b) for a, b in zip(after.split(), before.split()))
try:
    data = json.load(open(path))
except Exception as e:
    data = {"error": str(e)}
print(json.dumps({"scenario": scenario, "target": target, "round": int(rnd), "oha": data,
                  "cpu_seconds": (user + system) / int(hz), "cpu_user_seconds": user / int(hz)}))
PY
}

GWURL=https://127.0.0.1:$GW
NGXURL=https://127.0.0.1:$NGX
UPURL=http://127.0.0.1:$UP
BIGUP=http://127.0.0.1:$UP64
AUTH="Authorization: Bearer $ACCESS"
KEEP=(-z "$DURATION" -c "$CONCURRENCY" --insecure)

echo "== proxying: $ROUNDS rounds x $DURATION per target per scenario" >&2
for round in $(seq 1 "$ROUNDS"); do
  run h1 direct $round -- "${KEEP[@]}" "$UPURL/api/v1/x"
  [ $HAVE_NGINX = 1 ] && run h1 nginx $round -- "${KEEP[@]}" --http-version 1.1 "$NGXURL/api/v1/x"
  run h1 gateway $round -- "${KEEP[@]}" --http-version 1.1 -H "$AUTH" "$GWURL/api/v1/x"
  run h1-partitioned gateway $round -- "${KEEP[@]}" --http-version 1.1 -H "$AUTH" "$GWURL/partitioned/x"

  [ $HAVE_NGINX = 1 ] && run h2 nginx $round -- "${KEEP[@]}" --http2 "$NGXURL/api/v1/x"
  run h2 gateway $round -- "${KEEP[@]}" --http2 -H "$AUTH" "$GWURL/api/v1/x"

  [ $HAVE_NGINX = 1 ] && run newconn nginx $round -- -z "$DURATION" -c 8 --insecure --disable-keepalive "$NGXURL/api/v1/x"
  run newconn gateway $round -- -z "$DURATION" -c 8 --insecure --disable-keepalive -H "$AUTH" "$GWURL/api/v1/x"

  run 64k direct $round -- "${KEEP[@]}" "$BIGUP/big/x"
  [ $HAVE_NGINX = 1 ] && run 64k nginx $round -- "${KEEP[@]}" --http-version 1.1 "$NGXURL/big/x"
  run 64k gateway $round -- "${KEEP[@]}" --http-version 1.1 -H "$AUTH" "$GWURL/big/x"

  run refresh gateway $round -- "${KEEP[@]}" --http-version 1.1 -m POST -a bench:bench-secret \
    -T application/x-www-form-urlencoded -d "grant_type=refresh_token&refresh_token=$REFRESH" "$GWURL/api/oauth/token"
done

echo "== password grant against the raw argon2 cost" >&2
ARGON=$(taskset -c $SERVER_CPU target/release/examples/argon2_rate 3)
run password gateway 1 -- -z "$DURATION" -c 8 --insecure --http-version 1.1 -m POST -a bench:bench-secret \
  -T application/x-www-form-urlencoded -d "grant_type=password&username=bench%40example.com&password=bench-password" "$GWURL/api/oauth/token"

# Latency at a fixed rate: half of the slower system's HTTP/1.1 capacity, with oha's
# latency correction (coordinated omission), so p99 compares like with like.
RATE=$(python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def rps(t):
    v = [r["oha"].get("summary", {}).get("requestsPerSec", 0) for r in rows if r["scenario"] == "h1" and r["target"] == t]
    return sum(v) / len(v) if v else 0
caps = [c for c in (rps("nginx"), rps("gateway")) if c > 0]
print(max(100, int(min(caps) / 2)) if caps else 1000)
PY
)
echo "== fixed rate: $RATE req/s" >&2
# The same request count for both at a fixed rate makes CPU time per request the
# steadiest measure of what each proxy costs (throughput at saturation also depends on
# how the scheduler interleaves proxy and upstream on their shared core).
NGX_WORKER=$([ $HAVE_NGINX = 1 ] && pgrep -P "$(cat "$WORK/nginx.pid")" | head -1 || true)
for round in $(seq 1 "$ROUNDS"); do
  [ $HAVE_NGINX = 1 ] && CPU_PID=$NGX_WORKER run fixed nginx $round -- -z "$DURATION" -c "$CONCURRENCY" -q "$RATE" --latency-correction --insecure --http-version 1.1 "$NGXURL/api/v1/x"
  CPU_PID=$GW_PID run fixed gateway $round -- -z "$DURATION" -c "$CONCURRENCY" -q "$RATE" --latency-correction --insecure --http-version 1.1 -H "$AUTH" "$GWURL/api/v1/x"
done

RSS_KB=$(awk '/VmRSS/ {print $2}' "/proc/$GW_PID/status" 2>/dev/null || echo 0)
python3 bench/report.py "$RESULTS" --rss-kb "$RSS_KB" --argon "$ARGON" --rate "$RATE" --build "${BUILD:-release}" \
  --machine "$(nproc) cores, $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | sed 's/^ *//')"
