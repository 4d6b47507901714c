use dynamo_protocol::{KvEvent, KvEventData, StoredBlock};

use super::*;

fn event(worker: u64, id: u64, data: KvEventData) -> KvEvent {
    KvEvent {
        worker_id: worker,
        event_id: id,
        data,
    }
}

fn stored(hashes: &[u64]) -> KvEventData {
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
                    let e = event(worker, next_id[slot], stored(&chain(&mut rng)));
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
                    let e = event(worker, next_id[slot], stored(&[5]));
                    assert_eq!(one.apply(&e), sharded.apply(&e), "step {step}");
                    assert_eq!(one.needs_resync(), sharded.needs_resync());
                    let snap = [KvEventData::Cleared, stored(&chain(&mut rng))];
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

#[test]
fn a_workers_events_stay_in_its_shard() {
    let index = ShardedIndex::new(4);
    let spread: std::collections::BTreeSet<usize> = (0..64).map(|w| index.shard_of(w)).collect();
    assert_eq!(spread.len(), 4, "consecutive ids spread over every shard");
    let w = 9;
    assert_eq!(
        index.apply(&event(w, 0, stored(&[1, 2, 3]))),
        EventOutcome::Applied
    );
    let mine = index.shard_of(w);
    for (n, shard) in index.shards.iter().enumerate() {
        let blocks = shard.0.lock().block_count();
        assert_eq!(blocks, if n == mine { 3 } else { 0 }, "shard {n}");
    }
    assert_eq!(index.find_matches(&[1, 2], 0).sorted(), vec![(w, 2)]);
    assert_eq!(ShardedIndex::new(0).shard_count(), 1, "at least one shard");
    assert!(ShardedIndex::for_this_machine().shard_count() >= 1);
}
