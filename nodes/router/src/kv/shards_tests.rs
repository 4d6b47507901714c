use std::sync::atomic::{AtomicU32, Ordering};

use dynamo_protocol::StoredBlock;

use super::*;

fn stored(worker: InstanceId, event_id: u64, hashes: &[u64]) -> KvEvent {
    KvEvent {
        worker_id: worker,
        event_id,
        data: KvEventData::Stored {
            parent: None,
            blocks: hashes.iter().map(|&hash| StoredBlock { hash }).collect(),
        },
    }
}

/// The same events through one indexer and through shards give the same answers.
#[test]
fn shards_answer_as_one_index_does() {
    let workers: Vec<InstanceId> = (1..=12).collect();
    let sharded = ShardedIndex::new(3);
    let shards_used: std::collections::BTreeSet<_> =
        workers.iter().map(|&w| sharded.shard_of(w)).collect();
    assert_eq!(
        shards_used.len(),
        3,
        "twelve workers spread over three shards"
    );
    let mut single = KvIndexer::new();
    let mut events = Vec::new();
    for &w in &workers {
        // Worker w holds the shared prefix 1..=4 and then a w-long tail of its own.
        let mut chain: Vec<u64> = (1..=4).collect();
        chain.extend((0..w).map(|k| 1000 * w + k));
        events.push(stored(w, 0, &chain));
    }
    // Worker 5 evicts its last two blocks.
    events.push(KvEvent {
        worker_id: 5,
        event_id: 1,
        data: KvEventData::Removed {
            blocks: vec![5003, 5004],
        },
    });
    let mut outcomes = Vec::new();
    sharded.apply_batch(&events, |_, o| outcomes.push(o));
    assert!(outcomes.iter().all(|&o| o == EventOutcome::Applied));
    for e in &events {
        assert_eq!(single.apply(e), EventOutcome::Applied);
    }
    for w in [3u64, 5, 12] {
        let mut q: Vec<u64> = (1..=4).collect();
        q.extend((0..w).map(|k| 1000 * w + k));
        let (a, b) = (sharded.find_matches(&q, 0), single.find_matches(&q));
        assert_eq!(a.sorted(), b.sorted(), "query of worker {w}");
        assert_eq!((a.max(), a.len()), (b.max(), b.len()));
        assert_eq!(a.best().map(|b| b.1), b.best().map(|b| b.1));
        assert_eq!(a.get(w), b.get(w));
    }
    assert_eq!(sharded.find_matches(&[1, 2], 0).len(), 12);
    assert!(sharded.find_matches(&[9999, 1], 0).is_empty());
    assert_eq!(sharded.workers(), workers);
    assert_eq!(sharded.worker_blocks(5), single.worker_blocks(5));
    // The prefix is counted once per shard that holds it.
    assert_eq!(sharded.block_count(), single.block_count() + 2 * 4);

    // A gap in one worker's events asks for that worker alone; its removal forgets it.
    assert_eq!(
        sharded.apply(&stored(7, 5, &[9])),
        EventOutcome::NeedsResync
    );
    assert_eq!(sharded.needs_resync(), vec![7]);
    sharded.remove_worker(7);
    assert!(sharded.needs_resync().is_empty());
    assert_eq!(sharded.find_matches(&[1], 0).get(7), 0);

    // Predictions expire in their own shard at the lookup's time.
    sharded.insert_expiring(40, &[77, 78], 100);
    assert_eq!(sharded.find_matches(&[77, 78], 99).get(40), 2);
    assert_eq!(sharded.find_matches(&[77, 78], 100).get(40), 0);
}

/// Writers of different shards and lookups at the same time: nothing deadlocks, each
/// lookup sees a consistent prefix per worker, and the end state is the sequential one.
#[test]
fn concurrent_writers_and_lookups_end_where_one_index_does() {
    let sharded = ShardedIndex::new(2);
    let workers: Vec<InstanceId> = (1..=8).collect();
    // Each worker stores a 64-block chain in 16 events.
    let events_of = |w: InstanceId| -> Vec<KvEvent> {
        let chain: Vec<u64> = (0..64)
            .map(|k| if k < 8 { k + 1 } else { 100 * w + k })
            .collect();
        let mut out: Vec<KvEvent> = (0..16)
            .map(|i| stored(w, i, &chain[i as usize * 4..i as usize * 4 + 4]))
            .collect();
        // Then it evicts and stores its tail half again, 200 times, and evicts it.
        let removed = |event_id| KvEvent {
            worker_id: w,
            event_id,
            data: KvEventData::Removed {
                blocks: chain[32..].to_vec(),
            },
        };
        for round in 0..200 {
            out.push(removed(16 + 2 * round));
            out.push(stored(w, 17 + 2 * round, &chain[32..]));
        }
        out.push(removed(416));
        out
    };
    let done = AtomicU32::new(0);
    let start = std::sync::Barrier::new(5);
    std::thread::scope(|s| {
        for pair in workers.chunks(2) {
            let (sharded, done, start) = (&sharded, &done, &start);
            s.spawn(move || {
                start.wait();
                for &w in pair {
                    for e in events_of(w) {
                        assert_eq!(sharded.apply(&e), EventOutcome::Applied);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            });
        }
        let (sharded, done, start) = (&sharded, &done, &start);
        s.spawn(move || {
            let query: Vec<u64> = (1..=8).collect();
            start.wait();
            while done.load(Ordering::Relaxed) < 4 {
                // The shared prefix is stored 4 blocks an event, in order.
                sharded.find_matches(&query, 0).for_each(|_, depth| {
                    assert!(depth == 4 || depth == 8, "a torn prefix: {depth}");
                });
            }
        });
    });
    let mut single = KvIndexer::new();
    for &w in &workers {
        for e in events_of(w) {
            single.apply(&e);
        }
    }
    for w in [1u64, 6] {
        let q: Vec<u64> = (0..64)
            .map(|k| if k < 8 { k + 1 } else { 100 * w + k })
            .collect();
        assert_eq!(
            sharded.find_matches(&q, 0).sorted(),
            single.find_matches(&q).sorted()
        );
        assert_eq!(sharded.find_matches(&q, 0).get(w), 32);
    }
    assert!(sharded
        .shards
        .iter()
        .all(|s| s.waiting.load(Ordering::Relaxed) == 0));
}

fn event(worker: u64, id: u64, data: KvEventData) -> KvEvent {
    KvEvent {
        worker_id: worker,
        event_id: id,
        data,
    }
}

fn stored_data(hashes: &[u64]) -> KvEventData {
    KvEventData::Stored {
        parent: None,
        blocks: hashes.iter().map(|&hash| StoredBlock { hash }).collect(),
    }
}

/// A prefix of a few shared chains, so that workers overlap in varied depths.
fn chain(rng: &mut fastrand::Rng) -> Vec<u64> {
    let root = rng.u64(0..4) * 1000;
    let len = rng.u64(1..12);
    (0..len).map(|i| root + i).collect()
}

/// The same random stream of stores, removals, clears, predictions, expiries, gaps and
/// departures, through one indexer and through sharded ones: every lookup must agree, as
/// must what each knows of the workers.
#[test]
fn any_number_of_shards_answers_as_one_index() {
    for shards in [1, 2, 3, 8] {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut one = KvIndexer::new();
        let sharded = ShardedIndex::new(shards);
        assert_eq!(sharded.shard_count(), shards);
        let mut next_id = [0u64; 12];
        let mut merged_lookups = 0;
        for step in 0..4000u64 {
            let worker = rng.u64(0..12);
            let slot = worker as usize;
            match rng.u32(0..20) {
                0..=9 => {
                    let e = event(worker, next_id[slot], stored_data(&chain(&mut rng)));
                    next_id[slot] += 1;
                    assert_eq!(one.apply(&e), sharded.apply(&e), "step {step}");
                }
                10..=13 => {
                    let e = event(
                        worker,
                        next_id[slot],
                        KvEventData::Removed {
                            blocks: chain(&mut rng),
                        },
                    );
                    next_id[slot] += 1;
                    assert_eq!(one.apply(&e), sharded.apply(&e), "step {step}");
                }
                14 => {
                    let e = event(worker, next_id[slot], KvEventData::Cleared);
                    next_id[slot] += 1;
                    assert_eq!(one.apply(&e), sharded.apply(&e), "step {step}");
                }
                15 => {
                    // A gap: the worker waits for a snapshot in both.
                    next_id[slot] += 2;
                    let e = event(worker, next_id[slot], stored_data(&[5]));
                    assert_eq!(one.apply(&e), sharded.apply(&e), "step {step}");
                    assert_eq!(one.needs_resync(), sharded.needs_resync());
                    let snap = [KvEventData::Cleared, stored_data(&chain(&mut rng))];
                    assert_eq!(
                        one.apply_snapshot(worker, Some(next_id[slot]), &snap),
                        sharded.apply_snapshot(worker, Some(next_id[slot]), &snap)
                    );
                    next_id[slot] += 1;
                }
                16 => {
                    let hashes = chain(&mut rng);
                    one.insert_expiring(worker, &hashes, step + 50);
                    sharded.insert_expiring(worker, &hashes, step + 50);
                }
                17 => {
                    one.remove_worker(worker);
                    sharded.remove_worker(worker);
                    next_id[slot] = 0;
                }
                _ => {
                    let hashes = chain(&mut rng);
                    one.expire(step);
                    let a = one.find_matches(&hashes);
                    let b = sharded.find_matches(&hashes, step);
                    assert_eq!(a.sorted(), b.sorted(), "step {step}, {shards} shards");
                    assert_eq!((a.max(), a.len()), (b.max(), b.len()));
                    assert_eq!(a.best().map(|x| x.1), b.best().map(|x| x.1));
                    for w in 0..12 {
                        assert_eq!(a.get(w), b.get(w));
                    }
                    if shards > 1 && b.len() > 1 {
                        merged_lookups += 1;
                    }
                }
            }
        }
        assert_eq!(one.workers(), sharded.workers());
        if shards == 1 {
            assert_eq!(one.block_count(), sharded.block_count());
        } else {
            assert!(
                merged_lookups > 50,
                "lookups spanning shards: {merged_lookups}"
            );
            assert!(sharded.block_count() >= one.block_count());
        }
    }
}
