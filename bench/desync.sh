#!/usr/bin/env bash
# How many wrong answers does one misbehaving upstream exchange cost, behind nginx and
# behind the gateway?
#
# For each mode and round: a fresh misbehaving upstream (examples/desync.rs, the one of
# tests/pool_desync.rs) that answers every request with its tag and user, and once,
# after AFTER requests, sends bytes nobody asked for a little after a complete answer:
#   late-response  the same whole response again, 150 ms later
#   head-body      a HEAD answer's body, 50 ms after its head
#   204-body       a body after a 204, 50 ms later
#   trailing-junk  junk bytes after a GET's answer, 50 ms later
# then nginx (a TLS reverse proxy with an upstream keepalive pool of 32) and the gateway
# (release build) in front of it in turn, each under the same load: CONCURRENCY
# keep-alive HTTP/1.1 clients of four users, every request tagged, at most REQUESTS
# requests or RUN_SECONDS seconds. Counted per run (one misbehaving exchange each):
# answers naming another request (wrong), another user (cross-user), and no answer
# (failed); and, from the upstream, how long the misbehaving connection stayed in use
# and whether each request it carried could have been spared by a check before reuse.
#
# Usage: bench/desync.sh [--quick]
#   env: ROUNDS=3 MODES="late-response head-body 204-body trailing-junk"
#        TARGETS="nginx gateway" CONCURRENCY=32 REQUESTS=20000 RUN_SECONDS=8 AFTER=2000
#        LATENCY_MS=1 (how long the upstream takes over each answer; from a few ms on,
#          a connection put one answer behind stays behind while the load lasts)
#        GATEWAY_UPSTREAM_KEYS='pool_partition = "principal"' (added to [upstream])
#        GATEWAY_ROUTE_KEYS='keepalive = false' (added to the gateway's route)
#        OUT=file.jsonl (keep the raw results)
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
MODES=${MODES:-late-response head-body 204-body trailing-junk}
TARGETS=${TARGETS:-nginx gateway}
CONCURRENCY=${CONCURRENCY:-32}
REQUESTS=${REQUESTS:-20000}
SECONDS_PER_RUN=${RUN_SECONDS:-8}
AFTER=${AFTER:-2000}
LATENCY_MS=${LATENCY_MS:-1}
if [ "${1:-}" = "--quick" ]; then ROUNDS=1; SECONDS_PER_RUN=4; REQUESTS=10000; AFTER=1000; fi

. bench/common.sh
need curl "apt-get install curl"
need python3 "apt-get install python3"
need taskset "apt-get install util-linux"
need setsid "apt-get install util-linux"
case " $TARGETS " in
  *" nginx "*) need nginx "apt-get install nginx-light" ;;
esac

CORES=$(nproc)
SERVER_CPU=0
CLIENT_CPU=$(( CORES > 1 ? 1 : 0 ))
# As in bench/run.sh: the proxies and the upstream on one core, one worker thread each
# (nginx's one worker), each in its own session; the load on the other core.
export TOKIO_WORKER_THREADS=${TOKIO_WORKER_THREADS:-1}
SERVE="setsid taskset -c $SERVER_CPU"

echo "== building the release binary and examples/desync" >&2
cargo build --release --quiet --bin covata-gateway --example desync
BIN=$PWD/target/release/covata-gateway
DESYNC=$PWD/target/release/examples/desync

USERS=(bench@example.com desync2@example.com desync3@example.com desync4@example.com)
USER_HASH=$(printf 'bench-password\n' | "$BIN" hash-password)

# Stops process $1 (one this script started): SIGTERM, then SIGKILL after 5 s; it
# leaves PIDS, so that the cleanup never signals a number the system gave out again.
stop_pid() {
  local pid keep=()
  for pid in "${PIDS[@]}"; do [ "$pid" = "$1" ] || keep+=("$pid"); done
  PIDS=("${keep[@]}")
  kill "$1" 2>/dev/null || return 0
  for _ in $(seq 1 50); do
    kill -0 "$1" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# The gateway's config on port $1 in front of the upstream on port $2.
gateway_config() {
  bench_config "$BIN" "$1" "$2" "$2"
  # Right after bench_config's last route (/**): keys for that route.
  printf '%s\n' "${GATEWAY_ROUTE_KEYS:-}"
  for user in "${USERS[@]:1}"; do
    printf '[[users]]\nusername = "%s"\npassword = "%s"\nroles = ["ROLE_COLLABORATOR"]\n' "$user" "$USER_HASH"
  done
  printf '[upstream]\nresponse_timeout = "5s"\n%s\n' "${GATEWAY_UPSTREAM_KEYS:-}"
}

nginx_config() { # port upstream-port
  mkdir -p "$WORK/nginx"
  # As root, nginx would hand its worker to nobody: it stays with the current user.
  [ "$(id -u)" = 0 ] && echo "user $(id -un);"
  cat <<NGINX
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
  upstream desync { server 127.0.0.1:$2; keepalive 32; }
  server {
    listen 127.0.0.1:$1 ssl;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate $WORK/gateway.crt;
    ssl_certificate_key $WORK/gateway.key;
    keepalive_requests 1000000;
    location / {
      proxy_pass http://desync;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      # An answer nginx cannot parse is passed on as HTTP/0.9 until the upstream closes:
      # bounded here.
      proxy_connect_timeout 2s;
      proxy_read_timeout 5s;
    }
  }
}
NGINX
}

# One password grant per user from the gateway on port $1: sets TOKEN_ARGS.
gateway_tokens() {
  TOKEN_ARGS=()
  local user json
  for user in "${USERS[@]}"; do
    json=$(curl -sfk --max-time 10 "https://127.0.0.1:$1/api/oauth/token" -u bench:bench-secret \
      -d grant_type=password --data-urlencode "username=$user" -d password=bench-password) ||
      { echo "bench: the gateway gave $user no token" >&2; exit 1; }
    TOKEN_ARGS+=(--token "$user=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])' <<<"$json")")
  done
}

# The certificate pair nginx shares: the gateway writes it at its first start.
GW=$(free_port)
gateway_config "$GW" "$(free_port)" >"$WORK/gateway.toml"
RUST_LOG=warn $SERVE "$BIN" --config "$WORK/gateway.toml" >"$WORK/gateway.log" 2>&1 & GW_PID=$!; PIDS+=($GW_PID)
wait_port "$GW"
stop_pid "$GW_PID"

RESULTS=${OUT:-$WORK/results.jsonl}
: >"$RESULTS"

run_one() { # target mode round
  local target=$1 mode=$2 round=$3 up port proxy_pid up_pid
  up=$(free_port)
  $SERVE "$DESYNC" upstream --mode "$mode" --listen "127.0.0.1:$up" --after "$AFTER" \
    --latency-ms "$LATENCY_MS" --lifetime $((SECONDS_PER_RUN + 120)) >"$WORK/upstream.log" 2>&1 & up_pid=$!; PIDS+=($up_pid)
  wait_port "$up"
  port=$(free_port)
  local principals=()
  case $target in
    nginx)
      nginx_config "$port" "$up" >"$WORK/nginx.conf"
      $SERVE nginx -c "$WORK/nginx.conf" -g 'daemon off;' -e "$WORK/nginx/error.log" & proxy_pid=$!; PIDS+=($proxy_pid)
      wait_port "$port"
      for user in "${USERS[@]}"; do principals+=(--user "$user"); done
      ;;
    gateway)
      gateway_config "$port" "$up" >"$WORK/gateway.toml"
      RUST_LOG=warn $SERVE "$BIN" --config "$WORK/gateway.toml" >>"$WORK/gateway.log" 2>&1 & proxy_pid=$!; PIDS+=($proxy_pid)
      wait_port "$port"
      gateway_tokens "$port"
      principals=("${TOKEN_ARGS[@]}")
      ;;
    *) echo "bench: TARGETS are nginx and gateway, not $target" >&2; exit 2 ;;
  esac
  echo "== $target, $mode, round $round" >&2
  taskset -c $CLIENT_CPU timeout $((SECONDS_PER_RUN + 30)) "$DESYNC" client --url "https://127.0.0.1:$port" \
    --ca "$WORK/gateway.crt" --mode "$mode" "${principals[@]}" --concurrency "$CONCURRENCY" \
    --requests "$REQUESTS" --seconds "$SECONDS_PER_RUN" --upstream "127.0.0.1:$up" \
    --label "$target" --round "$round" >>"$RESULTS" || echo "bench: the load against $target failed" >&2
  stop_pid "$proxy_pid"
  stop_pid "$up_pid"
}

for round in $(seq 1 "$ROUNDS"); do
  for mode in $MODES; do
    for target in $TARGETS; do
      run_one "$target" "$mode" "$round"
    done
  done
done

python3 - "$RESULTS" "$CONCURRENCY" "$LATENCY_MS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"""
One misbehaving exchange per run; {sys.argv[2]} clients of 4 users; upstream latency {sys.argv[3]} ms.
wrong (cross-user) / failed: answers naming another request (another user) / no answer
  (the proxy's error, a timeout).
landed: where the late bytes found the connection: w = a request waiting on it, i = idle.
after: requests the misbehaving connection carried after the late bytes, as p/r/u:
  p = sent while unread bytes had waited >= 250 us in the proxy's buffer (a check before
  reuse would have seen them), r = sent within 250 us of their coming, u = sent before
  they came (no check can see them).
peek: wrong answers a proxy checking exactly (MSG_PEEK) before each reuse would about
  have given: the request being answered when the bytes came, and the r/u before the
  first p.
open at the end: the misbehaving connection was still in use when the load stopped
  (its count is cut short by the run's length).
""")
print("| mode | proxy | wrong (cross-user) / failed, per run | landed | after (p/r/u) | peek | open at the end | requests |")
print("|---|---|---|---|---|---|---|---|")
groups = {}
for r in rows:
    groups.setdefault((r["mode"], r["label"]), []).append(r)
for (mode, label), runs in groups.items():
    ups = [r.get("upstream") or {} for r in runs]
    counts = ", ".join(f'{r["wrong"]} ({r["cross_user"]}) / {r["failed"]}' for r in runs)
    landed = " ".join({True: "w", False: "i"}.get(u.get("late_landed_in_flight"), "-") for u in ups)
    after = ", ".join(
        f'{u.get("requests_after_late", "?")} ({u.get("after_late_peekable", "?")}/{u.get("after_late_raced", "?")}/{u.get("after_late_unpeekable", "?")})'
        for u in ups)
    peek = ", ".join(str(u.get("wrong_with_exact_peeks", "?")) for u in ups)
    still = " ".join("y" if u.get("late_written_ms") and not u.get("closed_ms") else "n" for u in ups)
    reqs = ", ".join(str(r["requests"]) for r in runs)
    print(f"| {mode} | {label} | {counts} | {landed} | {after} | {peek} | {still} | {reqs} |")
fails = {}
for r in rows:
    for why, n in r.get("failures", {}).items():
        key = f'{r["mode"]} {r["label"]}'
        fails.setdefault(key, {}).setdefault(why, 0)
        fails[key][why] += n
if fails:
    print("\nFailures: " + "; ".join(f"{k}: {d}" for k, d in fails.items()))
waits = [(r["mode"], r["label"], r["upstream"].get("after_late_gaps_us"))
         for r in rows if (r.get("upstream") or {}).get("after_late_peekable")]
for mode, label, gaps in waits:
    print(f"{label}, {mode}: unread bytes waited {gaps} us before requests were sent on them")
PY
