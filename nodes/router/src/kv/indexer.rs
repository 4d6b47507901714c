//! Which worker holds which KV block: a map from chained block hash to the set of workers
//! holding it. A block's hash identifies its whole prefix, so the map is a flattened radix
//! tree: walking a request's hashes in order and intersecting the sets gives each worker's
//! cached prefix length, with one hash lookup per block and no pointers to chase.
//!
//! Pure and synchronous: no locks, no clock. Time is a caller's `u64` in milliseconds
//! (any epoch), so tests are deterministic.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use dynamo_protocol::{BlockHash, KvEvent, KvEventData};
use dynamo_runtime::InstanceId;
use foldhash::fast::RandomState;

use super::sync::{EventOutcome, EventSync, Verdict};
use super::worker_set::{Dropped, PrefixWalk};
use table::BlockTable;
pub(crate) use table::TableView;

#[path = "indexer_table.rs"]
mod table;

/// How many blocks ahead `find_matches` asks for the slots it will read, so their cache
/// misses overlap instead of coming one after another.
pub(crate) const FIND_AHEAD: usize = 8;

/// Calls `f` with the hash of every block an event stores or removes.
pub(crate) fn for_each_block(data: &KvEventData, mut f: impl FnMut(BlockHash)) {
    match data {
        KvEventData::Stored { blocks, .. } => blocks.iter().for_each(|b| f(b.hash)),
        KvEventData::Removed { blocks } => blocks.iter().for_each(|&h| f(h)),
        KvEventData::Cleared => {}
    }
}

/// Worker ids by slot and back; shared with the results of `find_matches`, copied only
/// when a worker comes or goes while a result is alive.
#[derive(Debug, Clone, Default)]
struct Slots {
    ids: Vec<Option<InstanceId>>,
    by_id: HashMap<InstanceId, u32, RandomState>,
}

/// For each worker holding the first block of a request, how many leading blocks it holds.
/// Workers matching nothing are absent. A lookup over a [`super::shards::ShardedIndex`]
/// has one part per shard; the shards' workers are disjoint.
#[derive(Debug, Clone, Default)]
pub struct OverlapScores {
    first: ShardScores,
    more: Vec<ShardScores>,
}

/// One index's part of a lookup's result.
#[derive(Debug, Clone, Default)]
struct ShardScores {
    dropped: Dropped,
    slots: Arc<Slots>,
}

impl OverlapScores {
    fn parts(&self) -> impl Iterator<Item = &ShardScores> {
        std::iter::once(&self.first).chain(&self.more)
    }

    /// Adds the result of the same lookup in another shard.
    pub(crate) fn merge(&mut self, other: OverlapScores) {
        self.more.push(other.first);
        self.more.extend(other.more);
    }

    /// The matched blocks of `worker` (0 if absent).
    pub fn get(&self, worker: InstanceId) -> u32 {
        (self.parts())
            .find_map(|p| {
                let slot = *p.slots.by_id.get(&worker)?;
                p.dropped.depth_of(slot)
            })
            .unwrap_or(0)
    }

    /// The best match of any worker.
    pub fn max(&self) -> u32 {
        self.parts()
            .map(|p| p.dropped.max_depth())
            .max()
            .unwrap_or(0)
    }

    /// A worker with the best match, and its matched blocks.
    pub fn best(&self) -> Option<(InstanceId, u32)> {
        let mut best: Option<(InstanceId, u32)> = None;
        for p in self.parts() {
            let Some((slot, depth)) = p.dropped.deepest() else {
                continue;
            };
            let Some(Some(id)) = p.slots.ids.get(slot as usize) else {
                continue;
            };
            if best.is_none_or(|(_, d)| depth > d) {
                best = Some((*id, depth));
            }
        }
        best
    }

    /// Workers with a match.
    pub fn len(&self) -> usize {
        self.parts().map(|p| p.dropped.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f(worker, matched blocks)` for each worker with a match, in no set order.
    pub fn for_each(&self, mut f: impl FnMut(InstanceId, u32)) {
        for p in self.parts() {
            let ids = &p.slots.ids;
            p.dropped.for_each(|slot, depth| {
                if let Some(Some(id)) = ids.get(slot as usize) {
                    f(*id, depth);
                }
            });
        }
    }

    /// `(worker, matched blocks)` sorted by worker, for tests and output.
    pub fn sorted(&self) -> Vec<(InstanceId, u32)> {
        let mut out = Vec::with_capacity(self.len());
        self.for_each(|w, d| out.push((w, d)));
        out.sort_unstable();
        out
    }
}

#[derive(Debug, Default)]
struct Worker {
    /// Blocks the index has for this worker.
    live: usize,
    sync: EventSync,
}

/// The KV block index of every worker the router knows.
///
/// Each stored or removed block costs one lookup in one map; there is no per-worker block
/// list, so forgetting a whole worker (`Cleared`, a restart, a snapshot, removal) scans
/// the index once.
#[derive(Debug, Default)]
pub struct KvIndexer {
    blocks: BlockTable,
    slots: Arc<Slots>,
    workers: Vec<Worker>,
    free_slots: Vec<u32>,
    /// Entries not (yet) confirmed by an event, with their expiry (ms).
    expiring: HashMap<(u32, BlockHash), u64, RandomState>,
    /// `(expiry, slot, block)` of every expiring entry; stale ones (refreshed, confirmed,
    /// removed) are skipped when popped.
    expiry: BinaryHeap<Reverse<(u64, u32, BlockHash)>>,
}

impl KvIndexer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event if it continues the worker's stream; see [`EventOutcome`].
    pub fn apply(&mut self, event: &KvEvent) -> EventOutcome {
        self.warm(&event.data);
        self.apply_warm(event)
    }

    /// Applies `events` in order, as [`KvIndexer::apply`] would one by one, calling
    /// `outcome` after each. The slots of every event's blocks are asked for together
    /// first, so their cache misses overlap across events, not only within one. (On the
    /// trace bench a request's `Stored` and `Removed` together gained nothing measurable:
    /// one event's misses already overlap; a burst of small events may gain more.)
    pub fn apply_batch(
        &mut self,
        events: &[KvEvent],
        mut outcome: impl FnMut(&KvEvent, EventOutcome),
    ) {
        for event in events {
            self.warm(&event.data);
        }
        for event in events {
            let result = self.apply_warm(event);
            outcome(event, result);
        }
    }

    fn apply_warm(&mut self, event: &KvEvent) -> EventOutcome {
        let slot = self.slot(event.worker_id);
        let Some(worker) = self.workers.get_mut(slot as usize) else {
            return EventOutcome::NeedsResync;
        };
        match worker.sync.check(event) {
            Verdict::Apply => {
                self.apply_data(slot, &event.data);
                EventOutcome::Applied
            }
            Verdict::Restart => {
                self.clear_slot(slot);
                self.apply_data(slot, &event.data);
                EventOutcome::Restarted
            }
            Verdict::Gap => EventOutcome::NeedsResync,
            Verdict::Buffer => EventOutcome::Buffered,
            Verdict::Stale => EventOutcome::Stale,
        }
    }

    /// Replaces everything known about `worker` by a snapshot of its cache (events that
    /// rebuild it, covering its events up to `last_event_id`), then replays the events that
    /// arrived while it waited. Returns [`EventOutcome::NeedsResync`] if those show another
    /// gap, else [`EventOutcome::Applied`].
    pub fn apply_snapshot(
        &mut self,
        worker: InstanceId,
        last_event_id: Option<u64>,
        events: &[KvEventData],
    ) -> EventOutcome {
        let slot = self.slot(worker);
        self.clear_slot(slot);
        for data in events {
            self.warm(data);
            self.apply_data(slot, data);
        }
        let pending = match self.workers.get_mut(slot as usize) {
            Some(w) => w.sync.snapshot_applied(last_event_id),
            None => Vec::new(),
        };
        let mut outcome = EventOutcome::Applied;
        for event in &pending {
            if self.apply(event) == EventOutcome::NeedsResync {
                outcome = EventOutcome::NeedsResync;
            }
        }
        if let Some(w) = self.workers.get_mut(slot as usize) {
            w.sync.replayed();
        }
        outcome
    }

    /// Workers whose index waits for a snapshot, sorted.
    pub fn needs_resync(&self) -> Vec<InstanceId> {
        let mut out: Vec<_> = (self.workers.iter().zip(&self.slots.ids))
            .filter(|(w, _)| w.sync.needs_resync())
            .filter_map(|(_, id)| *id)
            .collect();
        out.sort_unstable();
        out
    }

    /// For each worker, how many leading blocks of `hashes` it holds. The walk stops at the
    /// first block no remaining worker holds. Expired entries count until
    /// [`KvIndexer::expire`] runs: call it first.
    pub fn find_matches(&self, hashes: &[BlockHash]) -> OverlapScores {
        let mut dropped = Dropped::default();
        for &h in hashes.iter().take(FIND_AHEAD) {
            self.blocks.prefetch(h);
        }
        let mut iter = hashes.iter();
        if let Some(first) = iter.next().and_then(|&h| self.blocks.get(h)) {
            let mut walk = PrefixWalk::start(first);
            let mut alive = true;
            for (i, h) in iter.enumerate() {
                if let Some(&ahead) = hashes.get(i + FIND_AHEAD) {
                    self.blocks.prefetch(ahead);
                }
                let Some(set) = self.blocks.get(*h) else {
                    break;
                };
                if !walk.step(set, &mut dropped) {
                    alive = false;
                    break;
                }
            }
            if alive {
                walk.finish(&mut dropped);
            }
        }
        OverlapScores {
            first: ShardScores {
                dropped,
                slots: self.slots.clone(),
            },
            more: Vec::new(),
        }
    }

    /// Records that `worker` holds `hashes` until `expires_at` (ms), unless a `Stored`
    /// event confirms them first. Entries already confirmed stay confirmed; expiring ones
    /// are extended. Used for the approximate mode's routing decisions and for the
    /// predicted blocks of a just-routed request.
    pub fn insert_expiring(&mut self, worker: InstanceId, hashes: &[BlockHash], expires_at: u64) {
        let slot = self.slot(worker);
        let mut added = 0;
        for &h in hashes {
            if self.blocks.insert(h, slot) {
                added += 1;
                self.expiring.insert((slot, h), expires_at);
            } else {
                match self.expiring.get_mut(&(slot, h)) {
                    Some(at) if *at < expires_at => *at = expires_at,
                    // Confirmed, or already living longer.
                    _ => continue,
                }
            }
            self.expiry.push(Reverse((expires_at, slot, h)));
        }
        if let Some(w) = self.workers.get_mut(slot as usize) {
            w.live += added;
        }
    }

    /// Drops every expiring entry whose time has come (expiry ≤ `now`).
    pub fn expire(&mut self, now: u64) {
        while let Some(&Reverse((at, slot, hash))) = self.expiry.peek() {
            if at > now {
                break;
            }
            self.expiry.pop();
            if self.expiring.get(&(slot, hash)) == Some(&at) {
                self.remove_block(slot, hash);
            }
        }
    }

    /// Forgets a worker that left: its blocks and its event tracking.
    pub fn remove_worker(&mut self, worker: InstanceId) {
        let Some(&slot) = self.slots.by_id.get(&worker) else {
            return;
        };
        self.clear_slot(slot);
        if let Some(w) = self.workers.get_mut(slot as usize) {
            *w = Worker::default();
        }
        let slots = Arc::make_mut(&mut self.slots);
        slots.by_id.remove(&worker);
        if let Some(id) = slots.ids.get_mut(slot as usize) {
            *id = None;
        }
        self.free_slots.push(slot);
    }

    /// The blocks the index has for `worker`, sorted (expiring ones included). Scans the
    /// index: for tests and debugging.
    pub fn worker_blocks(&self, worker: InstanceId) -> Vec<BlockHash> {
        let Some(&slot) = self.slots.by_id.get(&worker) else {
            return Vec::new();
        };
        let mut out: Vec<_> = (self.blocks.iter())
            .filter(|(_, set)| set.contains(slot))
            .map(|(h, _)| h)
            .collect();
        out.sort_unstable();
        out
    }

    /// Where the block table is now, so another thread can prefetch an event's or a
    /// lookup's slots before it takes the lock this index lives behind.
    pub(crate) fn table_view(&self) -> TableView {
        self.blocks.view()
    }

    /// Distinct blocks held by any worker.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// Workers the index knows, sorted.
    pub fn workers(&self) -> Vec<InstanceId> {
        let mut out: Vec<_> = self.slots.by_id.keys().copied().collect();
        out.sort_unstable();
        out
    }

    fn apply_data(&mut self, slot: u32, data: &KvEventData) {
        match data {
            KvEventData::Stored { blocks, .. } => {
                let mut added = 0;
                for b in blocks {
                    if self.blocks.insert(b.hash, slot) {
                        added += 1;
                    } else if !self.expiring.is_empty() {
                        // A predicted block, now confirmed.
                        self.expiring.remove(&(slot, b.hash));
                    }
                }
                if let Some(w) = self.workers.get_mut(slot as usize) {
                    w.live += added;
                }
            }
            KvEventData::Removed { blocks } => {
                for &h in blocks {
                    self.remove_block(slot, h);
                }
            }
            KvEventData::Cleared => self.clear_slot(slot),
        }
    }

    /// Starts the cache misses of an event's slots together, so the updates that follow
    /// find them loaded instead of waiting for each in turn.
    fn warm(&self, data: &KvEventData) {
        for_each_block(data, |h| self.blocks.prefetch(h));
    }

    fn remove_block(&mut self, slot: u32, hash: BlockHash) {
        if !self.blocks.remove(hash, slot) {
            return;
        }
        if !self.expiring.is_empty() {
            self.expiring.remove(&(slot, hash));
        }
        if let Some(w) = self.workers.get_mut(slot as usize) {
            w.live = w.live.saturating_sub(1);
        }
    }

    /// Drops every block of `slot`: one pass over the index.
    fn clear_slot(&mut self, slot: u32) {
        let Some(w) = self.workers.get_mut(slot as usize) else {
            return;
        };
        if w.live == 0 {
            return;
        }
        w.live = 0;
        self.blocks.remove_everywhere(slot);
        self.expiring.retain(|&(s, _), _| s != slot);
    }

    /// The slot of `worker`, created on first sight.
    fn slot(&mut self, worker: InstanceId) -> u32 {
        if let Some(&s) = self.slots.by_id.get(&worker) {
            return s;
        }
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.workers.push(Worker::default());
                (self.workers.len() - 1) as u32
            }
        };
        let slots = Arc::make_mut(&mut self.slots);
        if slots.ids.len() <= slot as usize {
            slots.ids.resize(slot as usize + 1, None);
        }
        slots.ids[slot as usize] = Some(worker);
        slots.by_id.insert(worker, slot);
        slot
    }
}

#[cfg(test)]
#[path = "indexer_tests.rs"]
mod tests;
