//! The KV-aware [`Policy`] and the handle the host feeds KV events through.
//!
//! The index is sharded by worker ([`ShardedIndex`]), a lock per shard, so the events of
//! workers in different shards apply in parallel. One `parking_lot::Mutex` guards the
//! in-flight account; a routing decision holds it from its lookup to the recording of the
//! chosen worker's predicted blocks and load, so two decisions never interleave (the
//! second sees the first's predictions). Lock order: the account, then a shard; an event
//! takes only its shard. Hashing the prompt happens outside both.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use dynamo_protocol::{block_hashes, BlockHash, KvEvent, KvEventData, TokenRequest};
use dynamo_runtime::InstanceId;
use parking_lot::Mutex;

use super::config::{effective_weight, KvConfig, KvConfigError, KvMode};
use super::cost::{cost, select, ActiveLoads, Scored, WorkerLoad};
use super::indexer::OverlapScores;
use super::metrics::{Counters, KvMetrics};
use super::shards::ShardedIndex;
use super::sync::EventOutcome;
use crate::policy::{InstanceLoad, Policy, RequestTracker, Routed};

struct KvState {
    loads: ActiveLoads,
    rng: fastrand::Rng,
    /// Requests routed to each worker, for metrics (kept when a worker leaves: totals
    /// only grow).
    chosen: BTreeMap<InstanceId, u64>,
}

struct KvShared {
    mode: KvMode,
    config: KvConfig,
    ttl_ms: u64,
    epoch: Instant,
    index: ShardedIndex,
    state: Mutex<KvState>,
    counters: Counters,
}

impl KvShared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn expires_at(&self) -> u64 {
        self.now_ms().saturating_add(self.ttl_ms)
    }
}

/// The KV router's shared state: give [`KvRouterHandle::policy`] to a router (or build one
/// with [`crate::RouterService::with_kv`]) and feed the workers' KV events here. Cheap to
/// clone; every method is thread-safe and short.
#[derive(Clone)]
pub struct KvRouterHandle {
    shared: Arc<KvShared>,
}

impl std::fmt::Debug for KvRouterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvRouterHandle")
            .field("mode", &self.shared.mode)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl KvRouterHandle {
    /// A KV router's state, empty.
    pub fn new(mode: KvMode, config: KvConfig) -> Result<Self, KvConfigError> {
        config.validate()?;
        Ok(Self::build(mode, config))
    }

    /// Without validation: for settings known to be valid (the defaults).
    pub(crate) fn build(mode: KvMode, config: KvConfig) -> Self {
        let ttl_ms = u64::try_from(config.ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        KvRouterHandle {
            shared: Arc::new(KvShared {
                mode,
                config,
                ttl_ms,
                epoch: Instant::now(),
                index: ShardedIndex::new(config.index_shards),
                state: Mutex::new(KvState {
                    loads: ActiveLoads::default(),
                    rng: fastrand::Rng::new(),
                    chosen: BTreeMap::new(),
                }),
                counters: Counters::default(),
            }),
        }
    }

    pub fn mode(&self) -> KvMode {
        self.shared.mode
    }

    pub fn config(&self) -> &KvConfig {
        &self.shared.config
    }

    /// The policy that routes with this state.
    pub fn policy(&self) -> Arc<dyn Policy> {
        Arc::new(KvPolicy {
            shared: self.shared.clone(),
        })
    }

    /// Applies one KV event of a worker (`event.worker_id` = its instance id). On
    /// [`EventOutcome::NeedsResync`] fetch the worker's snapshot and pass it to
    /// [`KvRouterHandle::apply_snapshot`]; events keep being accepted meanwhile.
    pub fn apply_event(&self, event: KvEvent) -> EventOutcome {
        let outcome = self.shared.index.apply(&event);
        let c = &self.shared.counters;
        match outcome {
            EventOutcome::Applied => c.event(),
            EventOutcome::Restarted => {
                c.event();
                c.restart();
            }
            EventOutcome::NeedsResync => c.resync(),
            EventOutcome::Buffered | EventOutcome::Stale => {}
        }
        outcome
    }

    /// Replaces what the index has for `worker` by its snapshot (`Cleared`, then `Stored`
    /// parents first, covering its events up to `last_event_id`) and replays the events
    /// that arrived meanwhile. [`EventOutcome::NeedsResync`] if those show a new gap.
    pub fn apply_snapshot(
        &self,
        worker: InstanceId,
        last_event_id: Option<u64>,
        events: &[KvEventData],
    ) -> EventOutcome {
        let outcome = (self.shared.index).apply_snapshot(worker, last_event_id, events);
        if outcome == EventOutcome::NeedsResync {
            self.shared.counters.resync();
        }
        outcome
    }

    /// Workers whose index waits for a snapshot, sorted.
    pub fn needs_resync(&self) -> Vec<InstanceId> {
        self.shared.index.needs_resync()
    }

    /// Forgets a worker that left the instance set.
    pub fn remove_worker(&self, worker: InstanceId) {
        self.shared.index.remove_worker(worker);
    }

    /// How many leading blocks of `token_ids` each worker holds now.
    pub fn overlaps(&self, token_ids: &[u32]) -> OverlapScores {
        let c = &self.shared.config;
        self.find_matches(&block_hashes(token_ids, c.block_size, c.hash_seed))
    }

    /// How many leading blocks of a block-hash chain each worker holds now.
    pub fn find_matches(&self, hashes: &[BlockHash]) -> OverlapScores {
        (self.shared.index).find_matches(hashes, self.shared.now_ms())
    }

    /// The counters, for metrics.
    pub fn metrics(&self) -> KvMetrics {
        let mut m = self.shared.counters.snapshot();
        m.indexed_blocks = self.shared.index.block_count() as u64;
        let state = self.shared.state.lock();
        m.chosen_total = state.chosen.iter().map(|(&w, &n)| (w, n)).collect();
        m
    }
}

/// Routes each request to the worker with the lowest KV cost (see [`super::cost`]).
struct KvPolicy {
    shared: Arc<KvShared>,
}

struct Decision {
    instance: InstanceId,
    overlap: u32,
    /// The chosen worker's cost (see [`cost`]).
    cost: f64,
}

impl KvPolicy {
    fn decide(
        &self,
        state: &mut KvState,
        candidates: &[Arc<InstanceLoad>],
        hashes: &[BlockHash],
        prompt_blocks: u64,
    ) -> Decision {
        let config = &self.shared.config;
        let scores = (self.shared.index).find_matches(hashes, self.shared.now_ms());
        let overlap_of = |w: InstanceId| scores.get(w);
        let loads: Vec<WorkerLoad> = candidates.iter().map(|c| state.loads.get(c.id())).collect();
        // The account counts a prompt's partial last block whole: at most block_size − 1
        // tokens too many per request waiting, small against `weight_queue_tokens`.
        let queued_blocks: u64 = loads.iter().map(|l| l.prefill_blocks).sum();
        let queued_tokens =
            (queued_blocks as f64) * (config.block_size as f64) / (candidates.len().max(1) as f64);
        let weight = effective_weight(config, queued_tokens);
        let scored: Vec<Scored> = (candidates.iter().zip(loads))
            .map(|(c, load)| {
                let overlap = u64::from(overlap_of(c.id()));
                Scored {
                    cost: cost(weight, prompt_blocks, overlap, load),
                    load: c.in_flight(),
                }
            })
            .collect();
        let at = select(&scored, config.temperature, &mut state.rng).unwrap_or(0);
        let instance = candidates.get(at).map_or(0, |c| c.id());
        Decision {
            instance,
            overlap: overlap_of(instance),
            cost: scored.get(at).map_or(0.0, |s| s.cost),
        }
    }

    fn blocks(&self, request: &TokenRequest) -> (Vec<BlockHash>, u64) {
        let c = &self.shared.config;
        let hashes = block_hashes(&request.token_ids, c.block_size, c.hash_seed);
        let prompt = request.token_ids.len().div_ceil(c.block_size.max(1)) as u64;
        (hashes, prompt)
    }
}

impl Policy for KvPolicy {
    fn kv(&self) -> Option<KvRouterHandle> {
        Some(KvRouterHandle {
            shared: self.shared.clone(),
        })
    }

    fn choose(&self, candidates: &[Arc<InstanceLoad>], request: &TokenRequest) -> InstanceId {
        let (hashes, prompt_blocks) = self.blocks(request);
        let mut state = self.shared.state.lock();
        self.decide(&mut state, candidates, &hashes, prompt_blocks)
            .instance
    }

    fn route(&self, candidates: &[Arc<InstanceLoad>], request: &TokenRequest) -> Routed {
        let started = Instant::now();
        let (hashes, prompt_blocks) = self.blocks(request);
        let decision = {
            let mut state = self.shared.state.lock();
            let d = self.decide(&mut state, candidates, &hashes, prompt_blocks);
            let new_blocks = prompt_blocks.saturating_sub(u64::from(d.overlap));
            state
                .loads
                .dispatched(d.instance, prompt_blocks, new_blocks);
            let expires = self.shared.expires_at();
            (self.shared.index).insert_expiring(d.instance, &hashes, expires);
            *state.chosen.entry(d.instance).or_default() += 1;
            d
        };
        let overhead_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let full_blocks = hashes.len() as u64;
        self.shared
            .counters
            .routed(overhead_us, u64::from(decision.overlap), full_blocks);
        let span = tracing::Span::current();
        span.record("overlap_blocks", decision.overlap);
        span.record("prompt_blocks", full_blocks);
        span.record("cost", decision.cost);
        span.record("candidates", candidates.len());
        Routed {
            instance: decision.instance,
            tracker: Some(Box::new(KvTracker {
                shared: self.shared.clone(),
                worker: decision.instance,
                prompt_blocks,
                new_blocks: prompt_blocks.saturating_sub(u64::from(decision.overlap)),
                hashes,
                prefilled: false,
            })),
        }
    }
}

/// One routed request's share of its worker's load, released at the end.
struct KvTracker {
    shared: Arc<KvShared>,
    worker: InstanceId,
    prompt_blocks: u64,
    /// Its blocks the worker did not hold when it was routed: its pending prefill.
    new_blocks: u64,
    hashes: Vec<BlockHash>,
    prefilled: bool,
}

impl RequestTracker for KvTracker {
    fn first_token(&mut self) {
        if !self.prefilled {
            self.prefilled = true;
            let mut state = self.shared.state.lock();
            state.loads.prefilled(self.worker, self.new_blocks);
        }
    }

    fn moved_to(&mut self, instance: InstanceId) {
        if instance == self.worker {
            return;
        }
        let expires = self.shared.expires_at();
        let mut state = self.shared.state.lock();
        let (old, blocks) = (self.worker, self.prompt_blocks);
        state
            .loads
            .finished(old, blocks, self.new_blocks, self.prefilled);
        // What the new worker holds of it is unknown here: count it all as new.
        self.new_blocks = blocks;
        state.loads.dispatched(instance, blocks, blocks);
        if self.prefilled {
            state.loads.prefilled(instance, blocks);
        }
        (self.shared.index).insert_expiring(instance, &self.hashes, expires);
        self.worker = instance;
    }
}

impl Drop for KvTracker {
    fn drop(&mut self) {
        let mut state = self.shared.state.lock();
        state.loads.finished(
            self.worker,
            self.prompt_blocks,
            self.new_blocks,
            self.prefilled,
        );
    }
}

#[cfg(test)]
#[path = "router_tests.rs"]
mod tests;

#[cfg(test)]
impl KvRouterHandle {
    /// The in-flight account of `worker`, for tests.
    pub(crate) fn load_of(&self, worker: InstanceId) -> super::cost::WorkerLoad {
        self.shared.state.lock().loads.get(worker)
    }
}
