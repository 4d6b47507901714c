use dynamo_mocker::{BlockId, BlockManager};
use dynamo_protocol::{block_hashes, KvEvent, KvEventData, StoredBlock};

use super::*;

fn stored(worker: u64, id: u64, parent: Option<u64>, hashes: &[u64]) -> KvEvent {
    KvEvent {
        worker_id: worker,
        event_id: id,
        data: KvEventData::Stored {
            parent,
            blocks: hashes.iter().map(|&hash| StoredBlock { hash }).collect(),
        },
    }
}

fn removed(worker: u64, id: u64, hashes: &[u64]) -> KvEvent {
    KvEvent {
        worker_id: worker,
        event_id: id,
        data: KvEventData::Removed {
            blocks: hashes.to_vec(),
        },
    }
}

fn scores(ix: &KvIndexer, hashes: &[u64]) -> Vec<(u64, u32)> {
    ix.find_matches(hashes).sorted()
}

#[test]
fn overlap_counts_each_workers_leading_blocks() {
    let mut ix = KvIndexer::new();
    assert_eq!(
        ix.apply(&stored(1, 0, None, &[10, 11, 12, 13])),
        EventOutcome::Applied
    );
    assert_eq!(
        ix.apply(&stored(2, 0, None, &[10, 11])),
        EventOutcome::Applied
    );
    assert_eq!(
        ix.apply(&stored(2, 1, Some(11), &[20])),
        EventOutcome::Applied
    );
    assert_eq!(ix.apply(&stored(3, 0, None, &[30])), EventOutcome::Applied);

    assert_eq!(scores(&ix, &[10, 11, 12, 13, 14]), vec![(1, 4), (2, 2)]);
    assert_eq!(scores(&ix, &[10, 11, 20]), vec![(1, 2), (2, 3)]);
    assert_eq!(scores(&ix, &[10]), vec![(1, 1), (2, 1)]);
    assert_eq!(scores(&ix, &[99, 10]), vec![], "the first block decides");
    assert_eq!(scores(&ix, &[]), vec![]);
    // A worker holding a later block but not an earlier one gets only the prefix.
    assert_eq!(
        ix.apply(&stored(3, 1, Some(12), &[13])),
        EventOutcome::Applied
    );
    assert_eq!(scores(&ix, &[10, 11, 12, 13]), vec![(1, 4), (2, 2)]);
    assert_eq!(ix.block_count(), 6);
    assert_eq!(ix.find_matches(&[10, 11, 12]).max(), 3);
    assert_eq!(ix.find_matches(&[10, 11, 12]).best(), Some((1, 3)));
    assert_eq!(ix.find_matches(&[99]).best(), None);
    assert_eq!(ix.find_matches(&[10, 11, 12]).get(2), 2);
}

#[test]
fn many_workers_on_one_prefix_use_the_wide_set() {
    let mut ix = KvIndexer::new();
    for w in 0..200u64 {
        let depth = 1 + (w % 4) as usize;
        ix.apply(&stored(w, 0, None, &[1, 2, 3, 4][..depth]));
    }
    let got = ix.find_matches(&[1, 2, 3, 4]);
    assert_eq!(got.len(), 200);
    for (w, n) in got.sorted() {
        assert_eq!(n, 1 + (w % 4) as u32, "worker {w}");
        assert_eq!(got.get(w), n);
    }
    assert_eq!(got.best().map(|b| (b.0 % 4, b.1)), Some((3, 4)));
}

#[test]
fn eviction_lowers_the_overlap_and_clearing_drops_everything() {
    let mut ix = KvIndexer::new();
    ix.apply(&stored(1, 0, None, &[10, 11, 12, 13]));
    ix.apply(&stored(2, 0, None, &[10, 11, 12, 13]));
    assert_eq!(ix.apply(&removed(1, 1, &[12])), EventOutcome::Applied);
    assert_eq!(scores(&ix, &[10, 11, 12, 13]), vec![(1, 2), (2, 4)]);
    assert_eq!(
        ix.apply(&removed(1, 2, &[99])),
        EventOutcome::Applied,
        "unknown: no-op"
    );
    let clear = KvEvent {
        worker_id: 2,
        event_id: 1,
        data: KvEventData::Cleared,
    };
    assert_eq!(ix.apply(&clear), EventOutcome::Applied);
    assert_eq!(scores(&ix, &[10, 11, 12, 13]), vec![(1, 2)]);
    assert_eq!(ix.worker_blocks(2), Vec::<u64>::new());
    assert_eq!(ix.worker_blocks(1), vec![10, 11, 13]);
}

#[test]
fn removing_a_worker_forgets_its_blocks_and_frees_its_slot() {
    let mut ix = KvIndexer::new();
    ix.apply(&stored(1, 0, None, &[10, 11]));
    ix.apply(&stored(2, 0, None, &[10, 20]));
    ix.insert_expiring(2, &[10, 21], 1_000);
    ix.remove_worker(2);
    assert_eq!(ix.workers(), vec![1]);
    assert_eq!(scores(&ix, &[10, 20]), vec![(1, 1)]);
    assert_eq!(ix.block_count(), 2);
    // A newcomer reuses the slot and starts clean; the old expiry does not touch it.
    assert_eq!(
        ix.apply(&stored(3, 0, None, &[10, 21])),
        EventOutcome::Applied
    );
    ix.expire(1_000);
    assert_eq!(scores(&ix, &[10, 21]), vec![(1, 1), (3, 2)]);
    // The removed worker's events start from scratch: a late id needs a snapshot.
    assert_eq!(
        ix.apply(&stored(2, 5, None, &[30])),
        EventOutcome::NeedsResync
    );
}

#[test]
fn a_gap_asks_for_a_snapshot_once_and_buffers_until_it_comes() {
    let mut ix = KvIndexer::new();
    ix.apply(&stored(1, 0, None, &[10]));
    assert_eq!(
        ix.apply(&stored(1, 2, Some(10), &[11])),
        EventOutcome::NeedsResync
    );
    assert_eq!(ix.needs_resync(), vec![1]);
    assert_eq!(
        ix.apply(&stored(1, 3, Some(11), &[12])),
        EventOutcome::Buffered
    );
    // The snapshot covers events up to 2 (event 1 evicted block 10).
    let snapshot = [
        KvEventData::Cleared,
        KvEventData::Stored {
            parent: Some(10),
            blocks: vec![StoredBlock { hash: 11 }],
        },
    ];
    assert_eq!(
        ix.apply_snapshot(1, Some(2), &snapshot),
        EventOutcome::Applied
    );
    assert_eq!(ix.needs_resync(), Vec::<u64>::new());
    assert_eq!(
        ix.worker_blocks(1),
        vec![11, 12],
        "snapshot plus the buffered event 3"
    );
    assert_eq!(
        ix.apply(&stored(1, 3, Some(11), &[12])),
        EventOutcome::Stale
    );
    assert_eq!(
        ix.apply(&stored(1, 4, Some(12), &[13])),
        EventOutcome::Applied
    );
    // A worker first seen mid-stream needs a snapshot too.
    assert_eq!(
        ix.apply(&stored(9, 7, None, &[1])),
        EventOutcome::NeedsResync
    );
}

#[test]
fn a_restart_is_detected_and_drops_the_old_cache() {
    let mut ix = KvIndexer::new();
    for id in 0..5 {
        ix.apply(&stored(1, id, None, &[100 + id]));
    }
    assert_eq!(ix.apply(&stored(1, 0, None, &[7])), EventOutcome::Restarted);
    assert_eq!(ix.worker_blocks(1), vec![7]);
    assert_eq!(
        ix.apply(&stored(1, 1, Some(7), &[8])),
        EventOutcome::Applied
    );
}

#[test]
fn approximate_entries_vanish_after_their_ttl_unless_refreshed() {
    let mut ix = KvIndexer::new();
    ix.insert_expiring(1, &[10, 11, 12], 100);
    ix.insert_expiring(2, &[10], 150);
    ix.expire(99);
    assert_eq!(scores(&ix, &[10, 11, 12]), vec![(1, 3), (2, 1)]);
    // Worker 1 is routed the first two blocks again at t=60: they live to 160.
    ix.insert_expiring(1, &[10, 11], 160);
    ix.expire(100);
    assert_eq!(scores(&ix, &[10, 11, 12]), vec![(1, 2), (2, 1)]);
    ix.expire(150);
    assert_eq!(scores(&ix, &[10, 11, 12]), vec![(1, 2)]);
    ix.expire(160);
    assert_eq!(scores(&ix, &[10, 11, 12]), vec![]);
    assert_eq!(ix.block_count(), 0);
}

#[test]
fn predicted_blocks_confirmed_by_events_survive_while_unconfirmed_ones_expire() {
    let mut ix = KvIndexer::new();
    ix.insert_expiring(1, &[10, 11, 12], 50);
    ix.apply(&stored(1, 0, None, &[10, 11]));
    // A later prediction does not turn a confirmed block back into an expiring one.
    ix.insert_expiring(1, &[10, 11, 12], 80);
    ix.expire(80);
    assert_eq!(ix.worker_blocks(1), vec![10, 11]);
    assert_eq!(scores(&ix, &[10, 11, 12]), vec![(1, 2)]);
    // A prediction evicted before it expires is gone for good.
    ix.insert_expiring(1, &[20], 90);
    ix.apply(&removed(1, 1, &[20]));
    ix.insert_expiring(1, &[21], 95);
    ix.expire(95);
    assert_eq!(ix.worker_blocks(1), vec![10, 11]);
}

const BS: usize = 4;

/// A sequence's blocks after prefill of `tokens` on the mocker's block manager.
fn prefill(bm: &mut BlockManager, tokens: &[u32]) -> Option<Vec<BlockId>> {
    let hashes = block_hashes(tokens, BS, 1337);
    let m = bm.peek_prefix(&hashes);
    if tokens.len().div_ceil(BS) - m.blocks > bm.available() - m.inactive {
        return None;
    }
    let mut table = Vec::new();
    let hit = bm.acquire_prefix(&hashes, &mut table);
    bm.allocate(tokens.len().div_ceil(BS) - hit, &mut table)
        .ok()?;
    let parent = hit.checked_sub(1).map(|i| hashes[i]);
    bm.promote(&mut table[hit..hashes.len()], parent, &hashes[hit..]);
    Some(table)
}

/// Against the mocker's real block manager, with events lost at random and snapshots
/// arriving one step late: unless the newest events were the lost ones (no gap can show
/// yet), the index either waits for a snapshot or equals the cache exactly.
#[test]
fn snapshots_repair_the_index_exactly_against_the_real_block_manager() {
    let mut resyncs = 0;
    for seed in 0..20u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut bm = BlockManager::new(5, 24, true);
        let mut ix = KvIndexer::new();
        let mut live = Vec::new();
        let mut pending_snapshot = None;
        // The newest events were lost: nothing can show the gap until a later one comes.
        let mut blind = false;
        for _ in 0..300 {
            if rng.f64() < 0.6 {
                let root = rng.u32(0..4);
                let tokens: Vec<u32> = (0..rng.u32(1..30)).map(|i| root * 1000 + i).collect();
                live.extend(prefill(&mut bm, &tokens));
            } else if !live.is_empty() {
                bm.release(&live.swap_remove(rng.usize(..live.len())));
            }
            let mut published = Vec::new();
            bm.drain_events(&mut published);
            for e in &published {
                if rng.f64() < 0.05 {
                    blind = true; // lost in transit
                    continue;
                }
                blind = false;
                if ix.apply(e) == EventOutcome::NeedsResync {
                    resyncs += 1;
                }
            }
            // The snapshot asked for last step arrives now, after this step's events.
            if let Some(snap) = pending_snapshot.take() {
                let dynamo_mocker::KvSnapshot {
                    worker_id,
                    last_event_id,
                    events,
                } = snap;
                ix.apply_snapshot(worker_id, last_event_id, &events);
            }
            if ix.needs_resync().is_empty() {
                if blind {
                    continue;
                }
                assert_eq!(ix.worker_blocks(5), bm.cached_hashes(), "seed {seed}");
            } else {
                pending_snapshot = Some(bm.snapshot());
            }
        }
    }
    assert!(resyncs > 20, "the test lost events: {resyncs} gaps");
}

#[test]
fn a_batch_applies_like_its_events_one_by_one() {
    let events = vec![
        stored(1, 0, None, &[10, 11, 12]),
        stored(2, 0, None, &[10, 11]),
        removed(1, 1, &[12]),
        stored(3, 0, None, &[10, 11, 12, 13]),
        stored(4, 0, None, &[10]),
        stored(5, 0, None, &[10]),
        removed(3, 1, &[13, 99]),
        stored(2, 5, None, &[20]), // a gap
        removed(2, 6, &[10]),      // buffered behind it
    ];
    let mut one = KvIndexer::new();
    let want: Vec<EventOutcome> = events.iter().map(|e| one.apply(e)).collect();
    let mut batch = KvIndexer::new();
    let mut got = Vec::new();
    batch.apply_batch(&events, |e, outcome| got.push((e.worker_id, outcome)));
    let want: Vec<_> = events.iter().map(|e| e.worker_id).zip(want).collect();
    assert_eq!(got, want);
    for hashes in [&[10, 11, 12, 13][..], &[10, 20], &[11]] {
        assert_eq!(scores(&batch, hashes), scores(&one, hashes), "{hashes:?}");
    }
    assert_eq!(batch.block_count(), one.block_count());
}

#[test]
fn a_large_index_survives_growth_churn_and_a_cleared_worker() {
    // Past the size where the table is mapped on huge pages; checked against a model.
    let mut ix = KvIndexer::new();
    let mut model: std::collections::BTreeMap<u64, std::collections::BTreeSet<u64>> =
        Default::default();
    let mut ids = [0u64; 8];
    let mut rng = fastrand::Rng::with_seed(7);
    for round in 0..400_000u64 {
        let w = rng.u64(..8);
        let h = rng.u64(..300_000).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let data = if round % 3 == 2 {
            model.entry(h).or_default().remove(&w);
            KvEventData::Removed { blocks: vec![h] }
        } else {
            model.entry(h).or_default().insert(w);
            KvEventData::Stored {
                parent: None,
                blocks: vec![StoredBlock { hash: h }],
            }
        };
        let id = ids[w as usize];
        ids[w as usize] += 1;
        assert_eq!(
            ix.apply(&KvEvent {
                worker_id: w,
                event_id: id,
                data
            }),
            EventOutcome::Applied
        );
    }
    model.retain(|_, ws| !ws.is_empty());
    assert_eq!(ix.block_count(), model.len());
    for (h, ws) in model.iter().take(5_000) {
        let got: Vec<u64> = ix
            .find_matches(&[*h])
            .sorted()
            .iter()
            .map(|s| s.0)
            .collect();
        assert_eq!(got, ws.iter().copied().collect::<Vec<_>>());
    }
    let clear = KvEvent {
        worker_id: 3,
        event_id: ids[3],
        data: KvEventData::Cleared,
    };
    assert_eq!(ix.apply(&clear), EventOutcome::Applied);
    let mut want_3 = Vec::new();
    for (h, ws) in model.iter_mut() {
        ws.remove(&3);
        if !ws.is_empty() {
            want_3.push(*h);
        }
    }
    assert_eq!(ix.block_count(), want_3.len());
    assert!(ix.worker_blocks(3).is_empty());
}
