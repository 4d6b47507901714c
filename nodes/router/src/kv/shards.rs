//! The KV index split by worker into shards, each a [`KvIndexer`] behind its own lock, so
//! the events of workers in different shards apply at the same time on different threads
//! (the host follows each worker's event stream in a task of its own).
//!
//! A lookup visits every shard in turn, holding one lock at a time, and merges the parts:
//! the shards' workers are disjoint. NVIDIA Dynamo's indexer spreads its writes the same
//! way (sticky per-worker writer threads); here the host's tasks are the writers.

use dynamo_protocol::{BlockHash, KvEvent, KvEventData};
use dynamo_runtime::InstanceId;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use super::indexer::{for_each_block, KvIndexer, OverlapScores, TableView, FIND_AHEAD};
use super::sync::EventOutcome;

/// The most shards an index may have (`router.index_shards`).
pub const MAX_SHARDS: usize = 64;

/// How long a lookup spins on busy shards before it sleeps on a lock, and how long a
/// writer lets announced lookups in first. A writer holds a shard for one event (about a
/// microsecond); waking from a sleep on the lock costs tens of microseconds.
const SPIN_FOR: Duration = Duration::from_micros(20);

/// Spin rounds between two looks at the clock.
const ROUNDS_PER_LOOK: u32 = 64;

/// A bounded spin: true while [`SPIN_FOR`] has not passed since the first call.
#[derive(Default)]
struct Spin {
    since: Option<Instant>,
    rounds: u32,
}

impl Spin {
    fn again(&mut self) -> bool {
        self.rounds = self.rounds.wrapping_add(1);
        let since = *self.since.get_or_insert_with(Instant::now);
        if self.rounds % ROUNDS_PER_LOOK == 0 && since.elapsed() >= SPIN_FOR {
            return false;
        }
        std::hint::spin_loop();
        true
    }
}

/// The shards a lookup has said it waits for (a bit mask), each counted in the shard's
/// `waiting`; whatever is left is withdrawn on drop, a panic included, so a writer never
/// keeps waiting for a lookup that is gone.
struct Announced<'a> {
    shards: &'a [Shard],
    mask: u64,
}

impl Announced<'_> {
    /// Says it waits for the shards in `mask` (those not said already).
    fn add(&mut self, mask: u64) {
        let mut new = mask & !self.mask;
        self.mask |= mask;
        while new != 0 {
            let i = new.trailing_zeros() as usize;
            new &= new - 1;
            if let Some(s) = self.shards.get(i) {
                s.waiting.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Shard `i` was visited: the lookup no longer waits for it.
    fn withdraw(&mut self, i: usize) {
        if self.mask & (1 << i) != 0 {
            self.mask &= !(1 << i);
            if let Some(s) = self.shards.get(i) {
                s.waiting.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Announced<'_> {
    fn drop(&mut self) {
        while self.mask != 0 {
            self.withdraw(self.mask.trailing_zeros() as usize);
        }
    }
}

/// [`KvIndexer`]s of disjoint sets of workers, each behind its own lock.
#[derive(Debug)]
pub struct ShardedIndex {
    shards: Box<[Shard]>,
}

/// One shard, on cache lines of its own: its lock and counter are written by every
/// thread that uses it and must not share a line with another shard's.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    index: Mutex<KvIndexer>,
    /// Lookups spinning for this shard: a writer lets them in before taking it again.
    waiting: AtomicU32,
    /// Where the shard's block table was when last written ([`TableView`]), so a thread
    /// can start its cache misses before it takes the lock: the lock is then held for
    /// the work, not for the memory's latency.
    base: AtomicUsize,
    len: AtomicUsize,
    shift: AtomicU32,
}

impl Shard {
    /// The lock, for an event: after any lookup already waiting for it (a bounded wait).
    fn write(&self) -> MutexGuard<'_, KvIndexer> {
        let mut spin = Spin::default();
        while self.waiting.load(Ordering::Relaxed) > 0 && spin.again() {}
        self.index.lock()
    }

    /// The table's last published place (possibly stale, even torn: it is only ever
    /// used to prefetch).
    fn view(&self) -> TableView {
        TableView {
            base: self.base.load(Ordering::Relaxed),
            len: self.len.load(Ordering::Relaxed),
            shift: self.shift.load(Ordering::Relaxed),
        }
    }

    /// Publishes where the table is after a write (which may have grown or rebuilt it).
    fn publish(&self, index: &KvIndexer) {
        let now = index.table_view();
        if now != self.view() {
            self.base.store(now.base, Ordering::Relaxed);
            self.len.store(now.len, Ordering::Relaxed);
            self.shift.store(now.shift, Ordering::Relaxed);
        }
    }

    /// An event, its slots prefetched before the lock.
    fn apply(&self, event: &KvEvent) -> EventOutcome {
        let view = self.view();
        for_each_block(&event.data, |h| view.prefetch(h));
        let mut index = self.write();
        let outcome = index.apply(event);
        self.publish(&index);
        outcome
    }
}

impl ShardedIndex {
    /// `shards` empty shards (at least 1, at most [`MAX_SHARDS`]).
    pub fn new(shards: usize) -> Self {
        let n = shards.clamp(1, MAX_SHARDS);
        ShardedIndex {
            shards: (0..n).map(|_| Shard::default()).collect(),
        }
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard of `worker`: a multiplicative hash, so sequential ids spread too.
    pub fn shard_of(&self, worker: InstanceId) -> usize {
        let mixed = worker.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        (mixed % self.shards.len() as u64) as usize
    }

    fn shard(&self, worker: InstanceId) -> &Shard {
        &self.shards[self.shard_of(worker)]
    }

    /// [`KvIndexer::apply`] in the worker's shard, after the lookups already waiting
    /// for it: a burst of events must not hold routing up.
    pub fn apply(&self, event: &KvEvent) -> EventOutcome {
        self.shard(event.worker_id).apply(event)
    }

    /// [`KvIndexer::apply_batch`] of a run of one worker's events (any events are
    /// accepted; each run of the same shard is applied under one lock). `outcome` is
    /// called with the shard locked: it must not take the router's state lock.
    pub fn apply_batch(&self, events: &[KvEvent], mut outcome: impl FnMut(&KvEvent, EventOutcome)) {
        let mut rest = events;
        while let Some(first) = rest.first() {
            let at = self.shard_of(first.worker_id);
            let run = (rest.iter())
                .position(|e| self.shard_of(e.worker_id) != at)
                .unwrap_or(rest.len());
            let (now, later) = rest.split_at(run);
            let shard = &self.shards[at];
            let mut index = shard.write();
            index.apply_batch(now, &mut outcome);
            shard.publish(&index);
            rest = later;
        }
    }

    /// [`KvIndexer::apply_snapshot`] in the worker's shard.
    pub fn apply_snapshot(
        &self,
        worker: InstanceId,
        last_event_id: Option<u64>,
        events: &[KvEventData],
    ) -> EventOutcome {
        let shard = self.shard(worker);
        let mut index = shard.write();
        let outcome = index.apply_snapshot(worker, last_event_id, events);
        shard.publish(&index);
        outcome
    }

    /// Workers whose index waits for a snapshot, sorted.
    pub fn needs_resync(&self) -> Vec<InstanceId> {
        self.sorted_over_shards(KvIndexer::needs_resync)
    }

    /// Forgets a worker that left.
    pub fn remove_worker(&self, worker: InstanceId) {
        let shard = self.shard(worker);
        let mut index = shard.write();
        index.remove_worker(worker);
        shard.publish(&index);
    }

    /// [`KvIndexer::find_matches`] over every shard, each first expiring its entries due
    /// at `now` (ms). Shards another thread is writing are visited last. When every shard
    /// left is busy the lookup spins (for at most [`SPIN_FOR`]) and says so to the writers,
    /// which let it in before their next event; then it sleeps on the lock.
    pub fn find_matches(&self, hashes: &[BlockHash], now: u64) -> OverlapScores {
        let mut scores: Option<OverlapScores> = None;
        let mut visit = |shard: &mut KvIndexer| {
            shard.expire(now);
            let part = shard.find_matches(hashes);
            match scores.as_mut() {
                Some(s) => s.merge(part),
                None => scores = Some(part),
            }
        };
        for shard in self.shards.iter() {
            let view = shard.view();
            hashes
                .iter()
                .take(FIND_AHEAD)
                .for_each(|&h| view.prefetch(h));
        }
        // Shards not visited yet (a bit mask), and those this lookup said it waits for.
        let mut left: u64 = u64::MAX >> (64 - self.shards.len());
        let mut announced = Announced {
            shards: &self.shards,
            mask: 0,
        };
        let mut spin = Spin::default();
        while left != 0 {
            let before = left;
            let mut bits = left;
            while bits != 0 {
                let i = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if let Some(mut shard) = self.shards[i].index.try_lock() {
                    visit(&mut shard);
                    left &= !(1 << i);
                    announced.withdraw(i);
                }
            }
            if left != before {
                continue;
            }
            announced.add(left);
            if spin.again() {
                continue;
            }
            let i = left.trailing_zeros() as usize;
            visit(&mut self.shards[i].index.lock());
            left &= !(1 << i);
            announced.withdraw(i);
        }
        drop(announced);
        scores.unwrap_or_default()
    }

    /// [`KvIndexer::insert_expiring`] in the worker's shard.
    pub fn insert_expiring(&self, worker: InstanceId, hashes: &[BlockHash], expires_at: u64) {
        let shard = self.shard(worker);
        let mut index = shard.index.lock();
        index.insert_expiring(worker, hashes, expires_at);
        shard.publish(&index);
    }

    /// Entries over all shards: a block held by workers of two shards counts twice.
    pub fn block_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.index.lock().block_count())
            .sum()
    }

    /// Workers the index knows, sorted.
    pub fn workers(&self) -> Vec<InstanceId> {
        self.sorted_over_shards(KvIndexer::workers)
    }

    /// The workers `f` lists in each shard, all together, sorted.
    fn sorted_over_shards(&self, f: impl Fn(&KvIndexer) -> Vec<InstanceId>) -> Vec<InstanceId> {
        let mut out: Vec<_> = (self.shards.iter())
            .flat_map(|s| f(&s.index.lock()))
            .collect();
        out.sort_unstable();
        out
    }

    /// The blocks the index has for `worker`, sorted: for tests and debugging.
    pub fn worker_blocks(&self, worker: InstanceId) -> Vec<BlockHash> {
        self.shard(worker).index.lock().worker_blocks(worker)
    }
}

#[cfg(test)]
#[path = "shards_tests.rs"]
mod tests;
