//! KV-cache block identity and KV events (`kv.events/v1`), in one place for engines and
//! routers alike.
//!
//! A prompt is cut into blocks of `block_size` token ids; each full block is hashed with
//! seeded xxh3 over its parent's hash followed by its tokens, so equal prefixes give equal
//! hash sequences and a block's hash identifies its whole prefix. A partial last block has
//! no hash: it is never cached.

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The identity of one full block and, through the chain, of its whole prefix.
pub type BlockHash = u64;

/// Seed of the block hash; every engine and router of a graph must use the same one.
pub const DEFAULT_BLOCK_HASH_SEED: u64 = 1337;

/// Hashes of the full blocks of `tokens`, chained parent → child.
///
/// `block_size` of 0 yields no blocks.
pub fn block_hashes(tokens: &[u32], block_size: usize, seed: u64) -> Vec<BlockHash> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(tokens.len() / block_size);
    let mut buf = Vec::with_capacity(8 + block_size * 4);
    let mut parent: Option<BlockHash> = None;
    for chunk in tokens.chunks_exact(block_size) {
        let h = hash_into(&mut buf, parent, chunk, seed);
        out.push(h);
        parent = Some(h);
    }
    out
}

/// The hash of one block of `tokens` whose parent block hashes to `parent` (`None` for
/// the first block): the link [`block_hashes`] computes, for callers that learn blocks
/// one at a time (an external engine's KV events).
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32], seed: u64) -> BlockHash {
    hash_into(
        &mut Vec::with_capacity(8 + tokens.len() * 4),
        parent,
        tokens,
        seed,
    )
}

fn hash_into(buf: &mut Vec<u8>, parent: Option<BlockHash>, tokens: &[u32], seed: u64) -> BlockHash {
    buf.clear();
    // The root block has no parent; hashing a marker keeps it distinct from a child
    // whose parent hash happens to be 0.
    buf.extend_from_slice(&parent.map_or([0xff; 8], u64::to_le_bytes));
    for t in tokens {
        buf.extend_from_slice(&t.to_le_bytes());
    }
    xxh3_64_with_seed(buf, seed)
}

/// A block stored in a worker's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBlock {
    pub hash: BlockHash,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvEventData {
    /// Blocks became cached, in chain order, the first one a child of `parent`.
    Stored {
        parent: Option<BlockHash>,
        blocks: Vec<StoredBlock>,
    },
    /// Blocks were evicted.
    Removed { blocks: Vec<BlockHash> },
    /// The whole cache was dropped (restart, reset).
    Cleared,
}

/// One change to a worker's KV cache. `event_id` is monotonic per worker, so a router can
/// detect a gap and ask for the worker's state to be replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEvent {
    pub worker_id: u64,
    pub event_id: u64,
    pub data: KvEventData,
}

/// What a worker's `events` port streams to a router that subscribed: first the whole
/// cache as a snapshot, then every event after it. A router that sees a gap in
/// `event_id`s subscribes again and starts over from a fresh snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvStreamItem {
    Snapshot {
        worker_id: u64,
        /// The last event the snapshot includes; `None` when none was published yet.
        last_event_id: Option<u64>,
        /// `Cleared`, then `Stored` parents first.
        events: Vec<KvEventData>,
    },
    Event(KvEvent),
}

/// The request that opens a worker's event stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvSubscribe;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_prefixes_give_equal_hashes() {
        let a: Vec<u32> = (0..64).collect();
        let mut b = a.clone();
        b[40] = 999;
        let ha = block_hashes(&a, 16, DEFAULT_BLOCK_HASH_SEED);
        let hb = block_hashes(&b, 16, DEFAULT_BLOCK_HASH_SEED);
        assert_eq!(ha.len(), 4);
        assert_eq!(ha[..2], hb[..2]);
        assert_ne!(ha[2], hb[2]);
        // A change in block 2 changes every later hash through the chain.
        assert_ne!(ha[3], hb[3]);
    }

    #[test]
    fn one_block_at_a_time_matches_the_chain() {
        let t: Vec<u32> = (0..48).collect();
        let chain = block_hashes(&t, 16, 7);
        let mut parent = None;
        for (i, block) in t.chunks_exact(16).enumerate() {
            let h = block_hash(parent, block, 7);
            assert_eq!(h, chain[i]);
            parent = Some(h);
        }
    }

    #[test]
    fn partial_block_is_not_hashed() {
        let t: Vec<u32> = (0..47).collect();
        assert_eq!(block_hashes(&t, 16, 1).len(), 2);
        assert!(block_hashes(&t, 0, 1).is_empty());
    }

    #[test]
    fn same_tokens_at_other_position_differ() {
        let block: Vec<u32> = vec![7; 16];
        let two: Vec<u32> = block.iter().chain(block.iter()).copied().collect();
        let h = block_hashes(&two, 16, 1);
        assert_ne!(h[0], h[1], "the parent is part of the identity");
        assert_ne!(
            block_hashes(&block, 16, 1),
            block_hashes(&block, 16, 2),
            "the seed is part of the identity"
        );
    }
}
