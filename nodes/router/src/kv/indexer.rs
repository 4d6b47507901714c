//! Which worker holds which KV block: a map from chained block hash to the set of workers
//! holding it. A block's hash identifies its whole prefix, so the map is a flattened radix
//! tree: walking a request's hashes in order and intersecting the sets gives each worker's
//! cached prefix length, with one hash lookup per block and no pointers to chase.
//!
//! Pure and synchronous: no locks, no clock. Time is a caller's `u64` in milliseconds
//! (any epoch), so tests are deterministic.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap};

use dynamo_protocol::{BlockHash, KvEvent, KvEventData};
use dynamo_runtime::InstanceId;
use foldhash::fast::RandomState;

use super::sync::{EventOutcome, EventSync, Verdict};
use super::worker_set::{PrefixWalk, WorkerSet};

/// An entry that never expires: confirmed by the worker's own `Stored` event.
const CONFIRMED: u64 = u64::MAX;

/// For each worker holding the first block of a request, how many leading blocks it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverlapScores {
    /// `(worker, matched blocks)`, in no particular order; workers matching nothing are
    /// absent.
    pub scores: Vec<(InstanceId, u32)>,
}

impl OverlapScores {
    /// The matched blocks of `worker` (0 if absent). Linear: build a map for many lookups.
    pub fn get(&self, worker: InstanceId) -> u32 {
        self.scores
            .iter()
            .find(|(w, _)| *w == worker)
            .map_or(0, |s| s.1)
    }

    /// The best match of any worker.
    pub fn max(&self) -> u32 {
        self.scores.iter().map(|s| s.1).max().unwrap_or(0)
    }

    /// Sorted by worker, for tests and output.
    pub fn sorted(mut self) -> Vec<(InstanceId, u32)> {
        self.scores.sort_unstable();
        self.scores
    }
}

#[derive(Debug)]
struct Worker {
    id: InstanceId,
    /// Every block the index has for this worker, with its expiry (or [`CONFIRMED`]).
    blocks: HashMap<BlockHash, u64, RandomState>,
    sync: EventSync,
}

/// The KV block index of every worker the router knows.
#[derive(Debug, Default)]
pub struct KvIndexer {
    blocks: HashMap<BlockHash, WorkerSet, RandomState>,
    slots: HashMap<InstanceId, u32, RandomState>,
    workers: Vec<Option<Worker>>,
    free_slots: Vec<u32>,
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
        let slot = self.slot(event.worker_id);
        let Some(worker) = self.worker_mut(slot) else {
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
            self.apply_data(slot, data);
        }
        let pending = match self.worker_mut(slot) {
            Some(w) => w.sync.snapshot_applied(last_event_id),
            None => Vec::new(),
        };
        let mut outcome = EventOutcome::Applied;
        for event in &pending {
            if self.apply(event) == EventOutcome::NeedsResync {
                outcome = EventOutcome::NeedsResync;
            }
        }
        outcome
    }

    /// Workers whose index waits for a snapshot, sorted.
    pub fn needs_resync(&self) -> Vec<InstanceId> {
        let mut out: Vec<_> = self
            .workers
            .iter()
            .flatten()
            .filter(|w| w.sync.needs_resync())
            .map(|w| w.id)
            .collect();
        out.sort_unstable();
        out
    }

    /// For each worker, how many leading blocks of `hashes` it holds. The walk stops at the
    /// first block no remaining worker holds. Expired entries count until
    /// [`KvIndexer::expire`] runs: call it first.
    pub fn find_matches(&self, hashes: &[BlockHash]) -> OverlapScores {
        let mut raw = Vec::new();
        let mut iter = hashes.iter();
        let Some(first) = iter.next().and_then(|h| self.blocks.get(h)) else {
            return OverlapScores::default();
        };
        let mut walk = PrefixWalk::start(first);
        let mut alive = true;
        for h in iter {
            let Some(set) = self.blocks.get(h) else { break };
            if !walk.step(set, &mut raw) {
                alive = false;
                break;
            }
        }
        if alive {
            walk.finish(&mut raw);
        }
        let scores = raw
            .into_iter()
            .filter_map(|(slot, n)| Some((self.worker(slot)?.id, n)))
            .collect();
        OverlapScores { scores }
    }

    /// Records that `worker` holds `hashes` until `expires_at` (ms), unless a `Stored`
    /// event confirms them first. Entries already confirmed stay confirmed; expiring ones
    /// are extended. Used for the approximate mode's routing decisions and for the
    /// predicted blocks of a just-routed request.
    pub fn insert_expiring(&mut self, worker: InstanceId, hashes: &[BlockHash], expires_at: u64) {
        let slot = self.slot(worker);
        let Some(w) = self.worker_mut(slot) else {
            return;
        };
        let mut fresh = Vec::new();
        let mut pushed = Vec::new();
        for &h in hashes {
            match w.blocks.entry(h) {
                Entry::Occupied(mut e) => {
                    if *e.get() < expires_at {
                        e.insert(expires_at);
                        pushed.push(h);
                    }
                }
                Entry::Vacant(e) => {
                    e.insert(expires_at);
                    fresh.push(h);
                    pushed.push(h);
                }
            }
        }
        for h in fresh {
            self.blocks.entry(h).or_default().insert(slot);
        }
        self.expiry
            .extend(pushed.into_iter().map(|h| Reverse((expires_at, slot, h))));
    }

    /// Drops every expiring entry whose time has come (expiry ≤ `now`).
    pub fn expire(&mut self, now: u64) {
        while let Some(&Reverse((at, slot, hash))) = self.expiry.peek() {
            if at > now {
                break;
            }
            self.expiry.pop();
            let due = self
                .worker(slot)
                .is_some_and(|w| w.blocks.get(&hash) == Some(&at));
            if due {
                self.remove_block(slot, hash);
            }
        }
    }

    /// Forgets a worker that left: its blocks and its event tracking.
    pub fn remove_worker(&mut self, worker: InstanceId) {
        let Some(slot) = self.slots.remove(&worker) else {
            return;
        };
        self.clear_slot(slot);
        if let Some(entry) = self.workers.get_mut(slot as usize) {
            *entry = None;
        }
        self.free_slots.push(slot);
    }

    /// The blocks the index has for `worker`, sorted (expiring ones included).
    pub fn worker_blocks(&self, worker: InstanceId) -> Vec<BlockHash> {
        let mut out: Vec<_> = self
            .slots
            .get(&worker)
            .and_then(|&s| self.worker(s))
            .map(|w| w.blocks.keys().copied().collect())
            .unwrap_or_default();
        out.sort_unstable();
        out
    }

    /// Distinct blocks held by any worker.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// Workers the index knows, sorted.
    pub fn workers(&self) -> Vec<InstanceId> {
        let mut out: Vec<_> = self.slots.keys().copied().collect();
        out.sort_unstable();
        out
    }

    fn apply_data(&mut self, slot: u32, data: &KvEventData) {
        match data {
            KvEventData::Stored { blocks, .. } => {
                let Some(w) = self.worker_mut(slot) else {
                    return;
                };
                let mut fresh = Vec::new();
                for b in blocks {
                    if w.blocks.insert(b.hash, CONFIRMED).is_none() {
                        fresh.push(b.hash);
                    }
                }
                for h in fresh {
                    self.blocks.entry(h).or_default().insert(slot);
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

    fn remove_block(&mut self, slot: u32, hash: BlockHash) {
        let Some(w) = self.worker_mut(slot) else {
            return;
        };
        if w.blocks.remove(&hash).is_none() {
            return;
        }
        if let Entry::Occupied(mut e) = self.blocks.entry(hash) {
            e.get_mut().remove(slot);
            if e.get().is_empty() {
                e.remove();
            }
        }
    }

    fn clear_slot(&mut self, slot: u32) {
        let Some(w) = self.worker_mut(slot) else {
            return;
        };
        let held = std::mem::take(&mut w.blocks);
        for hash in held.into_keys() {
            if let Entry::Occupied(mut e) = self.blocks.entry(hash) {
                e.get_mut().remove(slot);
                if e.get().is_empty() {
                    e.remove();
                }
            }
        }
    }

    /// The slot of `worker`, created on first sight.
    fn slot(&mut self, worker: InstanceId) -> u32 {
        if let Some(&s) = self.slots.get(&worker) {
            return s;
        }
        let state = Worker {
            id: worker,
            blocks: HashMap::default(),
            sync: EventSync::default(),
        };
        let slot = match self.free_slots.pop() {
            Some(s) => {
                if let Some(entry) = self.workers.get_mut(s as usize) {
                    *entry = Some(state);
                }
                s
            }
            None => {
                self.workers.push(Some(state));
                (self.workers.len() - 1) as u32
            }
        };
        self.slots.insert(worker, slot);
        slot
    }

    fn worker(&self, slot: u32) -> Option<&Worker> {
        self.workers.get(slot as usize)?.as_ref()
    }

    fn worker_mut(&mut self, slot: u32) -> Option<&mut Worker> {
        self.workers.get_mut(slot as usize)?.as_mut()
    }
}

#[cfg(test)]
#[path = "indexer_tests.rs"]
mod tests;
