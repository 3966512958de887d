#!/usr/bin/env bash
# A profile-guided (PGO) release build of the gateway: target/pgo/covata-gateway.
#
# Builds an instrumented binary, runs it behind two demo upstreams under about forty
# seconds of the benchmark's kinds of traffic (HTTP/1.1 and HTTP/2 keep-alive, a new
# TLS connection per request, 64 KiB responses, uploads, refused tokens, the token
# endpoint's grants), merges the counts and builds again with them. The compiler then
# inlines and lays out the code for the paths those requests take: the same source,
# arranged differently. Paths the training does not take (upstreams over TLS,
# WebSocket, the sign-in page, the admin listener) are optimised for size instead, and
# may be slower than in the plain build; nothing measures them.
#
# Needs the llvm-profdata matching the compiler: rustup component add llvm-tools-preview
# Usage: bench/pgo.sh        (prints the binary's path; about four minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."

. bench/common.sh
need oha "cargo install oha --locked"
need curl "apt-get install curl"
need python3 "apt-get install python3"
PROFDATA="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | awk '/^host:/ {print $2}')/bin/llvm-profdata"
[ -x "$PROFDATA" ] || { echo "bench: llvm-profdata is needed (rustup component add llvm-tools-preview)" >&2; exit 2; }

PROFILES=$PWD/target/pgo-profiles
OUT=$PWD/target/pgo
rm -rf "$PROFILES"; mkdir -p "$PROFILES" "$OUT"

echo "== pgo: instrumented build" >&2
# RUSTFLAGS from the environment are kept; as always with RUSTFLAGS set, cargo then
# ignores `build.rustflags` from its config files.
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$PROFILES/raw" \
  cargo build --release --quiet --bin covata-gateway --target-dir target/pgo-generate
GEN=$PWD/target/pgo-generate/release/covata-gateway
# Build scripts ran instrumented too and left their own counts: not the gateway's.
rm -rf "$PROFILES/raw"

echo "== pgo: training" >&2
UP=$(free_port); UP64=$(free_port); GW=$(free_port)
# The upstreams are the same binary; their counts go elsewhere so that only the
# gateway's requests shape the build.
LLVM_PROFILE_FILE="$WORK/upstream-%p.profraw" "$GEN" demo-upstream --listen 127.0.0.1:$UP --body-size 64 >"$WORK/up.log" 2>&1 & PIDS+=($!)
LLVM_PROFILE_FILE="$WORK/upstream-%p.profraw" "$GEN" demo-upstream --listen 127.0.0.1:$UP64 --body-size 65536 >"$WORK/up64.log" 2>&1 & PIDS+=($!)
LLVM_PROFILE_FILE="$WORK/hash-%p.profraw" bench_config "$GEN" $GW $UP $UP64 >"$WORK/gateway.toml"
# The gateway as it runs by default: a worker per core, logging at info (refused
# requests are logged).
LLVM_PROFILE_FILE="$PROFILES/raw/gateway-%p.profraw" \
  "$GEN" --config "$WORK/gateway.toml" >"$WORK/gateway.log" 2>&1 & GW_PID=$!; PIDS+=($GW_PID)
wait_port $UP; wait_port $UP64; wait_port $GW
bench_tokens $GW
URL=https://127.0.0.1:$GW
AUTH="Authorization: Bearer $ACCESS"
head -c 16384 /dev/zero | tr '\0' 'x' >"$WORK/upload"
train() { # expected status -- oha args: a run in which every answer has that status
  local expect=$1; shift 2
  oha --no-tui --insecure --output-format json "$@" >"$WORK/oha.json" 2>"$WORK/oha.err" &&
    python3 - "$expect" "$WORK/oha.json" <<'PY' && return 0
import json, sys
expect, path = sys.argv[1], sys.argv[2]
codes = json.load(open(path)).get("statusCodeDistribution", {})
if not codes or set(codes) != {expect}:
    sys.exit(f"bench: the training expected only {expect} answers, got {codes}")
PY
  echo "bench: a training run failed (oha $*)" >&2
  cat "$WORK/oha.err" >&2
  tail -n 20 "$WORK/gateway.log" >&2
  exit 1
}
train 200 -- -z 6s -c 50 --http-version 1.1 -H "$AUTH" "$URL/api/v1/x"
train 200 -- -z 6s -c 50 --http2 -H "$AUTH" "$URL/api/v1/x"
train 200 -- -z 3s -c 8 --disable-keepalive -H "$AUTH" "$URL/api/v1/x"
train 200 -- -z 3s -c 20 --http-version 1.1 -H "$AUTH" "$URL/big/x"
train 200 -- -z 3s -c 20 --http2 -H "$AUTH" "$URL/big/x"
train 200 -- -z 3s -c 20 --http-version 1.1 -m POST -H "$AUTH" -D "$WORK/upload" "$URL/api/v1/upload"
train 200 -- -z 3s -c 20 --http2 -m PUT -H "$AUTH" -D "$WORK/upload" "$URL/api/v1/upload"
train 401 -- -z 2s -c 20 --http-version 1.1 -H "Authorization: Bearer not-a-token" "$URL/api/v1/x"
train 401 -- -z 2s -c 20 --http-version 1.1 "$URL/api/v1/x"
train 200 -- -z 3s -c 20 --http-version 1.1 -m POST -a bench:bench-secret -T application/x-www-form-urlencoded \
  -d "grant_type=refresh_token&refresh_token=$REFRESH" "$URL/api/oauth/token"
train 200 -- -n 40 -c 4 --http-version 1.1 -m POST -a bench:bench-secret -T application/x-www-form-urlencoded \
  -d "grant_type=password&username=bench%40example.com&password=bench-password" "$URL/api/oauth/token"
# A graceful stop: the counts are written as the process exits.
kill -TERM $GW_PID; wait $GW_PID || true
for i in "${!PIDS[@]}"; do if [ "${PIDS[$i]}" = "$GW_PID" ]; then unset "PIDS[$i]"; fi; done
ls "$PROFILES"/raw/gateway-*.profraw >/dev/null 2>&1 || { echo "bench: the training wrote no profile" >&2; exit 1; }
"$PROFDATA" merge -o "$PROFILES/gateway.profdata" "$PROFILES"/raw

echo "== pgo: optimised build" >&2
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PROFILES/gateway.profdata" \
  cargo build --release --quiet --bin covata-gateway --target-dir target/pgo-use
cp target/pgo-use/release/covata-gateway "$OUT/covata-gateway"
echo "$OUT/covata-gateway"
