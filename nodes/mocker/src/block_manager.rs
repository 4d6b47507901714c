//! A fixed pool of KV blocks with refcounts, prefix caching and an LRU of inactive cached
//! blocks, publishing a KV event for every change to what is cached.
//!
//! Every block is in exactly one state:
//! - **free**: holds nothing;
//! - **active**: held by at least one sequence (refcount > 0); cached if it has a hash;
//! - **inactive**: cached, held by no sequence, waiting in the LRU to be reused or evicted.
//!
//! A block gets its hash (the chained hash of [`dynamo_protocol::block_hashes`], so the
//! router and this engine name blocks alike) only once it is full and computed; a partial
//! block stays private. Inactive blocks are evicted only when a new block is needed, oldest
//! first. A sequence releases its blocks tail first, each taking the next tick of a
//! monotonic clock, so a deep suffix is evicted before the prefix it shares with others.

use std::collections::{BTreeMap, HashMap};

use dynamo_protocol::{BlockHash, KvEvent, KvEventData, StoredBlock};
use foldhash::fast::RandomState;

#[path = "block_import.rs"]
mod import;
pub use import::{ImportError, Imported};

/// Index of a block in the pool.
pub type BlockId = u32;

#[derive(Debug, Clone, Copy, Default)]
struct Block {
    refcount: u32,
    hash: Option<BlockHash>,
    /// The hash of the block before this one in its chain, while `hash` is set.
    parent: Option<BlockHash>,
    /// Key in the LRU while the block is inactive.
    stamp: u64,
}

/// How the pool is used right now; `active + cached_inactive + free == total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockCounts {
    pub total: usize,
    pub active: usize,
    pub cached_inactive: usize,
    pub free: usize,
}

/// An allocation asked for more blocks than are free or evictable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("need {needed} KV blocks, only {available} are free or evictable")]
pub struct OutOfBlocks {
    pub needed: usize,
    pub available: usize,
}

/// How much of a chain of block hashes is cached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixMatch {
    /// Leading blocks found in the cache.
    pub blocks: usize,
    /// Of those, the ones now inactive (taking them makes them unavailable for eviction).
    pub inactive: usize,
}

/// A worker's whole cache as events, for a router that saw a gap in the `event_id`s or
/// joined late.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvSnapshot {
    pub worker_id: u64,
    /// The last event the snapshot includes; events with a higher id come after it.
    /// `None` when no event was published yet.
    pub last_event_id: Option<u64>,
    /// Applied in order, these rebuild the cache from any state: `Cleared`, then one
    /// `Stored` per cached block, every cached parent before its children.
    pub events: Vec<KvEventData>,
}

#[derive(Debug)]
pub struct BlockManager {
    worker_id: u64,
    caching: bool,
    blocks: Vec<Block>,
    free: Vec<BlockId>,
    by_hash: HashMap<BlockHash, BlockId, RandomState>,
    lru: BTreeMap<u64, BlockId>,
    clock: u64,
    next_event_id: u64,
    events: Vec<KvEvent>,
}

impl BlockManager {
    /// A pool of `num_blocks` free blocks. `num_blocks` is capped at `u32::MAX`.
    pub fn new(worker_id: u64, num_blocks: usize, enable_prefix_caching: bool) -> Self {
        let n = BlockId::try_from(num_blocks).unwrap_or(BlockId::MAX);
        BlockManager {
            worker_id,
            caching: enable_prefix_caching,
            blocks: vec![Block::default(); n as usize],
            // Reversed so that block 0 is handed out first.
            free: (0..n).rev().collect(),
            by_hash: HashMap::default(),
            lru: BTreeMap::new(),
            clock: 0,
            next_event_id: 0,
            events: Vec::new(),
        }
    }

    /// The block caching `hash`, if any.
    pub fn block_of(&self, hash: BlockHash) -> Option<BlockId> {
        self.by_hash.get(&hash).copied()
    }

    pub fn counts(&self) -> BlockCounts {
        let total = self.blocks.len();
        let free = self.free.len();
        let cached_inactive = self.lru.len();
        BlockCounts {
            total,
            active: total - free - cached_inactive,
            cached_inactive,
            free,
        }
    }

    /// Blocks an allocation can get: free ones plus evictable ones.
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// How many leading blocks of `hashes` are cached, without taking them.
    pub fn peek_prefix(&self, hashes: &[BlockHash]) -> PrefixMatch {
        let mut m = PrefixMatch::default();
        if !self.caching {
            return m;
        }
        for hash in hashes {
            let Some(&id) = self.by_hash.get(hash) else {
                break;
            };
            m.blocks += 1;
            if self.blocks[id as usize].refcount == 0 {
                m.inactive += 1;
            }
        }
        m
    }

    /// Takes the cached leading blocks of `hashes` (one reference each), appends their ids
    /// to `table` and returns how many there were.
    pub fn acquire_prefix(&mut self, hashes: &[BlockHash], table: &mut Vec<BlockId>) -> usize {
        if !self.caching {
            return 0;
        }
        let mut taken = 0;
        for hash in hashes {
            let Some(&id) = self.by_hash.get(hash) else {
                break;
            };
            self.take_ref(id);
            table.push(id);
            taken += 1;
        }
        taken
    }

    /// Appends `n` private blocks to `table`, evicting inactive cached blocks (oldest first)
    /// when no free one is left. All or nothing.
    pub fn allocate(&mut self, n: usize, table: &mut Vec<BlockId>) -> Result<(), OutOfBlocks> {
        let available = self.available();
        if n > available {
            return Err(OutOfBlocks {
                needed: n,
                available,
            });
        }
        let mut removed = Vec::new();
        for _ in 0..n {
            let id = match self.free.pop() {
                Some(id) => id,
                None => match self.lru.pop_first() {
                    Some((_, id)) => {
                        if let Some(hash) = self.blocks[id as usize].hash.take() {
                            self.by_hash.remove(&hash);
                            removed.push(hash);
                        }
                        id
                    }
                    // Unreachable: `n <= available` was checked above.
                    None => break,
                },
            };
            self.blocks[id as usize].refcount = 1;
            table.push(id);
        }
        if !removed.is_empty() {
            self.emit(KvEventData::Removed { blocks: removed });
        }
        Ok(())
    }

    /// Caches the consecutive full blocks `table[i]` under `hashes[i]`; `parent` is the
    /// hash of the block before `table[0]`. A block whose content is already cached under
    /// another id is swapped for that one (in `table`) and its own id freed, so equal
    /// content is held once. Publishes `Stored` for the blocks that became cached.
    pub fn promote(
        &mut self,
        table: &mut [BlockId],
        parent: Option<BlockHash>,
        hashes: &[BlockHash],
    ) {
        if !self.caching {
            return;
        }
        let mut run: Vec<StoredBlock> = Vec::new();
        let mut run_parent = parent;
        for (i, (slot, &hash)) in table.iter_mut().zip(hashes).enumerate() {
            let prev = if i == 0 { parent } else { Some(hashes[i - 1]) };
            let own = *slot;
            if self.blocks[own as usize].hash.is_some() {
                // Taken from the cache already: nothing new to store.
                self.flush_stored(&mut run, run_parent);
                continue;
            }
            match self.by_hash.get(&hash) {
                Some(&existing) => {
                    self.flush_stored(&mut run, run_parent);
                    self.take_ref(existing);
                    self.release_one(own);
                    *slot = existing;
                }
                None => {
                    if run.is_empty() {
                        run_parent = prev;
                    }
                    self.blocks[own as usize].hash = Some(hash);
                    self.blocks[own as usize].parent = prev;
                    self.by_hash.insert(hash, own);
                    run.push(StoredBlock { hash });
                }
            }
        }
        self.flush_stored(&mut run, run_parent);
    }

    /// Drops one reference to each block of `table`, tail first: blocks nobody holds any
    /// more become inactive (cached) or free (private).
    pub fn release(&mut self, table: &[BlockId]) {
        for &id in table.iter().rev() {
            self.release_one(id);
        }
    }

    /// Forgets every cached block: inactive ones become free, active ones private (freed
    /// when their sequences end). Publishes `Cleared`.
    pub fn clear(&mut self) {
        for (_, id) in std::mem::take(&mut self.lru) {
            self.blocks[id as usize].hash = None;
            self.free.push(id);
        }
        for (_, id) in self.by_hash.drain() {
            self.blocks[id as usize].hash = None;
        }
        if self.caching {
            self.emit(KvEventData::Cleared);
        }
    }

    /// Moves the events published since the last call to `out`, in `event_id` order.
    pub fn drain_events(&mut self, out: &mut Vec<KvEvent>) {
        out.append(&mut self.events);
    }

    /// Hashes of all cached blocks (active and inactive), sorted.
    pub fn cached_hashes(&self) -> Vec<BlockHash> {
        let mut hashes: Vec<BlockHash> = self.by_hash.keys().copied().collect();
        hashes.sort_unstable();
        hashes
    }

    /// The cache as events that rebuild it; includes every event published so far (drain
    /// them before handing the snapshot out).
    pub fn snapshot(&self) -> KvSnapshot {
        let mut children: HashMap<Option<BlockHash>, Vec<BlockHash>> = HashMap::new();
        for (&hash, &id) in &self.by_hash {
            let parent = self.blocks[id as usize].parent;
            // A block whose parent was evicted starts a chain of its own.
            let key = parent.filter(|p| self.by_hash.contains_key(p));
            children.entry(key).or_default().push(hash);
        }
        let mut events = vec![KvEventData::Cleared];
        let mut level = children.remove(&None).unwrap_or_default();
        while !level.is_empty() {
            level.sort_unstable();
            let mut next = Vec::new();
            for hash in level {
                let parent = self
                    .by_hash
                    .get(&hash)
                    .and_then(|&id| self.blocks[id as usize].parent);
                events.push(KvEventData::Stored {
                    parent,
                    blocks: vec![StoredBlock { hash }],
                });
                next.extend(children.remove(&Some(hash)).unwrap_or_default());
            }
            level = next;
        }
        KvSnapshot {
            worker_id: self.worker_id,
            last_event_id: self.next_event_id.checked_sub(1),
            events,
        }
    }

    fn take_ref(&mut self, id: BlockId) {
        let block = &mut self.blocks[id as usize];
        if block.refcount == 0 {
            self.lru.remove(&block.stamp);
        }
        block.refcount += 1;
    }

    fn release_one(&mut self, id: BlockId) {
        let Some(block) = self.blocks.get_mut(id as usize) else {
            return;
        };
        if block.refcount == 0 {
            // Released twice: a scheduler bug. Keep the pool consistent rather than panic.
            tracing::error!(block = id, "KV block released while not held");
            return;
        }
        block.refcount -= 1;
        if block.refcount > 0 {
            return;
        }
        if block.hash.is_some() {
            block.stamp = self.clock;
            self.clock += 1;
            self.lru.insert(block.stamp, id);
        } else {
            self.free.push(id);
        }
    }

    fn flush_stored(&mut self, run: &mut Vec<StoredBlock>, parent: Option<BlockHash>) {
        if !run.is_empty() {
            let blocks = std::mem::take(run);
            self.emit(KvEventData::Stored { parent, blocks });
        }
    }

    fn emit(&mut self, data: KvEventData) {
        self.events.push(KvEvent {
            worker_id: self.worker_id,
            event_id: self.next_event_id,
            data,
        });
        self.next_event_id += 1;
    }
}

#[cfg(test)]
#[path = "block_manager_tests.rs"]
mod tests;
