#!/usr/bin/env bash
# One site: a SuperNode that authenticates with its key and trains on its partition of the data.
#   deploy/start_supernode.sh CREDENTIALS_DIR PARTITION_ID NUM_PARTITIONS SUPERLINK_HOST:PORT [PORT]
# PORT (default 9094 + PARTITION_ID) is the SuperNode's local port for its ClientApp process; sites on one
# machine need different ones. exec: this script's PID is the SuperNode's.
set -euo pipefail
CREDENTIALS="${1:?usage: start_supernode.sh CREDENTIALS_DIR PARTITION_ID NUM_PARTITIONS SUPERLINK_HOST:PORT [PORT]}"
PARTITION_ID="${2:?partition id missing}"
NUM_PARTITIONS="${3:?number of partitions missing}"
SUPERLINK="${4:?SuperLink address missing}"
PORT="${5:-$((9094 + PARTITION_ID))}"
export FLWR_HOME="${FLWR_HOME:-$(cd "$(dirname "$0")/.." && pwd)/.flwr_home}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec flower-supernode --superlink "$SUPERLINK" --root-certificates "$CREDENTIALS/ca.crt" \
  --auth-supernode-private-key "$CREDENTIALS/supernode-$PARTITION_ID" \
  --node-config "partition-id=$PARTITION_ID num-partitions=$NUM_PARTITIONS" --port "$PORT"
