#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up what the tests need, build the
# dynamo binary the end-to-end tests start, then run every test of the workspace and
# close with one summary line over all test binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-tests.sh
# The tests cover llama.cpp in process too (`engine = "llamacpp"`): the dynamo binary the
# end-to-end tests start is built with that feature.
features=(--features dynamo-cli/llamacpp)
# One build of every test target and binary: the same feature set as `cargo test`
# below, so `cargo test` reuses it instead of compiling the workspace a second time.
cargo build --locked --workspace --tests --bins "${features[@]}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --workspace "${features[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(grep -Eo '^test result: [A-Za-z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
echo
echo "${passed} passed, ${failed} failed"
exit "$status"
