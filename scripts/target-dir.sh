#!/usr/bin/env bash
# Prints cargo's target directory for this workspace: CARGO_TARGET_DIR, a `build.target-dir` in a
# cargo config, or ./target. Asked of cargo itself so every way of setting it is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
