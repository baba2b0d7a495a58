#!/usr/bin/env bash
# `just cluster-demo`: the demo's export on a Redis Cluster (3 masters, 3 replicas) and a 3-node
# RabbitMQ cluster started on free ports (ae-cluster, from the test harness), with the Redis
# master holding the export's keys killed and a RabbitMQ node stopped while it runs. Prints the
# report, then stops the fleet and both clusters. Logs land in .cluster-demo/.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v redis-server >/dev/null && command -v rabbitmq-server >/dev/null ||
  { echo "cluster-demo needs redis-server and rabbitmq-server installed" >&2; exit 1; }
echo "Building..."
cargo build --quiet --bins

DEMO="$PWD/.cluster-demo"
rm -rf "$DEMO" && mkdir -p "$DEMO/mail" "$DEMO/logs"
BIN="$(scripts/target-dir.sh)/debug"
ACCOUNT=1234567890

export AE_NAMESPACE=cdemo
export AE_GRAPH__BASE_URL=http://127.0.0.1:8471
export AE_OAUTH__DIALOG_BASE_URL=http://127.0.0.1:8471
export AE_GRAPH__APP_SECRET="demo-app-secret-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export AE_CONNECTIONS__ENCRYPTION_KEYS="demo:$(head -c 32 /dev/urandom | base64)"
export AE_API__KEY="demo-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export AE_PRODUCER__FILE_ROOT="$DEMO"
# Small shards and slow uploads: the export is still running when the nodes go.
export AE_PRODUCER__SHARD_SIZE=1000
# Ports of their own, so a `just demo` running beside it is not disturbed.
export AE_API__ADDR=127.0.0.1:8481
export AE_OAUTH__REDIRECT_URI=http://127.0.0.1:8481/facebook/oauth/return
export AE_PRODUCER__OPS_ADDR=127.0.0.1:9471
export AE_WORKER__OPS_ADDR=127.0.0.1:9472
export AE_FINALIZER__OPS_ADDR=127.0.0.1:9473
export AE_FINALIZER__SMTP_PORT=2526

pids=()
cluster_pid=""
stop() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -n "$cluster_pid" ]; then
    kill -TERM "$cluster_pid" 2>/dev/null || true
    wait "$cluster_pid" 2>/dev/null || true
  fi
}
trap stop EXIT

echo "Starting a Redis Cluster and a RabbitMQ cluster (about 30 s)..."
"$BIN/ae-cluster" --env-file "$DEMO/cluster.env" --namespace "$AE_NAMESPACE" 2>"$DEMO/logs/ae-cluster.log" &
cluster_pid=$!
until [ -s "$DEMO/cluster.env" ]; do
  kill -0 "$cluster_pid" 2>/dev/null || { echo "the clusters did not start: $DEMO/logs/ae-cluster.log" >&2; exit 1; }
  sleep 1
done
# shellcheck disable=SC1091
source "$DEMO/cluster.env"
echo "AE_REDIS_URL=$AE_REDIS_URL"
echo "AE_AMQP_URL=$AE_AMQP_URL"

"$BIN/graph-emulator" --listen 127.0.0.1:8471 --ad-account "$ACCOUNT" \
  --latency-base-ms 150 --latency-per-record-us 5 --latency-jitter-ms 30 >"$DEMO/logs/graph-emulator.log" 2>&1 &
pids+=($!)
"$BIN/smtp-sink" --listen 127.0.0.1:2526 --dir "$DEMO/mail" >"$DEMO/logs/smtp-sink.log" 2>&1 &
pids+=($!)
for role in producer worker finalizer; do
  "$BIN/audience-$role" >"$DEMO/logs/$role.log" 2>&1 &
  pids+=($!)
done

"$BIN/ae-demo" --members "${DEMO_MEMBERS:-100000}" --segment "$DEMO/segment.ndjson" --mail-dir "$DEMO/mail" --ad-account "$ACCOUNT"
echo "Logs: $DEMO/logs"
