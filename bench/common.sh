# Shared by bench/run.sh, bench/instructions.sh and bench/pgo.sh (sourced, not run).

need() { command -v "$1" >/dev/null 2>&1 || { echo "bench: $1 is needed ($2)" >&2; exit 2; }; }

wait_port() { for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "bench: nothing listens on $1" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

# A scratch directory and the background processes to stop when the script ends.
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# The benchmark gateway's config on port $2, in front of the 64-byte upstream on $3
# (every path) and the 64 KiB one on $4 (/big/**), with the benchmark's client
# (bench / bench-secret) and user (bench@example.com / bench-password), hashed with
# the gateway binary $1.
bench_config() {
  local client_hash user_hash
  client_hash=$(printf 'bench-secret\n' | "$1" hash-password)
  user_hash=$(printf 'bench-password\n' | "$1" hash-password)
  cat <<TOML
[server]
listen = "127.0.0.1:$2"
tls_cert = "gateway.crt"
tls_key = "gateway.key"
[admin]
listen = "127.0.0.1:0"
[security]
max_failed_logins = 4000000000
[tokens]
# oha repeats one request body, so the refresh benchmark presents one refresh token
# again and again: the grace period lets every presentation rotate instead of revoking.
refresh_reuse_grace = "1h"
max_families_per_user = 100000000
# The refresh runs issue two records per request, tens of thousands a second: room
# for all of them, so the cap (503) never decides a result.
max_live_tokens = 50000000
[[clients]]
client_id = "bench"
client_secret = "$client_hash"
authorized_grant_types = ["password", "refresh_token"]
[[users]]
username = "bench@example.com"
password = "$user_hash"
roles = ["ROLE_COLLABORATOR"]
[[routes]]
path = "/big/**"
upstream = "http://127.0.0.1:$4"
# The same upstream, its pooled connections kept to one principal each: what that costs.
[[routes]]
path = "/partitioned/**"
upstream = "http://127.0.0.1:$3"
pool_partition = "principal"
[[routes]]
path = "/**"
upstream = "http://127.0.0.1:$3"
TOML
}

# A password grant for the benchmark user from the gateway on port $1: sets ACCESS and
# REFRESH.
bench_tokens() {
  local tokens
  tokens=$(curl -sfk "https://127.0.0.1:$1/api/oauth/token" -u bench:bench-secret \
    -d grant_type=password -d username=bench@example.com -d password=bench-password) ||
    { echo "bench: the gateway on port $1 gave no token" >&2; exit 1; }
  ACCESS=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])' <<<"$tokens")
  REFRESH=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["refresh_token"])' <<<"$tokens")
}

# The gateway binary to measure, by $BUILD: the plain release build $1 (release, the
# default), or a profile-guided one that bench/pgo.sh builds afresh (pgo).
gateway_binary() {
  case ${BUILD:-release} in
    release) echo "$1" ;;
    pgo) bench/pgo.sh | tail -1 ;;
    *) echo "bench: BUILD is release or pgo, not $BUILD" >&2; exit 2 ;;
  esac
}
