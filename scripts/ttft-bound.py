#!/usr/bin/env python3
"""How much KV-aware routing can lower TTFT on a Mooncake trace, under the mocker's
timing model, with no serving overhead and no CPU contention.

Simulates 8 workers (the README's routing benchmark: `graphs/kv_replay.toml`) as the
mocker schedules them: each step fills a budget of 8,192 tokens with one token per
decoding sequence and then prefill chunks, first come first served; a step takes
`prefill_ms(prefill tokens) + decode_ms(KV use)` (NVIDIA Dynamo's fit of a vLLM worker,
the constants of `nodes/mocker/src/timing.rs`). Each worker keeps an LRU cache of the
trace's 512-token blocks, about 1 M tokens, and a request prefills only the part of its
prompt past its cached prefix. Times are the trace's own (time scale 1, speedup 1: the
README's run at time scale 0.1 and speedup 10 is the same load, ten times faster).

Simplifications, each checked against a closer model to move the ratios little (a closer
model gave the oracle 1.06x instead of 1.15x on the truncated rows, round-robin unchanged):
hits are decided at arrival against every block seen (the mocker decides at admission,
against blocks computed); KV use counts requests' own tokens (the mocker: active blocks);
outputs run their full length (the replay caps `max_tokens` at the context minus the
prompt).

Policies:
  round-robin  the baseline;
  cost W       the router's cost: W x (new blocks + queued prefill blocks) + blocks held
               by running requests (`overlap_weight` = W);
  oracle       the worker whose queued prefill plus this request's uncached prefill is
               least: a greedy rule that knows every queue, not a bound;
  pooled       as if the eight workers shared one LRU cache of all their tokens (what a
               router could hope for at best: that cache's hit rate bounds every routing
               in practice), each request to the worker with the least queued prefill.

Last it prints a bound no router can beat: the share of requests whose prefill, with the
longest prefix any earlier request had cached and no queue at all, could end under half
of round-robin's median. Below 50%, a 2x better median is impossible.

    python3 scripts/ttft-bound.py ../shared/data/mooncake_conversation_trace.jsonl \
        --rows 2000 [--max-input 8000] [--slowdown 1] [--kv-tokens 1048576]

prints the hit rate of one LRU cache as large as all the workers' together, then the hit
rate and TTFT p50/mean/p90 of each policy, and round-robin's p50 over each one's.
`--slowdown 2` makes every step twice as long: twice the load, as the replay with the
engine's `speedup` halved. How much routing can gain depends on it: at light load most
of a TTFT is the prompt's own prefill, which a cache hit shortens only by its share of
the prompt; once round-robin's workers queue, the prefill a hit saves is also taken off
every request queued behind it (whole prompts, 2,000 rows: pooled 1.23x at slowdown 1,
1.40x at 3, 1.99x at 5; the replay measured 2.05x at engine speedup 1.75, slowdown 5.7).
"""

import argparse
import json
import random
from collections import OrderedDict

WORKERS = 8
BUDGET = 8192
TRACE_BLOCK = 512
KV_TOKENS = 65536 * 16


def prefill_ms(n):
    return 4.209989e-7 * n * n + 1.518344e-2 * n + 16.50142


def decode_ms(u):
    u = min(max(u, 0.0), 1.0)
    return max(-25.74 * u * u + 54.01 * u + 5.74, 1.0)


def remember(cache, ids, blocks):
    """Marks `ids` as just used in the LRU `cache` and evicts down to `blocks` entries."""
    for h in ids:
        cache[h] = True
        cache.move_to_end(h)
    while len(cache) > blocks:
        cache.popitem(last=False)


def leading(ids, held):
    """How many of `ids`, from the first, are in `held`: the cached prefix in blocks."""
    n = 0
    for h in ids:
        if h not in held:
            break
        n += 1
    return n


class Worker:
    def __init__(self, kv_tokens):
        self.kv_tokens = kv_tokens
        self.t = 0.0
        self.waiting = []
        self.running = []
        self.cache = OrderedDict()

    def overlap(self, ids):
        return leading(ids, self.cache)

    def queued_blocks(self):
        return sum(r["left"] for r in self.waiting) / TRACE_BLOCK

    def held_blocks(self):
        return sum(r["len"] for r in self.running + self.waiting) / TRACE_BLOCK

    def advance(self, until, slowdown, ttft):
        """Runs steps that start before `until`."""
        while (self.waiting or self.running) and self.t < until:
            budget = BUDGET - len(self.running)
            tokens = 0
            done = []
            for r in self.waiting:
                if budget <= 0:
                    break
                chunk = min(budget, r["left"])
                r["left"] -= chunk
                budget -= chunk
                tokens += chunk
                if r["left"] == 0:
                    done.append(r)
            used = sum(r["len"] + r["made"] for r in self.running + self.waiting)
            ms = prefill_ms(tokens) if tokens else 0.0
            if self.running:
                ms += decode_ms(used / self.kv_tokens)
            self.t += ms * slowdown
            for r in self.running:
                r["made"] += 1
            self.running = [r for r in self.running if r["made"] < r["out"]]
            for r in done:
                self.waiting.remove(r)
                ttft[r["i"]] = self.t - r["arrival"]
                r["made"] = 1
                if r["made"] < r["out"]:
                    self.running.append(r)
        if not (self.waiting or self.running):
            self.t = max(self.t, until)


def simulate(rows, policy, weight, slowdown, kv_tokens, seed=0):
    rng = random.Random(seed)
    workers = [Worker(kv_tokens) for _ in range(WORKERS)]
    pooled = OrderedDict()
    ttft = [0.0] * len(rows)
    hit = total = 0
    start = rows[0]["timestamp"]
    for i, row in enumerate(rows):
        arrival = row["timestamp"] - start
        for w in workers:
            w.advance(arrival, slowdown, ttft)
        ids, length = row["hash_ids"], row["input_length"]
        if policy == "round-robin":
            k = i % WORKERS
        else:
            best = None
            for j, w in enumerate(workers):
                if policy == "pooled":
                    c = w.queued_blocks()
                elif policy == "oracle":
                    c = max(len(ids) - w.overlap(ids), 0) + w.queued_blocks()
                else:
                    new = max(len(ids) - w.overlap(ids), 0)
                    c = weight * (new + w.queued_blocks()) + w.held_blocks()
                key = (c, len(w.running) + len(w.waiting), rng.random())
                if best is None or key < best[0]:
                    best = (key, j)
            k = best[1]
        w = workers[k]
        # `pooled` keeps one cache for all workers (theirs stay empty: it never reads them).
        if policy == "pooled":
            cache, blocks = pooled, WORKERS * kv_tokens // TRACE_BLOCK
        else:
            cache, blocks = w.cache, kv_tokens // TRACE_BLOCK
        cached = min(leading(ids, cache) * TRACE_BLOCK, length - 1)
        remember(cache, ids, blocks)
        hit += cached
        total += length
        w.t = max(w.t, arrival)
        w.waiting.append({"i": i, "arrival": arrival, "left": length - cached,
                          "len": length, "out": max(row["output_length"], 1), "made": 0})
    for w in workers:
        w.advance(float("inf"), slowdown, ttft)
    ttft.sort()
    return hit / total, ttft


def pooled_hit_rate(rows, kv_tokens):
    """The hit rate of one LRU cache as large as all the workers' together, no routing."""
    cache = OrderedDict()
    hit = total = 0
    for row in rows:
        n = leading(row["hash_ids"], cache)
        hit += min(n * TRACE_BLOCK, row["input_length"] - 1)
        total += row["input_length"]
        remember(cache, row["hash_ids"], WORKERS * kv_tokens // TRACE_BLOCK)
    return hit / total


def ideal_ttfts(rows, decode_floor, slowdown):
    """Each request's least possible TTFT: its longest prefix seen in any earlier request
    cached (an unlimited cache), no queue, its chunks back to back; with `decode_floor`
    each step also carries the cheapest decode step (a worker with nothing else running
    is rare on this trace, but possible, so only the figure without it is a strict bound)."""
    seen = set()
    out = []
    for row in rows:
        ids, length = row["hash_ids"], row["input_length"]
        n = leading(ids, seen)
        seen.update(ids)
        left = length - min(n * TRACE_BLOCK, length - 1)
        ms = 0.0
        while left > 0:
            chunk = min(left, BUDGET)
            ms += prefill_ms(chunk) + (decode_ms(0.0) if decode_floor else 0.0)
            left -= chunk
        out.append(ms * slowdown)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--max-input", type=int, default=None,
                   help="truncate prompts to this many tokens (the replay's --max-input-tokens)")
    p.add_argument("--slowdown", type=float, default=1.0)
    p.add_argument("--weights", default="1,16")
    p.add_argument("--kv-tokens", type=int, default=KV_TOKENS,
                   help="each worker's KV cache in tokens (the graph's num_blocks x block_size)")
    a = p.parse_args()
    with open(a.trace) as f:
        rows = [json.loads(line) for line in f if line.strip()][: a.rows]
    if a.max_input:
        for r in rows:
            if r["input_length"] > a.max_input:
                r["input_length"] = a.max_input
                r["hash_ids"] = r["hash_ids"][: -(-a.max_input // TRACE_BLOCK)]
    runs = [("round-robin", 0.0)]
    runs += [("cost", float(w)) for w in a.weights.split(",")]
    runs += [("oracle", 0.0), ("pooled", 0.0)]
    base = None
    rr_p50 = None
    print(f"{len(rows)} rows, prompts up to {a.max_input or 'any'} tokens, slowdown {a.slowdown}")
    print(f"one LRU cache of all {WORKERS} workers' tokens would hit "
          f"{100 * pooled_hit_rate(rows, a.kv_tokens):.1f}%")
    for policy, weight in runs:
        rate, t = simulate(rows, policy, weight, a.slowdown, a.kv_tokens)
        p50 = t[len(t) // 2]
        base = base or p50
        rr_p50 = rr_p50 or p50
        name = f"cost, weight {weight:g}" if policy == "cost" else policy
        print(f"{name:20} hit {100 * rate:5.1f}%  TTFT p50 {p50:7.1f} ms  "
              f"mean {sum(t) / len(t):7.1f}  p90 {t[int(len(t) * 0.9)]:7.1f}  "
              f"round-robin p50 / this p50 = {base / p50:4.2f}")

    target = rr_p50 / 2
    strict = ideal_ttfts(rows, False, a.slowdown)
    floor = ideal_ttfts(rows, True, a.slowdown)
    share = 100 * sum(t <= target for t in strict) / len(strict)
    share_floor = 100 * sum(t <= target for t in floor) / len(floor)
    print(f"requests that any router could bring under half round-robin's p50 ({target:.1f} ms), "
          f"with an unlimited cache and no queue: {share:.1f}% "
          f"({share_floor:.1f}% if each step also decodes): 2x at p50 needs 50%")


if __name__ == "__main__":
    main()
