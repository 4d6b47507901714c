//! Importing blocks computed elsewhere (a prefill worker's hand-off) into the pool as
//! cached blocks, as if this worker had computed them itself.

use std::collections::HashSet;

use dynamo_protocol::{BlockHash, StoredBlock};
use foldhash::fast::RandomState;

use super::{BlockId, BlockManager, OutOfBlocks};

/// Why blocks could not be imported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error("prefix caching is off on this worker: imported blocks would never be found")]
    CachingDisabled,
    #[error("block hash {0:#018x} appears twice in one chain")]
    RepeatedHash(BlockHash),
    #[error("cannot import the KV blocks: {0}")]
    OutOfBlocks(#[from] OutOfBlocks),
    #[error("writing the KV blocks failed: {0}")]
    Backend(String),
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Imported {
    /// The pool blocks now holding the chain, in chain order.
    pub chain: Vec<BlockId>,
    /// Blocks that became cached.
    pub stored: usize,
    /// Blocks that were cached already (now among the most recently used).
    pub refreshed: usize,
}

impl BlockManager {
    /// Caches the chain `hashes` (the first a child of `parent`) as inactive blocks, the
    /// most recently used ones, tail first in the LRU like a finished sequence's blocks.
    /// Blocks already cached are refreshed; new ones take free blocks or evict the oldest
    /// inactive ones (never one of this chain). All or nothing: when the new blocks do not
    /// fit, nothing changes. Publishes `Removed` for evictions and `Stored` for new blocks.
    pub fn import(
        &mut self,
        parent: Option<BlockHash>,
        hashes: &[BlockHash],
    ) -> Result<Imported, ImportError> {
        if !self.caching {
            return Err(ImportError::CachingDisabled);
        }
        let mut seen: HashSet<BlockHash, RandomState> = HashSet::default();
        for &hash in hashes {
            if !seen.insert(hash) {
                return Err(ImportError::RepeatedHash(hash));
            }
        }
        // Hold the chain's cached blocks first, so that making room cannot evict them.
        let mut held: Vec<BlockId> = Vec::with_capacity(hashes.len());
        for hash in hashes {
            if let Some(&id) = self.by_hash.get(hash) {
                self.take_ref(id);
                held.push(id);
            }
        }
        let refreshed = held.len();
        let mut fresh: Vec<BlockId> = Vec::with_capacity(hashes.len() - refreshed);
        if let Err(err) = self.allocate(hashes.len() - refreshed, &mut fresh) {
            self.release(&held);
            return Err(err.into());
        }
        let mut fresh = fresh.into_iter();
        // One reference per block of the chain, in chain order.
        let mut chain: Vec<BlockId> = Vec::with_capacity(hashes.len());
        let mut run: Vec<StoredBlock> = Vec::new();
        let mut run_parent = parent;
        let mut prev = parent;
        for &hash in hashes {
            if let Some(&id) = self.by_hash.get(&hash) {
                self.flush_stored(&mut run, run_parent);
                chain.push(id);
            } else if let Some(id) = fresh.next() {
                if run.is_empty() {
                    run_parent = prev;
                }
                let block = &mut self.blocks[id as usize];
                block.hash = Some(hash);
                block.parent = prev;
                self.by_hash.insert(hash, id);
                chain.push(id);
                run.push(StoredBlock { hash });
            }
            prev = Some(hash);
        }
        self.flush_stored(&mut run, run_parent);
        // Tail first, so the chain's suffix is evicted before its prefix.
        self.release(&chain);
        Ok(Imported {
            chain,
            stored: hashes.len() - refreshed,
            refreshed,
        })
    }
}

#[cfg(test)]
#[path = "block_import_tests.rs"]
mod tests;
