//! KV indexer throughput on a real trace: replays the Mooncake FAST'25 conversation
//! trace's `hash_ids` as find_matches / store / evict operations across simulated workers.
//!
//! ```text
//! cargo run --release -p dynamo-router --example indexer_bench -- \
//!     ../shared/data/mooncake_conversation_trace.jsonl [--workers 1000] [--passes 20]
//!     [--capacity 512] [--replays 3] [--threads CORES]
//! ```
//!
//! Per request: `find_matches` on its blocks; the request goes to the best-matching worker
//! (4 times in 5, else to a random one, so the shared prefix spreads); that worker stores
//! the blocks it lacked (one `Stored` event) and, past `--capacity` blocks, evicts its
//! oldest ones (one `Removed` event). Each pass salts the ids, so every pass is a fresh
//! trace over the same warm index. Operations = find_matches calls + events applied.
//!
//! Two figures: *interleaved* times each operation alone (a clock read either side) while
//! the simulation runs between them and evicts the index from the cache; *replay* records
//! the same operations and runs them again, in the same order, on a fresh index with one
//! clock read around the whole run (`--replays N` times), as a router applying a stream
//! of events and requests would.
//!
//! A third figure replays the same log on the router's [`ShardedIndex`] from `--threads`
//! threads (default: this machine's cores), one shard per thread: thread `k` applies the
//! events of the workers in shard `k`, as the host's per-worker event tasks do, and every
//! `k`-th lookup, which visits every shard.
//!
//! The trace is Qin et al., "Mooncake", USENIX FAST 2025 (Apache-2.0); see
//! `shared/data/README.md`.

use std::collections::{HashSet, VecDeque};
use std::error::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dynamo_protocol::{KvEvent, KvEventData, StoredBlock};
use dynamo_router::kv::{KvConfig, KvIndexer, KvMode, KvRouterHandle, ShardedIndex};

struct Args {
    trace: String,
    workers: u64,
    passes: u64,
    capacity: usize,
    replays: u64,
    threads: usize,
}

/// Recorded indexer operations, for the replay: a request's lookup, or the events that
/// followed it (its worker's `Stored` and `Removed`).
enum Op {
    Find(Vec<u64>),
    Events(Vec<KvEvent>),
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut out = Args {
        trace: String::new(),
        workers: 1000,
        passes: 20,
        capacity: 512,
        replays: 3,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Result<u64, String> {
            args.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number"))
        };
        match a.as_str() {
            "--workers" => out.workers = num("--workers")?.max(1),
            "--passes" => out.passes = num("--passes")?.max(1),
            "--capacity" => out.capacity = num("--capacity")?.max(1) as usize,
            "--replays" => out.replays = num("--replays")?,
            "--threads" => out.threads = (num("--threads")? as usize).clamp(1, 64),
            _ if out.trace.is_empty() => out.trace = a,
            _ => return Err(format!("unexpected argument `{a}`")),
        }
    }
    if out.trace.is_empty() {
        return Err(
            "usage: indexer_bench TRACE.jsonl [--workers N] [--passes N] [--capacity BLOCKS] [--replays N] [--threads N]"
                .into(),
        );
    }
    Ok(out)
}

/// The trace's requests as lists of block ids.
fn load(path: &str) -> Result<Vec<Vec<u64>>, Box<dyn Error>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read the trace `{path}`: {e}\n\
             It is in the shared data folder: run from the repository root with \
             ../shared/data/mooncake_conversation_trace.jsonl (see shared/data/README.md)"
        )
    })?;
    let mut out = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let row: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("{path}:{}: not JSON: {e}", n + 1))?;
        let ids = row["hash_ids"]
            .as_array()
            .ok_or_else(|| format!("{path}:{}: no `hash_ids` array", n + 1))?
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .collect();
        out.push(ids);
    }
    if out.is_empty() {
        return Err(format!("{path}: no requests").into());
    }
    Ok(out)
}

/// Trace ids are small consecutive integers; real block hashes are uniform u64s.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

struct SimWorker {
    next_event: u64,
    held: HashSet<u64>,
    order: VecDeque<u64>,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(at).copied().unwrap_or(0) as f64 / 1000.0
}

fn main() {
    if let Err(e) = run() {
        eprintln!("indexer_bench: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let trace = load(&args.trace)?;
    let mut ix = KvIndexer::new();
    let mut sims: Vec<SimWorker> = (0..args.workers)
        .map(|_| SimWorker {
            next_event: 0,
            held: HashSet::new(),
            order: VecDeque::new(),
        })
        .collect();
    let mut rng = fastrand::Rng::with_seed(42);
    let mut find_ns = Vec::with_capacity(trace.len() * args.passes as usize);
    let (mut finds, mut events, mut stored_blocks, mut hit_blocks, mut prompt_blocks) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut evicted_blocks = 0u64;
    let mut in_indexer = Duration::ZERO;
    let mut in_events = Duration::ZERO;
    let mut event_log: Vec<KvEvent> = Vec::new();
    let mut ops_log: Vec<Op> = Vec::new();
    let wall = Instant::now();
    for pass in 0..args.passes {
        for ids in &trace {
            let hashes: Vec<u64> = ids.iter().map(|&id| mix(id ^ (pass << 40))).collect();
            let t = Instant::now();
            let scores = ix.find_matches(&hashes);
            let took = t.elapsed();
            in_indexer += took;
            find_ns.push(took.as_nanos() as u64);
            finds += 1;
            ops_log.push(Op::Find(hashes.clone()));
            let best = scores.best();
            let (worker, overlap) = match best {
                Some((w, n)) if rng.f64() < 0.8 => (w, n as usize),
                _ => {
                    let w = rng.u64(..args.workers);
                    (w, scores.get(w) as usize)
                }
            };
            hit_blocks += overlap as u64;
            prompt_blocks += hashes.len() as u64;
            let Some(sim) = sims.get_mut(worker as usize) else {
                continue;
            };
            let new: Vec<u64> = hashes
                .iter()
                .copied()
                .filter(|h| !sim.held.contains(h))
                .collect();
            let mut batch = Vec::new();
            if !new.is_empty() {
                for &h in &new {
                    sim.held.insert(h);
                    sim.order.push_back(h);
                }
                stored_blocks += new.len() as u64;
                batch.push(KvEventData::Stored {
                    parent: None,
                    blocks: new.iter().map(|&hash| StoredBlock { hash }).collect(),
                });
            }
            let mut evicted = Vec::new();
            while sim.order.len() > args.capacity {
                if let Some(h) = sim.order.pop_front() {
                    sim.held.remove(&h);
                    evicted.push(h);
                }
            }
            evicted_blocks += evicted.len() as u64;
            if !evicted.is_empty() {
                batch.push(KvEventData::Removed { blocks: evicted });
            }
            for data in batch {
                let event = KvEvent {
                    worker_id: worker,
                    event_id: sim.next_event,
                    data,
                };
                sim.next_event += 1;
                let t = Instant::now();
                ix.apply(&event);
                let took = t.elapsed();
                in_indexer += took;
                in_events += took;
                events += 1;
                if event_log.len() < 200_000 {
                    event_log.push(event.clone());
                }
                match ops_log.last_mut() {
                    Some(Op::Events(queued)) => queued.push(event),
                    _ => ops_log.push(Op::Events(vec![event])),
                }
            }
        }
    }
    let wall = wall.elapsed();
    find_ns.sort_unstable();
    let ops = finds + events;
    println!(
        "trace {} ({} requests × {} passes), {} workers, capacity {} blocks/worker",
        args.trace,
        trace.len(),
        args.passes,
        args.workers,
        args.capacity
    );
    println!(
        "operations: {ops} ({finds} find_matches + {events} events, {stored_blocks} blocks stored); index now {} blocks",
        ix.block_count()
    );
    println!(
        "throughput: {:.2} M ops/s in the indexer ({:.3} s), {:.2} M ops/s wall with the simulation ({:.3} s)",
        ops as f64 / in_indexer.as_secs_f64() / 1e6,
        in_indexer.as_secs_f64(),
        ops as f64 / wall.as_secs_f64() / 1e6,
        wall.as_secs_f64()
    );
    println!(
        "find_matches: p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs, max {:.2} µs; prefix hit {:.1}% of blocks",
        percentile(&find_ns, 0.50),
        percentile(&find_ns, 0.99),
        percentile(&find_ns, 0.999),
        percentile(&find_ns, 1.0),
        100.0 * hit_blocks as f64 / prompt_blocks.max(1) as f64
    );
    println!(
        "split: find_matches {:.3} s ({:.2} M/s), events {:.3} s ({:.2} M events/s, {:.1} M block ops/s)",
        (in_indexer - in_events).as_secs_f64(),
        finds as f64 / (in_indexer - in_events).as_secs_f64() / 1e6,
        in_events.as_secs_f64(),
        events as f64 / in_events.as_secs_f64() / 1e6,
        (stored_blocks + evicted_blocks) as f64 / in_events.as_secs_f64() / 1e6
    );
    replay(&ops_log, args.replays);
    replay_sharded(&ops_log, args.replays, args.threads);
    let first_pass: Vec<Vec<u64>> = (trace.iter())
        .map(|ids| ids.iter().map(|&id| mix(id)).collect())
        .collect();
    handle_ingest(&event_log, &first_pass)?;
    Ok(())
}

/// The recorded operations again, on a fresh index each time, timed as a whole: events
/// applied one by one, then each request's events as one batch.
fn replay(log: &[Op], times: u64) {
    let ops: usize = (log.iter())
        .map(|op| match op {
            Op::Find(_) => 1,
            Op::Events(events) => events.len(),
        })
        .sum();
    for batched in [false, true] {
        let mut rates = Vec::new();
        for _ in 0..times {
            let mut ix = KvIndexer::new();
            let mut matched = 0u64;
            let t = Instant::now();
            for op in log {
                match op {
                    Op::Find(hashes) => matched += u64::from(ix.find_matches(hashes).max()),
                    Op::Events(events) if batched => ix.apply_batch(events, |_, _| {}),
                    Op::Events(events) => {
                        for e in events {
                            ix.apply(e);
                        }
                    }
                }
            }
            let took = t.elapsed();
            std::hint::black_box(matched);
            rates.push(ops as f64 / took.as_secs_f64() / 1e6);
        }
        let shown: Vec<String> = rates.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "replay{}: {ops} operations, {} M ops/s (each run on a fresh index, one clock read around it)",
            if batched { " (a request's events as one apply_batch)" } else { "" },
            shown.join(" / ")
        );
    }
}

/// The recorded operations on a [`ShardedIndex`] of `threads` shards from as many threads:
/// thread `k` applies the events of shard `k`'s workers one by one (as the host's event
/// tasks call `KvRouterHandle::apply_event`) and every `k`-th lookup. Each
/// shard sees its own events and the lookups in the log's order; lookups wait for a
/// shard's lock while another thread writes it.
fn replay_sharded(log: &[Op], times: u64, threads: usize) {
    let ops: usize = (log.iter())
        .map(|op| match op {
            Op::Find(_) => 1,
            Op::Events(events) => events.len(),
        })
        .sum();
    let mut rates = Vec::new();
    let mut lat = Vec::new();
    for _ in 0..times {
        let index = ShardedIndex::new(threads);
        let index = &index;
        let t = Instant::now();
        let per_thread: Vec<Vec<u64>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|k| {
                    s.spawn(move || {
                        let mut lat = Vec::new();
                        let mut matched = 0u64;
                        let mut nth_find = 0usize;
                        for op in log {
                            match op {
                                Op::Find(hashes) => {
                                    nth_find += 1;
                                    if nth_find % threads == k {
                                        let t = Instant::now();
                                        matched += u64::from(index.find_matches(hashes, 0).max());
                                        lat.push(t.elapsed().as_nanos() as u64);
                                    }
                                }
                                Op::Events(events) => {
                                    let mine = (events.first())
                                        .is_some_and(|e| index.shard_of(e.worker_id) == k);
                                    if mine {
                                        for e in events {
                                            index.apply(e);
                                        }
                                    }
                                }
                            }
                        }
                        std::hint::black_box(matched);
                        lat
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_default())
                .collect()
        });
        let took = t.elapsed();
        rates.push(ops as f64 / took.as_secs_f64() / 1e6);
        lat = per_thread.concat();
    }
    lat.sort_unstable();
    let shown: Vec<String> = rates.iter().map(|r| format!("{r:.2}")).collect();
    println!(
        "replay on a ShardedIndex of {threads} shards from {threads} threads: {ops} operations, {} M ops/s; find_matches (last run, lock waits included) p50 {:.2} µs, p99 {:.2} µs",
        shown.join(" / "),
        percentile(&lat, 0.50),
        percentile(&lat, 0.99)
    );
}

/// The host's entry point: the same events through `KvRouterHandle::apply_event` (one
/// mutex per event), first alone, then with a second thread routing (find_matches through
/// the same mutex) as fast as it can, to show what contention costs each side.
fn handle_ingest(log: &[KvEvent], requests: &[Vec<u64>]) -> Result<(), Box<dyn Error>> {
    let handle = KvRouterHandle::new(KvMode::Events, KvConfig::default())?;
    let t = Instant::now();
    for e in log {
        handle.apply_event(e.clone());
    }
    let took = t.elapsed();
    println!(
        "KvRouterHandle::apply_event alone: {} events in {:.3} s, {:.2} M events/s (clone included)",
        log.len(),
        took.as_secs_f64(),
        log.len() as f64 / took.as_secs_f64() / 1e6
    );

    let handle = KvRouterHandle::new(KvMode::Events, KvConfig::default())?;
    let stop = AtomicBool::new(false);
    let (took, mut lat) = std::thread::scope(|s| {
        let router = s.spawn(|| {
            let mut lat = Vec::new();
            for hashes in requests.iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let t = Instant::now();
                std::hint::black_box(handle.find_matches(hashes).max());
                lat.push(t.elapsed().as_nanos() as u64);
            }
            lat
        });
        let t = Instant::now();
        for e in log {
            handle.apply_event(e.clone());
        }
        let took = t.elapsed();
        stop.store(true, Ordering::Relaxed);
        (took, router.join().unwrap_or_default())
    });
    lat.sort_unstable();
    println!(
        "with a routing thread: {:.2} M events/s; {} find_matches meanwhile ({:.2} M/s), p50 {:.2} µs, p99 {:.2} µs (lock wait included)",
        log.len() as f64 / took.as_secs_f64() / 1e6,
        lat.len(),
        lat.len() as f64 / took.as_secs_f64() / 1e6,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99)
    );
    Ok(())
}
