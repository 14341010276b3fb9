#!/usr/bin/env bash
# Start a local multi-node Ray cluster on loopback: a head (GCS + dashboard with the Jobs and State APIs on
# 127.0.0.1, token authentication on) and a second `ray start --address` worker node.
#
#   cluster/local/start.sh [STATE_DIR]      # default STATE_DIR: ./.ray-local
#   towerlab submit train recipes/debug.yaml --address "$(cat .ray-local/address)" \
#       --token-file .ray-local/token --tracking-uri http://127.0.0.1:5000 --follow
#   cluster/local/stop.sh [STATE_DIR]
#
# Each node runs `ray start --block` in its own process group (setsid); STATE_DIR/pids holds the group ids, so
# stop.sh ends exactly these nodes (a global `ray stop` would also kill every other Ray on the machine).
# Environment: RAY (the ray executable; default: the one on PATH), HEAD_CPUS (4), WORKER_CPUS (4), PORT,
# DASHBOARD_PORT (free ports when unset), RAY_AUTH_TOKEN (a fresh one when unset), TIMEOUT (120 s).
set -euo pipefail

STATE=${1:-.ray-local}
RAY=${RAY:-$(command -v ray || true)}
[ -x "$RAY" ] || { echo "error: no ray executable (install ray[default] or set RAY=/path/to/ray)" >&2; exit 2; }
BIN=$(cd "$(dirname "$RAY")" && pwd)
PY="$BIN/python"
[ -x "$PY" ] || PY=python3
# Job drivers run `python -m towerlab.cli` in the nodes' environment: the Ray installation's bin comes first.
export PATH="$BIN:$PATH"

mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
if [ -s "$STATE/pids" ]; then
  echo "error: $STATE/pids exists: a cluster may still run; stop it with cluster/local/stop.sh $STATE" >&2
  exit 2
fi

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

PORT=${PORT:-$(free_port)}
DASHBOARD_PORT=${DASHBOARD_PORT:-$(free_port)}
TOKEN=${RAY_AUTH_TOKEN:-$("$PY" -c 'import secrets; print(secrets.token_hex(32))')}
umask 077
printf '%s\n' "$TOKEN" > "$STATE/token"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$TOKEN"
unset RAY_ADDRESS

# Every port a node listens on is chosen here, so two clusters (or a test session's) never collide on defaults.
start_node() {  # name, ray start args...
  local name=$1; shift
  local args=(--block --disable-usage-stats --node-ip-address=127.0.0.1
    --node-manager-port="$(free_port)" --object-manager-port="$(free_port)"
    --dashboard-agent-listen-port="$(free_port)" --dashboard-agent-grpc-port="$(free_port)"
    --runtime-env-agent-port="$(free_port)" --metrics-export-port="$(free_port)" "$@")
  (
    # The nodes must not inherit this script's other descriptors: under `flock LOCK start.sh` they would hold
    # the lock for as long as the cluster lives.
    for fd in $(ls /proc/$BASHPID/fd); do [ "$fd" -gt 2 ] && eval "exec $fd>&-"; done
    exec setsid "$RAY" start "${args[@]}" > "$STATE/$name.log" 2>&1 < /dev/null
  ) &
  echo "$!" >> "$STATE/pids"
}

start_node head --head --port="$PORT" --num-cpus="${HEAD_CPUS:-4}" --include-dashboard=true \
  --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port="$(free_port)"

DEADLINE=$(( $(date +%s) + ${TIMEOUT:-120} ))
wait_for() {  # description, command...
  local what=$1; shift
  until "$@" > /dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$DEADLINE" ]; then
      echo "error: $what did not come up within ${TIMEOUT:-120}s (logs in $STATE)" >&2
      "$(dirname "$0")/stop.sh" "$STATE" >&2 || true
      exit 1
    fi
    sleep 1
  done
}
# any HTTP answer counts (401 without a token): the dashboard is serving
wait_for "the head's dashboard" "$PY" -c "
import urllib.error, urllib.request
try:
    urllib.request.urlopen('http://127.0.0.1:$DASHBOARD_PORT/api/version', timeout=2)
except urllib.error.HTTPError:
    pass"

start_node worker --address="127.0.0.1:$PORT" --num-cpus="${WORKER_CPUS:-4}"

# Two alive nodes in the GCS: the worker joined.
wait_for "the worker node" "$PY" - <<PYEOF
import ray
ray.init(address="127.0.0.1:$PORT", logging_level="ERROR", log_to_driver=False)
alive = sum(1 for n in ray.nodes() if n["Alive"])
raise SystemExit(0 if alive >= 2 else 1)
PYEOF

echo "127.0.0.1:$PORT" > "$STATE/gcs"
echo "http://127.0.0.1:$DASHBOARD_PORT" > "$STATE/address"
echo "Ray cluster up: 2 nodes, dashboard $(cat "$STATE/address"), GCS $(cat "$STATE/gcs"), token in $STATE/token"
