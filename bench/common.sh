# Shared by bench/run.sh and bench/instructions.sh (sourced, not run).

need() { command -v "$1" >/dev/null 2>&1 || { echo "bench: $1 is needed ($2)" >&2; exit 2; }; }

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

# The benchmark's client (bench / bench-secret) and user (bench@example.com /
# bench-password) as gateway config, hashed with the gateway binary $1.
bench_identities() {
  local client_hash user_hash
  client_hash=$(printf 'bench-secret\n' | "$1" hash-password)
  user_hash=$(printf 'bench-password\n' | "$1" hash-password)
  cat <<TOML
[[clients]]
client_id = "bench"
client_secret = "$client_hash"
authorized_grant_types = ["password", "refresh_token"]
[[users]]
username = "bench@example.com"
password = "$user_hash"
roles = ["ROLE_COLLABORATOR"]
TOML
}
