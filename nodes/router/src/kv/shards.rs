//! The KV index split by worker into shards, each a [`KvIndexer`] behind its own lock, so
//! that the events of workers in different shards are applied at the same time on
//! different cores.
//!
//! Why by worker: a worker's events (and its event-id check, its snapshot, its removal)
//! touch one shard only, and the host follows each worker's events in a task of its own,
//! so those tasks no longer queue on one lock. A lookup asks every shard in turn and puts
//! the answers side by side: their workers are disjoint, so nothing is combined. A block
//! held by workers of two shards is stored in both (the `indexed_blocks` metric counts it
//! once per shard). This is the shape of NVIDIA Dynamo's concurrent indexer: writes sticky
//! per worker, reads across.

use dynamo_protocol::{BlockHash, KvEvent, KvEventData};
use dynamo_runtime::InstanceId;
use parking_lot::{Mutex, MutexGuard};

use super::indexer::{KvIndexer, OverlapScores};
use super::sync::EventOutcome;

/// Most shards [`ShardedIndex::for_this_machine`] makes.
const MAX_SHARDS: usize = 8;

/// [`KvIndexer`]s by worker, each behind its own lock. Every method takes `&self`.
#[derive(Debug)]
pub struct ShardedIndex {
    shards: Box<[Shard]>,
}

/// A shard on cache lines of its own (two: the adjacent-line prefetcher pairs them), so
/// one core's updates of its shard do not take the line of another shard's lock away
/// from the core that holds it.
#[derive(Debug)]
#[repr(align(128))]
struct Shard(Mutex<KvIndexer>);

impl ShardedIndex {
    /// `shards` shards (at least one).
    pub fn new(shards: usize) -> Self {
        ShardedIndex {
            shards: (0..shards.max(1))
                .map(|_| Shard(Mutex::new(KvIndexer::new())))
                .collect(),
        }
    }

    /// One shard per core this process may use, at most eight.
    pub fn for_this_machine() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::new(cores.min(MAX_SHARDS))
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard of `worker`: a multiply spreads consecutive ids.
    pub fn shard_of(&self, worker: InstanceId) -> usize {
        let mixed = worker.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        (mixed % self.shards.len() as u64) as usize
    }

    fn lock(&self, worker: InstanceId) -> MutexGuard<'_, KvIndexer> {
        self.shards[self.shard_of(worker)].0.lock()
    }

    /// [`KvIndexer::apply`] in the worker's shard. The lock is handed to a waiting thread
    /// rather than taken straight back for the next event: a burst of events must not hold
    /// routing up.
    pub fn apply(&self, event: &KvEvent) -> EventOutcome {
        let mut shard = self.lock(event.worker_id);
        let outcome = shard.apply(event);
        MutexGuard::unlock_fair(shard);
        outcome
    }

    /// [`KvIndexer::apply_snapshot`] in the worker's shard.
    pub fn apply_snapshot(
        &self,
        worker: InstanceId,
        last_event_id: Option<u64>,
        events: &[KvEventData],
    ) -> EventOutcome {
        self.lock(worker)
            .apply_snapshot(worker, last_event_id, events)
    }

    /// Workers whose index waits for a snapshot, sorted.
    pub fn needs_resync(&self) -> Vec<InstanceId> {
        let mut out: Vec<_> = (self.shards.iter())
            .flat_map(|s| s.0.lock().needs_resync())
            .collect();
        out.sort_unstable();
        out
    }

    /// Forgets a worker that left.
    pub fn remove_worker(&self, worker: InstanceId) {
        self.lock(worker).remove_worker(worker);
    }

    /// [`KvIndexer::insert_expiring`] in the worker's shard.
    pub fn insert_expiring(&self, worker: InstanceId, hashes: &[BlockHash], expires_at: u64) {
        self.lock(worker)
            .insert_expiring(worker, hashes, expires_at);
    }

    /// Drops the expired entries (expiry ≤ `now`, ms), then gives each worker's matched
    /// prefix of `hashes`, shard by shard.
    pub fn find_matches(&self, hashes: &[BlockHash], now: u64) -> OverlapScores {
        let mut out: Option<OverlapScores> = None;
        for shard in self.shards.iter() {
            let part = {
                let mut shard = shard.0.lock();
                shard.expire(now);
                shard.find_matches(hashes)
            };
            match &mut out {
                Some(all) => all.merge(part),
                None => out = Some(part),
            }
        }
        out.unwrap_or_default()
    }

    /// Blocks indexed, summed over the shards.
    pub fn block_count(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().block_count()).sum()
    }

    /// Workers the index knows, sorted.
    pub fn workers(&self) -> Vec<InstanceId> {
        let mut out: Vec<_> = self
            .shards
            .iter()
            .flat_map(|s| s.0.lock().workers())
            .collect();
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
#[path = "shards_tests.rs"]
mod tests;
