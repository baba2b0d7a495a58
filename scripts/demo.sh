#!/usr/bin/env bash
# `just demo`: builds the fleet, starts RabbitMQ and Redis if needed, starts the Graph API
# emulator, an SMTP sink and the three roles as separate processes, runs one export of a
# generated 100,000-member segment for email, phone and MADID, prints the report, and stops
# everything it started. Logs and the email land in .demo/.
#
# scripts/cluster-demo.sh runs it on clusters: it exports the AE_* settings it needs first (they
# win over the defaults below) and moves the demo's directory, ports and latency with DEMO_DIR,
# DEMO_GRAPH_PORT, DEMO_SMTP_PORT and DEMO_LATENCY_MS.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
echo "Building..."
cargo build --quiet --bins

DEMO="${DEMO_DIR:-$PWD/.demo}"
GRAPH_PORT="${DEMO_GRAPH_PORT:-8470}"
SMTP_PORT="${DEMO_SMTP_PORT:-2525}"
rm -rf "$DEMO" && mkdir -p "$DEMO/mail" "$DEMO/logs"
# Where cargo put the binaries: CARGO_TARGET_DIR (or a build.target-dir setting) when set.
BIN="$(scripts/target-dir.sh)/debug"
ACCOUNT=1234567890

# Embedded defaults, spelled out: one namespace, the emulator's URL, and this run's secrets:
# the key sealing tokens at rest and the producer API's key (the workspace's token itself comes
# from the OAuth dialog, played by the emulator).
export AE_NAMESPACE="${AE_NAMESPACE:-demo}"
export AE_GRAPH__BASE_URL="http://127.0.0.1:$GRAPH_PORT"
export AE_OAUTH__DIALOG_BASE_URL="http://127.0.0.1:$GRAPH_PORT"
export AE_GRAPH__APP_SECRET="demo-app-secret-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export AE_CONNECTIONS__ENCRYPTION_KEYS="demo:$(head -c 32 /dev/urandom | base64)"
export AE_API__KEY="demo-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export AE_FINALIZER__SMTP_PORT="$SMTP_PORT"
# ae-demo writes the segment in .demo/: the only directory the producer reads file:// sources from.
export AE_PRODUCER__FILE_ROOT="$DEMO"

pids=()
stop() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop EXIT

"$BIN/graph-emulator" --listen "127.0.0.1:$GRAPH_PORT" --ad-account "$ACCOUNT" \
  --latency-base-ms "${DEMO_LATENCY_MS:-40}" --latency-per-record-us 5 --latency-jitter-ms 20 >"$DEMO/logs/graph-emulator.log" 2>&1 &
pids+=($!)
"$BIN/smtp-sink" --listen "127.0.0.1:$SMTP_PORT" --dir "$DEMO/mail" >"$DEMO/logs/smtp-sink.log" 2>&1 &
pids+=($!)
for role in producer worker finalizer; do
  "$BIN/audience-$role" >"$DEMO/logs/$role.log" 2>&1 &
  pids+=($!)
done

"$BIN/ae-demo" --members "${DEMO_MEMBERS:-100000}" --segment "$DEMO/segment.ndjson" --mail-dir "$DEMO/mail" --ad-account "$ACCOUNT"
echo "Logs: $DEMO/logs"
