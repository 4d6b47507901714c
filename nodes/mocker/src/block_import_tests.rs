use dynamo_protocol::{block_hashes, KvEvent, KvEventData, StoredBlock};

use super::super::{BlockId, BlockManager};
use super::*;

const BS: usize = 4;

fn chain(first_token: u32, blocks: usize) -> Vec<BlockHash> {
    let tokens: Vec<u32> = (first_token..first_token + (blocks * BS) as u32).collect();
    block_hashes(&tokens, BS, 1337)
}

fn events(bm: &mut BlockManager) -> Vec<KvEvent> {
    let mut out = Vec::new();
    bm.drain_events(&mut out);
    out
}

fn data(events: &[KvEvent]) -> Vec<KvEventData> {
    events.iter().map(|e| e.data.clone()).collect()
}

fn stored(parent: Option<BlockHash>, hashes: &[BlockHash]) -> KvEventData {
    KvEventData::Stored {
        parent,
        blocks: hashes.iter().map(|&hash| StoredBlock { hash }).collect(),
    }
}

/// The pool's invariants: every block in one state, cached ones findable.
fn check(bm: &BlockManager) {
    let c = bm.counts();
    assert_eq!(c.active + c.cached_inactive + c.free, c.total);
    for (&stamp, &id) in &bm.lru {
        let b = bm.blocks[id as usize];
        assert_eq!(b.refcount, 0);
        assert_eq!(b.stamp, stamp);
        assert_eq!(b.hash.map(|h| bm.by_hash.get(&h)), Some(Some(&id)));
    }
}

#[test]
fn imported_chain_is_cached_inactive_and_found_as_a_prefix() {
    let mut bm = BlockManager::new(3, 8, true);
    let hashes = chain(10, 5);
    let done = bm.import(None, &hashes[..3]).unwrap();
    assert_eq!((done.stored, done.refreshed), (3, 0));
    assert_eq!(done.chain.len(), 3);
    let done = bm.import(Some(hashes[2]), &hashes[3..]).unwrap();
    assert_eq!((done.stored, done.refreshed), (2, 0));
    assert_eq!(done.chain.len(), 2);
    check(&bm);
    let c = bm.counts();
    assert_eq!((c.active, c.cached_inactive, c.free), (0, 5, 3));
    assert_eq!(bm.peek_prefix(&hashes).blocks, 5);
    assert_eq!(
        data(&events(&mut bm)),
        vec![
            stored(None, &hashes[..3]),
            stored(Some(hashes[2]), &hashes[3..])
        ]
    );
    // The chain's parents are what a snapshot replays.
    let snapshot = bm.snapshot();
    assert_eq!(snapshot.events.len(), 1 + 5);
    assert_eq!(snapshot.events[2], stored(Some(hashes[0]), &hashes[1..2]));
}

#[test]
fn cached_blocks_are_refreshed_not_stored_again() {
    let mut bm = BlockManager::new(0, 8, true);
    let hashes = chain(0, 4);
    bm.import(None, &hashes[..2]).unwrap();
    let other = chain(100, 2);
    bm.import(None, &other).unwrap();
    events(&mut bm);
    let done = bm.import(None, &hashes).unwrap();
    assert_eq!((done.stored, done.refreshed), (2, 2));
    assert_eq!(done.chain.len(), 4);
    assert_eq!(
        data(&events(&mut bm)),
        vec![stored(Some(hashes[1]), &hashes[2..])]
    );
    check(&bm);
    // Refreshed: `other` is now the oldest and goes first when room is needed, then the
    // deepest imported block, before its prefix.
    assert_eq!(bm.counts().free, 2);
    let mut table: Vec<BlockId> = Vec::new();
    bm.allocate(5, &mut table).unwrap();
    assert_eq!(
        data(&events(&mut bm)),
        vec![KvEventData::Removed {
            blocks: vec![other[1], other[0], hashes[3]]
        }]
    );
    assert_eq!(bm.peek_prefix(&hashes).blocks, 3);
}

#[test]
fn a_full_pool_evicts_inactive_blocks_but_never_the_chain_itself() {
    let mut bm = BlockManager::new(0, 4, true);
    let old = chain(500, 2);
    bm.import(None, &old).unwrap();
    let hashes = chain(0, 4);
    // Two of the chain are cached already and the two others take the evicted ones.
    bm.import(None, &hashes[..2]).unwrap();
    events(&mut bm);
    let done = bm.import(None, &hashes).unwrap();
    assert_eq!((done.stored, done.refreshed), (2, 2));
    assert_eq!(done.chain.len(), 4);
    let ev = data(&events(&mut bm));
    // The old chain went tail first.
    assert_eq!(
        ev[0],
        KvEventData::Removed {
            blocks: vec![old[1], old[0]]
        }
    );
    assert_eq!(ev[1], stored(Some(hashes[1]), &hashes[2..]));
    assert_eq!(bm.peek_prefix(&hashes).blocks, 4);
    check(&bm);
}

#[test]
fn what_does_not_fit_changes_nothing() {
    let mut bm = BlockManager::new(0, 4, true);
    let mut held: Vec<BlockId> = Vec::new();
    bm.allocate(2, &mut held).unwrap();
    let cached = chain(900, 1);
    bm.import(None, &cached).unwrap();
    events(&mut bm);
    let before = bm.counts();
    let err = bm.import(None, &chain(0, 3)).unwrap_err();
    assert_eq!(
        err,
        ImportError::OutOfBlocks(OutOfBlocks {
            needed: 3,
            available: 2
        })
    );
    assert_eq!(bm.counts(), before, "nothing taken, nothing leaked");
    assert!(events(&mut bm).is_empty(), "nothing evicted");
    assert_eq!(bm.peek_prefix(&cached).blocks, 1);
    // A chain that holds a cached block needs one block fewer, and cannot evict it.
    let mut longer = cached.clone();
    longer.extend(chain(7, 2));
    assert!(bm.import(None, &longer).is_err());
    longer.pop();
    assert!(bm.import(None, &longer).is_ok());
    check(&bm);
}

#[test]
fn no_caching_and_repeated_hashes_are_refused() {
    let mut off = BlockManager::new(0, 4, false);
    assert_eq!(
        off.import(None, &chain(0, 1)),
        Err(ImportError::CachingDisabled)
    );
    assert_eq!(off.counts().free, 4);
    let mut bm = BlockManager::new(0, 4, true);
    let h = chain(0, 1)[0];
    assert_eq!(
        bm.import(None, &[h, 5, h]),
        Err(ImportError::RepeatedHash(h))
    );
    assert_eq!(bm.counts().free, 4);
    assert!(events(&mut bm).is_empty());
    assert_eq!(bm.import(None, &[]), Ok(Imported::default()));
}

#[test]
fn the_chain_names_the_blocks_holding_each_hash() {
    let mut bm = BlockManager::new(1, 8, true);
    let hashes = chain(3, 4);
    let done = bm.import(None, &hashes).unwrap();
    let found: Vec<_> = hashes.iter().map(|&h| bm.block_of(h)).collect();
    let expected: Vec<_> = done.chain.iter().map(|&id| Some(id)).collect();
    assert_eq!(found, expected);
    let again = bm.import(None, &hashes[..2]).unwrap();
    assert_eq!(again.chain, done.chain[..2].to_vec());
}
