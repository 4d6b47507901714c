#!/usr/bin/env bash
# The README's NATS-vs-socket figure for the serving pipeline: graphs/nats.toml (router ->
# worker requests and KV events on NATS) against the same graph with those edges on the
# local socket, alternating, each run measuring the CPU of every graph process (engines
# included: the worker side of a transport runs there) plus, for NATS, the nats-server.
# Usage: scripts/bench-nats.sh [ROUNDS] (default 3); needs nats-server on PATH (or /usr/sbin).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
bin=target/release/dynamo
cargo build --release --locked --bin dynamo >&2
nats=$(command -v nats-server || echo /usr/sbin/nats-server)
tmp=$(mktemp -d)
trap 'kill "${nats_pid:-}" 2>/dev/null || true; rm -rf "$tmp"' EXIT
sed 's/transport = "nats"/transport = "socket"/' graphs/nats.toml > "$tmp/socket.toml"
"$nats" -a 127.0.0.1 -p 4222 >/dev/null 2>&1 &
nats_pid=$!
sleep 0.5
load=(--set worker.speedup=inf --include-engines --concurrency 32 --requests 3000 --warmup 200
      --input-tokens 180 --output-tokens 64 --json)
cpu() { python3 -c 'import json,sys; print(json.load(sys.stdin)["cpu_ms_per_request"])'; }
for i in $(seq "$rounds"); do
  s=$("$bin" bench serve --graph "$tmp/socket.toml" "${load[@]}" | cpu)
  n=$("$bin" bench serve --graph graphs/nats.toml "${load[@]}" --server-pids "$nats_pid" | cpu)
  python3 -c "print(f'round $i: socket {float(\"$s\"):.3f} ms, NATS {float(\"$n\"):.3f} ms CPU per request: {float(\"$n\")/float(\"$s\"):.2f}x')"
done
