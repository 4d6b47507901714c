//! Engine counters the step loop publishes every iteration and anyone reads without
//! waiting for the loop: plain relaxed atomics, one writer.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::scheduler::SchedulerStats;

/// A snapshot of the engine (fields may come from two consecutive steps).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MockerStats {
    pub blocks_total: u64,
    pub blocks_active: u64,
    /// Cached blocks no sequence holds (evictable).
    pub blocks_cached: u64,
    pub blocks_free: u64,
    pub running: u64,
    pub waiting: u64,
    pub preemptions: u64,
    /// Prompt tokens served from the prefix cache.
    pub prefix_hit_tokens: u64,
    pub prompt_tokens: u64,
    /// Steps run since start.
    pub steps: u64,
    /// KV events published since start.
    pub kv_events: u64,
    /// KV blocks handed to decode workers (prefill side), and their bytes.
    pub kv_blocks_sent: u64,
    pub kv_bytes_sent: u64,
    /// KV blocks received from prefill workers and cached (decode side), and their bytes.
    pub kv_blocks_received: u64,
    pub kv_bytes_received: u64,
}

#[derive(Debug, Default)]
pub(crate) struct StatsCell {
    blocks_total: AtomicU64,
    blocks_active: AtomicU64,
    blocks_cached: AtomicU64,
    blocks_free: AtomicU64,
    running: AtomicU64,
    waiting: AtomicU64,
    preemptions: AtomicU64,
    prefix_hit_tokens: AtomicU64,
    prompt_tokens: AtomicU64,
    steps: AtomicU64,
    kv_events: AtomicU64,
    // Hand-off counters: added to by whoever moves the blocks, never overwritten by `store`.
    kv_blocks_sent: AtomicU64,
    kv_bytes_sent: AtomicU64,
    kv_blocks_received: AtomicU64,
    kv_bytes_received: AtomicU64,
}

impl StatsCell {
    pub fn store(&self, s: &SchedulerStats, steps: u64, kv_events: u64) {
        let as_u64 = |n: usize| n as u64;
        self.blocks_total.store(as_u64(s.blocks.total), Relaxed);
        self.blocks_active.store(as_u64(s.blocks.active), Relaxed);
        self.blocks_cached
            .store(as_u64(s.blocks.cached_inactive), Relaxed);
        self.blocks_free.store(as_u64(s.blocks.free), Relaxed);
        self.running.store(as_u64(s.running), Relaxed);
        self.waiting.store(as_u64(s.waiting), Relaxed);
        self.preemptions.store(s.preemptions, Relaxed);
        self.prefix_hit_tokens.store(s.prefix_hit_tokens, Relaxed);
        self.prompt_tokens.store(s.prompt_tokens, Relaxed);
        self.steps.store(steps, Relaxed);
        self.kv_events.store(kv_events, Relaxed);
    }

    pub fn add_sent(&self, blocks: u64, bytes: u64) {
        self.kv_blocks_sent.fetch_add(blocks, Relaxed);
        self.kv_bytes_sent.fetch_add(bytes, Relaxed);
    }

    pub fn add_received(&self, blocks: u64, bytes: u64) {
        self.kv_blocks_received.fetch_add(blocks, Relaxed);
        self.kv_bytes_received.fetch_add(bytes, Relaxed);
    }

    pub fn load(&self) -> MockerStats {
        MockerStats {
            blocks_total: self.blocks_total.load(Relaxed),
            blocks_active: self.blocks_active.load(Relaxed),
            blocks_cached: self.blocks_cached.load(Relaxed),
            blocks_free: self.blocks_free.load(Relaxed),
            running: self.running.load(Relaxed),
            waiting: self.waiting.load(Relaxed),
            preemptions: self.preemptions.load(Relaxed),
            prefix_hit_tokens: self.prefix_hit_tokens.load(Relaxed),
            prompt_tokens: self.prompt_tokens.load(Relaxed),
            steps: self.steps.load(Relaxed),
            kv_events: self.kv_events.load(Relaxed),
            kv_blocks_sent: self.kv_blocks_sent.load(Relaxed),
            kv_bytes_sent: self.kv_bytes_sent.load(Relaxed),
            kv_blocks_received: self.kv_blocks_received.load(Relaxed),
            kv_bytes_received: self.kv_bytes_received.load(Relaxed),
        }
    }
}
