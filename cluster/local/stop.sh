#!/usr/bin/env bash
# Stop the cluster that cluster/local/start.sh STATE_DIR started: SIGTERM each node's process group (the
# `ray start --block` process and everything it spawned: raylet, GCS, dashboard, workers), wait, then SIGKILL
# what is left. Nothing else on the machine is touched.
#
#   cluster/local/stop.sh [STATE_DIR]      # default STATE_DIR: ./.ray-local
set -uo pipefail

STATE=${1:-.ray-local}
PIDS="$STATE/pids"
[ -f "$PIDS" ] || { echo "no cluster recorded in $STATE (nothing to stop)"; exit 0; }

# a group is alive while it has a process that is not a zombie (an unreaped child of start.sh is one)
alive() {
  local g
  for g in "$@"; do
    ps -eo pgid=,stat= | awk -v g="$g" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}' && return 0
  done
  return 1
}

mapfile -t GROUPS_ < <(tac "$PIDS")   # workers first, the head last
for g in "${GROUPS_[@]}"; do kill -TERM -- "-$g" 2> /dev/null || true; done
for _ in $(seq 1 ${TIMEOUT:-30}); do
  alive "${GROUPS_[@]}" || break
  sleep 1
done
for g in "${GROUPS_[@]}"; do kill -KILL -- "-$g" 2> /dev/null || true; done
sleep 1
if alive "${GROUPS_[@]}"; then
  echo "error: processes of $STATE's cluster survived SIGKILL" >&2
  exit 1
fi
rm -f "$PIDS" "$STATE/address" "$STATE/gcs" "$STATE/token"
echo "Ray cluster of $STATE stopped"
