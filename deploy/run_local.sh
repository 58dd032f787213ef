#!/usr/bin/env bash
# Federated private fine-tuning, simulated locally (3 sites by default), with a verdict: exits 0 only if
# the Flower run finished as completed. `flwr run --stream` alone exits 0 even when the run failed.
#
#   deploy/run_local.sh                                       # pyproject.toml's run config
#   deploy/run_local.sh --run-config "num-server-rounds=1"    # extra arguments go to `flwr run`
#
# Environment: DPMEMARC_SITES (simulated sites, default 3), FLWR_HOME (default <repo>/.flwr_home),
# FLWR_LOCAL_SUPERLINK_HTTP_API_PORT (default 39091). Results: <repo>/runs/federated unless the run
# config sets output-dir. The script starts its own SuperLink and stops it when it exits.
set -euo pipefail
cd "$(dirname "$0")/.."

export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr_home}"
# Otherwise the SuperLink re-installs the app's dependencies (a CUDA torch) into a fresh environment per run.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT="${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39091}"
PORT="$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"
SITES="${DPMEMARC_SITES:-3}"
STATE="$FLWR_HOME/local-superlink"
mkdir -p "$STATE"

if [ ! -f "$FLWR_HOME/config.toml" ]; then
  cat > "$FLWR_HOME/config.toml" <<'EOF'
[superlink]
default = "local"

[superlink.local]
address = ":local:"
EOF
fi

health() { python3 -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null; }

if health; then
  echo "run_local: a SuperLink already answers on 127.0.0.1:$PORT (not started by this script)." >&2
  echo "run_local: stop it, or set FLWR_LOCAL_SUPERLINK_HTTP_API_PORT to a free port." >&2
  exit 2
fi

# The same SuperLink `flwr run` would start for the ":local:" connection, but started here so that this
# script knows its PID and stops it (flwr leaves its own running in the background).
flower-superlink --insecure --simulation --isolation subprocess --host 127.0.0.1 --port "$PORT" \
  --database "$STATE/state.db" --disable-runtime-dependency-installation > "$STATE/superlink.log" 2>&1 &
SUPERLINK_PID=$!
stop_superlink() { kill "$SUPERLINK_PID" 2>/dev/null || true; wait "$SUPERLINK_PID" 2>/dev/null || true; }
trap stop_superlink EXIT

for _ in $(seq 1 120); do
  health && break
  if ! kill -0 "$SUPERLINK_PID" 2>/dev/null; then
    echo "run_local: the SuperLink exited at start-up; its log ($STATE/superlink.log):" >&2
    tail -n 30 "$STATE/superlink.log" >&2
    exit 1
  fi
  sleep 0.5
done
health || { echo "run_local: the SuperLink did not answer within 60 s; see $STATE/superlink.log" >&2; exit 1; }

deploy/flwr_run_checked.sh local --federation-config "num-supernodes=$SITES" \
  --run-config "output-dir='$PWD/runs/federated'" "$@"
