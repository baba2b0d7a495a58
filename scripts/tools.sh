#!/usr/bin/env bash
# Installs the command-line tools the test suite runs, if they are missing: promtool (Debian's
# `prometheus` package, without the server's recommends). Idempotent and quiet when all is there.
set -euo pipefail

if ! command -v promtool >/dev/null 2>&1; then
  echo "Installing promtool (Debian's prometheus package)..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
