#!/usr/bin/env bash
# `just bench` / `just bench-quick`: builds the release binaries, runs every benchmark, prints
# the figures and (full runs only) rewrites the "Latest run" section of BENCHMARKS.md (between
# the markers) with the date, the machine, each command and its output. Curated sections above
# it stay as written.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-full}"

scripts/services.sh
cargo build --release --quiet --bins
bench="$(scripts/target-dir.sh)/release/ae-bench"

if [ "$mode" = quick ]; then
  commands=(
    "taskset -c 0 $bench hashing --runs 3 --secs 0.5"
    "$bench phone-diff --count 200000 --seed 42"
    "$bench emulator --runs 1 --secs 2 --shards 10"
    "$bench ratelimit --rate 20 --shards 100 --latency-ms 200 --window-secs 30"
    "$bench ratelimit --rate 20 --shards 100 --latency-ms 200 --window-secs 30 --workers 4"
    "$bench scaleout --members 20000 --latency-ms 500"
    "$bench memory --members 200000"
    "$bench sdk --members 50000 --latency-base-ms 300 --latency-per-record-us 20 --workers 1,4"
  )
else
  commands=(
    "taskset -c 0 $bench hashing --runs 5 --secs 1"
    "$bench phone-diff --count 1000000 --seed 42"
    "$bench emulator --runs 3 --secs 3 --shards 40"
    "$bench ratelimit --rate 20 --shards 500 --latency-ms 200 --window-secs 30"
    "$bench ratelimit --rate 20 --shards 300 --latency-ms 200 --window-secs 30 --workers 4"
    "$bench ratelimit --rate 20 --shards 600 --latency-ms 200 --window-secs 10 --workers 4"
    "$bench scaleout --members 640000 --latency-ms 500"
    "$bench memory --members 1000000,10000000"
    "$bench sdk --members 1000000 --latency-base-ms 300 --latency-per-record-us 20 --workers 1,4"
  )
fi

mkdir -p .bench
out=.bench/latest.md
{
  label="just bench"; [ "$mode" = quick ] && label="just bench-quick"
  echo "Run of \`$label\` on $(date -u +%Y-%m-%d) at $(date -u +%H:%M) UTC: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GiB."
  for c in "${commands[@]}"; do
    echo
    echo "\`$c\`"
    echo '```'
    # The fleet's JSON logs go to stdout too; the figures are the other lines.
    bash -c "$c" 2>/dev/null | grep -v '^{' | tee /dev/stderr
    echo '```'
  done
} > "$out"

if [ "$mode" = quick ]; then
  echo "Quick run: figures in $out; BENCHMARKS.md is left to full runs."
  exit 0
fi

python3 - "$out" <<'PY'
import re, sys
latest = open(sys.argv[1]).read()
path = "BENCHMARKS.md"
text = open(path).read()
start, end = "<!-- latest-run:start -->", "<!-- latest-run:end -->"
block = f"{start}\n{latest}\n{end}"
if start in text:
    text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
else:
    text = text.rstrip() + "\n\n## Latest run\n" + block + "\n"
open(path, "w").write(text)
PY
echo "BENCHMARKS.md updated (Latest run)."
