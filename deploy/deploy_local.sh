#!/usr/bin/env bash
# A real deployment on this machine's loopback: a SuperLink with TLS and SuperNode authentication, one
# authenticated SuperNode per site (each with its partition-id, or its own file), then the run with a verdict
# (exit 0 only if it completed). Every process this script starts is stopped by its PID when it exits.
#
#   deploy/deploy_local.sh                                      # pyproject.toml's run config, 2 sites
#   deploy/deploy_local.sh --run-config "num-server-rounds=1"   # extra arguments go to `flwr run`
#   DPMEMARC_SITE_FILES="/srv/a.jsonl /srv/b.jsonl" deploy/deploy_local.sh \
#       --run-config "task='classification' labels='negative,positive'"   # one site per file (start_site.sh)
#
# Environment: DPMEMARC_SITES (default 2; the number of files when DPMEMARC_SITE_FILES is set),
# DPMEMARC_SUPERLINK_PORT (default 9091; SuperNodes use the next ports), FLWR_HOME (default <repo>/.flwr_home;
# credentials are made once in $FLWR_HOME/credentials; the sites' privacy records go to $FLWR_HOME/site-<i>).
# Across machines, run start_superlink.sh and start_supernode.sh on each (see docs/FEDERATED.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr_home}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
read -r -a FILES <<< "${DPMEMARC_SITE_FILES:-}"
SITES="${DPMEMARC_SITES:-2}"
[ "${#FILES[@]}" -eq 0 ] || SITES="${#FILES[@]}"
PORT="${DPMEMARC_SUPERLINK_PORT:-9091}"
CREDENTIALS="$FLWR_HOME/credentials"
CONNECTION="dpmemarc-deploy"
LOGS="$FLWR_HOME/deploy-logs"
mkdir -p "$LOGS"

[ -f "$CREDENTIALS/ca.crt" ] || python3 deploy/make_credentials.py "$CREDENTIALS" --supernodes "$SITES"
for i in $(seq 0 $((SITES - 1))); do
  [ -f "$CREDENTIALS/supernode-$i" ] || { echo "deploy_local: no key for site $i in $CREDENTIALS" >&2; exit 2; }
done

PIDS=()
stop_all() {
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do kill "${PIDS[$i]}" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_all EXIT

# A fresh SuperLink database per deployment: SuperNode registrations and runs start empty.
rm -f "$FLWR_HOME/deploy-superlink/state.db"*
deploy/start_superlink.sh "$CREDENTIALS" "$PORT" > "$LOGS/superlink.log" 2>&1 &
PIDS+=($!)
python3 deploy/set_connection.py --wait "$CONNECTION" "127.0.0.1:$PORT" --root-certificates "$CREDENTIALS/ca.crt" \
  || { tail -n 30 "$LOGS/superlink.log" >&2; exit 1; }

for i in $(seq 0 $((SITES - 1))); do
  flwr supernode register "$CREDENTIALS/supernode-$i.pub" "$CONNECTION" --name "site-$i"
  if [ "${#FILES[@]}" -gt 0 ]; then
    deploy/start_site.sh "$CREDENTIALS/supernode-$i" "$CREDENTIALS/ca.crt" "${FILES[$i]}" "127.0.0.1:$PORT" \
      $((PORT + 1 + i)) "$FLWR_HOME/site-$i" > "$LOGS/supernode-$i.log" 2>&1 &
  else
    deploy/start_supernode.sh "$CREDENTIALS" "$i" "$SITES" "127.0.0.1:$PORT" $((PORT + 1 + i)) \
      > "$LOGS/supernode-$i.log" 2>&1 &
  fi
  PIDS+=($!)
done

deploy/flwr_run_checked.sh "$CONNECTION" --run-config "output-dir='$PWD/runs/federated-deploy'" "$@"
