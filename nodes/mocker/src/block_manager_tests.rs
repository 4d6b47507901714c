use std::collections::BTreeSet;

use dynamo_protocol::{block_hashes, KvEvent, KvEventData, StoredBlock};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

use super::*;

const BS: usize = 4;

fn hashes_of(tokens: &[u32]) -> Vec<BlockHash> {
    block_hashes(tokens, BS, 1337)
}

fn events(bm: &mut BlockManager) -> Vec<KvEvent> {
    let mut out = Vec::new();
    bm.drain_events(&mut out);
    out
}

/// Every block is in exactly one state and the counts say so.
fn check(bm: &BlockManager) {
    let c = bm.counts();
    assert_eq!(c.active + c.cached_inactive + c.free, c.total);
    let active = bm.blocks.iter().filter(|b| b.refcount > 0).count();
    assert_eq!(active, c.active);
    for &id in &bm.free {
        let b = bm.blocks[id as usize];
        assert_eq!((b.refcount, b.hash), (0, None), "free block {id}");
    }
    for (&stamp, &id) in &bm.lru {
        let b = bm.blocks[id as usize];
        assert_eq!(b.refcount, 0);
        assert_eq!(b.stamp, stamp);
        assert_eq!(bm.by_hash.get(&b.hash.unwrap()), Some(&id));
    }
}

/// A sequence's table after prefill of `tokens`: cached prefix taken, the rest allocated
/// and promoted.
fn prefill(bm: &mut BlockManager, tokens: &[u32]) -> Vec<BlockId> {
    let hashes = hashes_of(tokens);
    let mut table = Vec::new();
    let hit = bm.acquire_prefix(&hashes, &mut table);
    bm.allocate(tokens.len().div_ceil(BS) - hit, &mut table)
        .unwrap();
    let parent = hit.checked_sub(1).map(|i| hashes[i]);
    bm.promote(&mut table[hit..hashes.len()], parent, &hashes[hit..]);
    check(bm);
    table
}

#[test]
fn private_blocks_return_to_the_free_pool() {
    let mut bm = BlockManager::new(7, 8, true);
    let mut table = Vec::new();
    bm.allocate(3, &mut table).unwrap();
    assert_eq!(bm.counts().active, 3);
    assert_eq!(bm.counts().free, 5);
    bm.release(&table);
    assert_eq!(
        bm.counts(),
        BlockCounts {
            total: 8,
            active: 0,
            cached_inactive: 0,
            free: 8
        }
    );
    assert!(
        events(&mut bm).is_empty(),
        "private blocks are never announced"
    );
}

#[test]
fn full_blocks_are_stored_with_their_parent_and_reused() {
    let mut bm = BlockManager::new(7, 8, true);
    // Two full blocks and a partial one.
    let tokens: Vec<u32> = (0..10).collect();
    let hashes = hashes_of(&tokens);
    let a = prefill(&mut bm, &tokens);
    assert_eq!(a.len(), 3);
    let ev = events(&mut bm);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].worker_id, 7);
    assert_eq!(
        ev[0].data,
        KvEventData::Stored {
            parent: None,
            blocks: vec![
                StoredBlock { hash: hashes[0] },
                StoredBlock { hash: hashes[1] }
            ],
        }
    );

    // A second sequence with the same first block and a different second one.
    let mut other = tokens.clone();
    other[5] = 99;
    let other_hashes = hashes_of(&other);
    assert_eq!(
        bm.peek_prefix(&other_hashes),
        PrefixMatch {
            blocks: 1,
            inactive: 0
        }
    );
    let b = prefill(&mut bm, &other);
    assert_eq!(b[0], a[0], "the shared prefix block is one block");
    assert_eq!(bm.blocks[a[0] as usize].refcount, 2);
    let ev = events(&mut bm);
    assert_eq!(ev[0].event_id, 1);
    assert_eq!(
        ev[0].data,
        KvEventData::Stored {
            parent: Some(other_hashes[0]),
            blocks: vec![StoredBlock {
                hash: other_hashes[1]
            }],
        }
    );

    bm.release(&a);
    bm.release(&b);
    check(&bm);
    let c = bm.counts();
    assert_eq!((c.active, c.cached_inactive), (0, 3));
    assert_eq!(
        bm.peek_prefix(&hashes),
        PrefixMatch {
            blocks: 2,
            inactive: 2
        }
    );
}

#[test]
fn eviction_is_oldest_first_and_tail_first_within_a_sequence() {
    let mut bm = BlockManager::new(0, 5, true);
    let a: Vec<u32> = (0..12).collect(); // 3 full blocks
    let b: Vec<u32> = (100..108).collect(); // 2 full blocks
    let (ha, hb) = (hashes_of(&a), hashes_of(&b));
    let ta = prefill(&mut bm, &a);
    let tb = prefill(&mut bm, &b);
    bm.release(&ta); // released first: older
    bm.release(&tb);
    events(&mut bm);
    assert_eq!(bm.counts().free, 0);

    let mut removed = Vec::new();
    for _ in 0..5 {
        let mut t = Vec::new();
        bm.allocate(1, &mut t).unwrap();
        check(&bm);
        for e in events(&mut bm) {
            match e.data {
                KvEventData::Removed { blocks } => removed.extend(blocks),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(removed, vec![ha[2], ha[1], ha[0], hb[1], hb[0]]);
}

#[test]
fn reuse_refreshes_a_block_and_protects_it_from_eviction() {
    let mut bm = BlockManager::new(0, 4, true);
    let a: Vec<u32> = (0..8).collect();
    let b: Vec<u32> = (50..58).collect();
    let ta = prefill(&mut bm, &a);
    bm.release(&ta);
    let tb = prefill(&mut bm, &b);
    bm.release(&tb);
    // `a` is older, but using it again makes it the newest.
    let ta = prefill(&mut bm, &a);
    bm.release(&ta);
    events(&mut bm);
    let mut t = Vec::new();
    bm.allocate(2, &mut t).unwrap();
    let ev = events(&mut bm);
    let hb = hashes_of(&b);
    assert_eq!(
        ev.iter().map(|e| e.data.clone()).collect::<Vec<_>>(),
        vec![KvEventData::Removed {
            blocks: vec![hb[1], hb[0]]
        }]
    );
}

#[test]
fn allocation_is_all_or_nothing() {
    let mut bm = BlockManager::new(0, 4, true);
    let mut t = Vec::new();
    bm.allocate(3, &mut t).unwrap();
    let err = bm.allocate(2, &mut t).unwrap_err();
    assert_eq!(
        err,
        OutOfBlocks {
            needed: 2,
            available: 1
        }
    );
    assert_eq!(t.len(), 3);
    check(&bm);
}

#[test]
fn equal_content_computed_twice_is_held_once() {
    let mut bm = BlockManager::new(0, 8, true);
    let tokens: Vec<u32> = (0..8).collect();
    let hashes = hashes_of(&tokens);
    // Two sequences allocate privately before either is cached.
    let (mut t1, mut t2) = (Vec::new(), Vec::new());
    bm.allocate(2, &mut t1).unwrap();
    bm.allocate(2, &mut t2).unwrap();
    bm.promote(&mut t1, None, &hashes);
    bm.promote(&mut t2, None, &hashes);
    assert_eq!(t1, t2);
    assert_eq!(bm.counts().active, 2);
    assert_eq!(bm.counts().free, 6);
    assert_eq!(events(&mut bm).len(), 1, "stored once");
    bm.release(&t1);
    bm.release(&t2);
    check(&bm);
    assert_eq!(bm.counts().cached_inactive, 2);
}

#[test]
fn clear_forgets_everything_and_active_blocks_free_later() {
    let mut bm = BlockManager::new(0, 8, true);
    let a = prefill(&mut bm, &(0..8).collect::<Vec<u32>>());
    let b = prefill(&mut bm, &(20..28).collect::<Vec<u32>>());
    bm.release(&b);
    events(&mut bm);
    bm.clear();
    assert_eq!(events(&mut bm)[0].data, KvEventData::Cleared);
    assert!(bm.cached_hashes().is_empty());
    check(&bm);
    bm.release(&a);
    check(&bm);
    assert_eq!(bm.counts().free, 8);
}

#[test]
fn without_prefix_caching_nothing_is_shared_or_announced() {
    let mut bm = BlockManager::new(0, 8, false);
    let tokens: Vec<u32> = (0..8).collect();
    let a = prefill(&mut bm, &tokens);
    let b = prefill(&mut bm, &tokens);
    assert_ne!(a, b);
    bm.release(&a);
    bm.release(&b);
    bm.clear();
    assert!(events(&mut bm).is_empty());
    assert_eq!(bm.counts().free, 8);
}

/// Random workloads: event ids are consecutive, and replaying the events reproduces the
/// cached set exactly, whatever happened in between.
#[test]
fn replaying_events_reproduces_the_cache() {
    for seed in 0..20 {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut bm = BlockManager::new(3, 24, true);
        let mut live: Vec<Vec<BlockId>> = Vec::new();
        let mut replica: BTreeSet<BlockHash> = BTreeSet::new();
        let mut next_id = 0;
        for _ in 0..300 {
            match rng.random_range(0..10) {
                0..=4 => {
                    // Few distinct prefixes so that hits and evictions both happen.
                    let root = rng.random_range(0..4u32);
                    let len = rng.random_range(1..20usize);
                    let tokens: Vec<u32> = (0..len as u32).map(|i| root * 1000 + i).collect();
                    let need = tokens.len().div_ceil(BS);
                    let m = bm.peek_prefix(&hashes_of(&tokens));
                    if need - m.blocks <= bm.available() - m.inactive {
                        live.push(prefill(&mut bm, &tokens));
                    }
                }
                5..=8 if !live.is_empty() => {
                    let i = rng.random_range(0..live.len());
                    bm.release(&live.swap_remove(i));
                }
                9 if rng.random_bool(0.1) => bm.clear(),
                _ => {}
            }
            check(&bm);
            for e in events(&mut bm) {
                assert_eq!(e.event_id, next_id, "seed {seed}");
                next_id += 1;
                match e.data {
                    KvEventData::Stored { blocks, .. } => {
                        for b in blocks {
                            assert!(replica.insert(b.hash), "stored twice");
                        }
                    }
                    KvEventData::Removed { blocks } => {
                        for h in blocks {
                            assert!(replica.remove(&h), "removed but never stored");
                        }
                    }
                    KvEventData::Cleared => replica.clear(),
                }
            }
            assert_eq!(
                replica.iter().copied().collect::<Vec<_>>(),
                bm.cached_hashes(),
                "seed {seed}"
            );
        }
        for t in live.drain(..) {
            bm.release(&t);
        }
        assert_eq!(bm.counts().active, 0);
    }
}

fn apply(view: &mut BTreeSet<BlockHash>, data: &KvEventData) {
    match data {
        KvEventData::Stored { blocks, .. } => view.extend(blocks.iter().map(|b| b.hash)),
        KvEventData::Removed { blocks } => {
            for h in blocks {
                view.remove(h);
            }
        }
        KvEventData::Cleared => view.clear(),
    }
}

/// A snapshot rebuilds the cache from any stale view, parents first, and continues
/// seamlessly with the events published after it.
#[test]
fn snapshots_rebuild_the_cache_and_continue_with_later_events() {
    for seed in 0..10 {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut bm = BlockManager::new(5, 16, true);
        let mut live: Vec<Vec<BlockId>> = Vec::new();
        let mut late_view: Option<(u64, BTreeSet<BlockHash>)> = None;
        for step in 0..200 {
            if rng.random_bool(0.6) {
                let root = rng.random_range(0..3u32);
                let tokens: Vec<u32> = (0..rng.random_range(1..24u32))
                    .map(|i| root * 1000 + i)
                    .collect();
                let m = bm.peek_prefix(&hashes_of(&tokens));
                if tokens.len().div_ceil(BS) - m.blocks <= bm.available() - m.inactive {
                    live.push(prefill(&mut bm, &tokens));
                }
            } else if !live.is_empty() {
                let i = rng.random_range(0..live.len());
                bm.release(&live.swap_remove(i));
            }
            let mut published = Vec::new();
            bm.drain_events(&mut published);
            if step == 50 {
                let snap = bm.snapshot();
                assert_eq!(snap.worker_id, 5);
                assert_eq!(snap.events[0], KvEventData::Cleared);
                // Start from garbage: the leading Cleared wipes it.
                let mut view: BTreeSet<BlockHash> = [1, 2, 3].into_iter().collect();
                for e in &snap.events {
                    if let KvEventData::Stored {
                        parent: Some(p), ..
                    } = e
                    {
                        let cached = bm.by_hash.contains_key(p);
                        assert!(!cached || view.contains(p), "child before its parent");
                    }
                    apply(&mut view, e);
                }
                assert_eq!(view.iter().copied().collect::<Vec<_>>(), bm.cached_hashes());
                let last = snap.last_event_id.expect("events were published");
                late_view = Some((last, view));
            } else if let Some((last, view)) = late_view.as_mut() {
                for e in published.iter().filter(|e| e.event_id > *last) {
                    apply(view, &e.data);
                }
                assert_eq!(view.iter().copied().collect::<Vec<_>>(), bm.cached_hashes());
            }
        }
        assert!(late_view.is_some());
    }
}
