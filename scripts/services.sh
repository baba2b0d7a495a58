#!/usr/bin/env bash
# Makes sure the RabbitMQ and Redis the fleet and its tests need are running on this machine
# (127.0.0.1:5672 guest/guest, 127.0.0.1:6379), installing them from Debian's packages if absent.
set -euo pipefail

need_install=()
command -v redis-server >/dev/null 2>&1 || need_install+=(redis-server)
command -v rabbitmq-server >/dev/null 2>&1 || need_install+=(rabbitmq-server)
if [ ${#need_install[@]} -gt 0 ]; then
  echo "Installing ${need_install[*]} from Debian's packages..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_install[@]}" >/dev/null
fi

# The fleet requires a Redis that persists every write (AOF): exports, plans and workspaces'
# connections live there, and a restart must not lose them (docs/ARCHITECTURE.md).
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "Starting Redis (AOF)..."
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly yes \
    --appendfsync everysec --dir "${REDIS_DIR:-/var/lib/redis}" >/dev/null
elif [ "$(redis-cli -h 127.0.0.1 -p 6379 config get appendonly | tail -1)" != "yes" ]; then
  echo "Turning AOF on in the running Redis..."
  redis-cli -h 127.0.0.1 -p 6379 config set appendonly yes >/dev/null
fi

rabbit_up() { rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1; }
if ! rabbit_up; then
  echo "Starting RabbitMQ..."
  rabbitmq-server -detached >/dev/null 2>&1 || true
fi

for _ in $(seq 1 120); do
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && rabbit_up; then
    exit 0
  fi
  sleep 1
done
echo "RabbitMQ or Redis did not come up within 120 s" >&2
exit 1
