#!/usr/bin/env bash
# `flwr run . CONNECTION --stream ARGS...` from the repository root, then the run's final status from
# `flwr list`: exits 0 only if the run finished as completed (`flwr run --stream` exits 0 either way).
#   deploy/flwr_run_checked.sh CONNECTION [flwr run arguments]
set -euo pipefail
CONNECTION="${1:?usage: flwr_run_checked.sh CONNECTION [flwr run arguments]}"
shift
cd "$(dirname "$0")/.."
LOG="$(mktemp "${TMPDIR:-/tmp}/dpmemarc-run.XXXXXX")"
trap 'rm -f "$LOG"' EXIT

flwr run . "$CONNECTION" --stream "$@" 2>&1 | tee "$LOG"
RUN_ID="$(sed -n 's/.*Successfully started run \([0-9][0-9]*\).*/\1/p' "$LOG" | head -n 1)"
if [ -z "$RUN_ID" ]; then
  echo "dpmemarc: FAILED: the run did not start (see the output above)." >&2
  exit 1
fi
VERDICT="$(flwr list "$CONNECTION" --run-id "$RUN_ID" --format json | python3 -c '
import json, sys
runs = json.load(sys.stdin).get("runs") or [{}]
print(runs[0].get("status", "unknown"), "|", runs[0].get("status-details", ""))')"
STATUS="${VERDICT%% |*}"
if [ "$STATUS" != "finished:completed" ]; then
  echo "dpmemarc: FAILED: run $RUN_ID ended as '$STATUS' (${VERDICT#*| }); the ServerApp's error is in the log above." >&2
  exit 1
fi
echo "dpmemarc: run $RUN_ID completed."
