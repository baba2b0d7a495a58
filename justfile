# audience-export: `just demo` runs a real export end to end; `just test` runs the whole suite.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Run one export of a generated 100,000-member segment through the whole fleet and print its report.
demo:
    scripts/demo.sh

# Formatting, clippy with -D warnings, unit tests and the end-to-end suite (starts RabbitMQ and Redis if needed).
test: up lint
    cargo test --workspace --all-targets

# Formatting check and clippy.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Make sure RabbitMQ and Redis are running.
up:
    scripts/services.sh

# Benchmarks (release build); figures and their commands are in BENCHMARKS.md.
bench: up
    cargo build --release --quiet -p audience-export-harness --bin ae-bench
    taskset -c 0 target/release/ae-bench hashing --runs 5 --secs 1
    target/release/ae-bench emulator --runs 3 --secs 3 --shards 40
    target/release/ae-bench ratelimit --rate 20 --shards 500 --latency-ms 200 --window-secs 30
    target/release/ae-bench sdk --members 1000000 --latency-base-ms 300 --latency-per-record-us 20
