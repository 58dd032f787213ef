#!/usr/bin/env bash
# A SuperLink with TLS and SuperNode authentication (credentials from make_credentials.py).
#   deploy/start_superlink.sh CREDENTIALS_DIR [PORT]        (default port 9091; host: $SUPERLINK_HOST or 127.0.0.1)
# Every API (Fleet for SuperNodes, Control for `flwr`) is served on this one port. Register each SuperNode's
# public key before it connects: flwr supernode register CREDENTIALS_DIR/supernode-<i>.pub <connection>.
# exec: the PID of this script is the SuperLink's, so whoever started it can stop it by that PID.
set -euo pipefail
CREDENTIALS="${1:?usage: start_superlink.sh CREDENTIALS_DIR [PORT]}"
PORT="${2:-9091}"
export FLWR_HOME="${FLWR_HOME:-$(cd "$(dirname "$0")/.." && pwd)/.flwr_home}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p "$FLWR_HOME/deploy-superlink"
exec flower-superlink \
  --ssl-ca-certfile "$CREDENTIALS/ca.crt" --ssl-certfile "$CREDENTIALS/server.pem" --ssl-keyfile "$CREDENTIALS/server.key" \
  --enable-supernode-auth --host "${SUPERLINK_HOST:-127.0.0.1}" --port "$PORT" \
  --database "$FLWR_HOME/deploy-superlink/state.db" --disable-runtime-dependency-installation
