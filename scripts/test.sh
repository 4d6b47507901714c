#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up what the tests need, build the
# dynamo binary the end-to-end tests start, then run every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-tests.sh
cargo build --locked --bin dynamo
cargo test --locked --workspace
