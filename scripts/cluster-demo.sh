#!/usr/bin/env bash
# `just cluster-demo`: the demo's export (scripts/demo.sh) on a Redis Cluster (3 masters, 3
# replicas) and a 3-node RabbitMQ cluster started on free ports by ae-cluster (the test
# harness's clusters), which kills the Redis master holding the export's keys and stops a
# RabbitMQ node while it runs. Prints the report, then stops the fleet and both clusters. Logs
# land in .cluster-demo/.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v redis-server >/dev/null && command -v rabbitmq-server >/dev/null ||
  { echo "cluster-demo needs redis-server and rabbitmq-server installed" >&2; exit 1; }
echo "Building..."
cargo build --quiet --bins

ROOT="$PWD/.cluster-demo"
rm -rf "$ROOT" && mkdir -p "$ROOT"
BIN="$(scripts/target-dir.sh)/debug"
export AE_NAMESPACE=cdemo

cluster_pid=""
stop() {
  if [ -n "$cluster_pid" ]; then
    kill -TERM "$cluster_pid" 2>/dev/null || true
    wait "$cluster_pid" 2>/dev/null || true
  fi
}
trap stop EXIT

echo "Starting a Redis Cluster and a RabbitMQ cluster (about 20 s)..."
"$BIN/ae-cluster" --env-file "$ROOT/cluster.env" --namespace "$AE_NAMESPACE" 2>"$ROOT/ae-cluster.log" &
cluster_pid=$!
until [ -s "$ROOT/cluster.env" ]; do
  kill -0 "$cluster_pid" 2>/dev/null || { echo "the clusters did not start: $ROOT/ae-cluster.log" >&2; exit 1; }
  sleep 1
done
# shellcheck disable=SC1091
source "$ROOT/cluster.env"
echo "AE_REDIS_URL=$AE_REDIS_URL"
echo "AE_AMQP_URL=$AE_AMQP_URL"

# Small shards and slow uploads, so the export is still running when the nodes go; ports of
# their own, so a `just demo` beside it is not disturbed.
export AE_PRODUCER__SHARD_SIZE=1000
export AE_API__ADDR=127.0.0.1:8481
export AE_OAUTH__REDIRECT_URI=http://127.0.0.1:8481/facebook/oauth/return
export AE_PRODUCER__OPS_ADDR=127.0.0.1:9471
export AE_WORKER__OPS_ADDR=127.0.0.1:9472
export AE_FINALIZER__OPS_ADDR=127.0.0.1:9473
DEMO_DIR="$ROOT/fleet" DEMO_GRAPH_PORT=8471 DEMO_SMTP_PORT=2526 DEMO_LATENCY_MS=150 scripts/demo.sh
