#!/usr/bin/env bash
# One real site: a SuperNode that authenticates with the site's own key and trains on the site's own file.
#   deploy/start_site.sh PRIVATE_KEY CA_CERT DATA_PATH SUPERLINK_HOST:PORT [PORT] [STATE_DIR]
# DATA_PATH: JSON Lines, CSV, Parquet or a datasets save_to_disk folder (docs/FEDERATED.md, "A site with its own
# file"); it never leaves this machine. STATE_DIR (default ~/.cache/dpmemarc/site-state) keeps the site's privacy
# accountant across runs: keep it. PORT (default 9094) is the SuperNode's local port for its ClientApp process.
# exec: this script's PID is the SuperNode's.
set -euo pipefail
USAGE="usage: start_site.sh PRIVATE_KEY CA_CERT DATA_PATH SUPERLINK_HOST:PORT [PORT] [STATE_DIR]"
KEY="${1:?$USAGE}"
CA="${2:?$USAGE}"
DATA="${3:?$USAGE}"
SUPERLINK="${4:?$USAGE}"
PORT="${5:-9094}"
STATE_DIR="${6:-$HOME/.cache/dpmemarc/site-state}"
[ -e "$DATA" ] || { echo "start_site: $DATA does not exist" >&2; exit 2; }
DATA="$(cd "$(dirname "$DATA")" && pwd)/$(basename "$DATA")"
case "$DATA$STATE_DIR" in *[[:space:]\"]*) echo "start_site: paths may not hold spaces or quotes" >&2; exit 2;; esac
export FLWR_HOME="${FLWR_HOME:-$(cd "$(dirname "$0")/.." && pwd)/.flwr_home}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec flower-supernode --superlink "$SUPERLINK" --root-certificates "$CA" --auth-supernode-private-key "$KEY" \
  --node-config "data-path=\"$DATA\" state-dir=\"$STATE_DIR\"" --port "$PORT"
