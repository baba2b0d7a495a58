# audience-export: `just demo` runs a real export end to end; `just test` runs the whole suite.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Run one export of a generated 100,000-member segment through the whole fleet and print its report.
demo:
    scripts/demo.sh

# The demo's export on a Redis Cluster (3+3) and a 3-node RabbitMQ cluster on free ports, with a Redis master killed and a RabbitMQ node stopped mid-export; prints the report.
cluster-demo:
    scripts/cluster-demo.sh

# Formatting, clippy with -D warnings, the deploy checks, unit tests and the end-to-end suite (starts RabbitMQ and Redis, installs the tools if needed).
test: up tools lint deploy-checks
    cargo test --workspace --all-targets

# Formatting check and clippy.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Rewrite docs/schemas/ (JSON Schemas of the job and the events) from the contract types; `just test` fails while they differ.
schemas:
    UPDATE_SCHEMAS=1 cargo test -p audience-export-core --lib contract::schema::tests::checked_in_schemas_match_the_types

# Make sure RabbitMQ and Redis are running.
up:
    scripts/services.sh

# Install the tools the suite runs (promtool, and helm, kubernetes-validate, hadolint in .tools/) if they are missing.
tools:
    scripts/tools.sh

# The image, the chart, the alert rules and the dashboard: hadolint, helm lint and template validated against Kubernetes 1.30 and the CRDs, promtool (offline once `just tools` has run).
deploy-checks: tools
    scripts/deploy-checks.sh

# Every benchmark (release build, under 15 minutes); rewrites the "Latest run" of BENCHMARKS.md.
bench:
    scripts/bench.sh full

# The same benchmarks on small inputs (under 3 minutes), for development.
bench-quick:
    scripts/bench.sh quick
