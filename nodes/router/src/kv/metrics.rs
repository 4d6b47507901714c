//! Counters of the KV router, lock-free, for the host to export as metrics.

use std::sync::atomic::{AtomicU64, Ordering};

use dynamo_runtime::InstanceId;

/// Upper bounds (µs, inclusive) of the routing-overhead histogram's buckets; a last,
/// unbounded bucket follows.
pub const OVERHEAD_BUCKETS_US: [u64; 10] = [5, 10, 20, 50, 100, 200, 500, 1_000, 5_000, 20_000];

/// Upper bounds (blocks, inclusive) of the histogram of the chosen worker's overlap per
/// request; a last, unbounded bucket follows.
pub const OVERLAP_BUCKETS_BLOCKS: [u64; 10] = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256];

/// Adds one observation to a non-cumulative histogram with inclusive upper `bounds`.
fn observe(buckets: &[AtomicU64], bounds: &[u64], value: u64) {
    let at = bounds.partition_point(|&b| b < value);
    if let Some(bucket) = buckets.get(at) {
        bucket.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    requests: AtomicU64,
    overhead_us_sum: AtomicU64,
    overhead_buckets: [AtomicU64; OVERHEAD_BUCKETS_US.len() + 1],
    overlap_buckets: [AtomicU64; OVERLAP_BUCKETS_BLOCKS.len() + 1],
    hit_blocks: AtomicU64,
    prompt_blocks: AtomicU64,
    events_applied: AtomicU64,
    resyncs: AtomicU64,
    restarts: AtomicU64,
}

impl Counters {
    pub fn routed(&self, overhead_us: u64, hit_blocks: u64, prompt_blocks: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.overhead_us_sum
            .fetch_add(overhead_us, Ordering::Relaxed);
        observe(&self.overhead_buckets, &OVERHEAD_BUCKETS_US, overhead_us);
        observe(&self.overlap_buckets, &OVERLAP_BUCKETS_BLOCKS, hit_blocks);
        self.hit_blocks.fetch_add(hit_blocks, Ordering::Relaxed);
        self.prompt_blocks
            .fetch_add(prompt_blocks, Ordering::Relaxed);
    }

    pub fn event(&self) {
        self.events_applied.fetch_add(1, Ordering::Relaxed);
    }

    pub fn resync(&self) {
        self.resyncs.fetch_add(1, Ordering::Relaxed);
    }

    pub fn restart(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> KvMetrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        KvMetrics {
            requests: get(&self.requests),
            routing_overhead_us_sum: get(&self.overhead_us_sum),
            routing_overhead_us_buckets: std::array::from_fn(|i| get(&self.overhead_buckets[i])),
            overlap_blocks_buckets: std::array::from_fn(|i| get(&self.overlap_buckets[i])),
            chosen_total: Vec::new(),
            kv_hit_blocks_total: get(&self.hit_blocks),
            kv_prompt_blocks_total: get(&self.prompt_blocks),
            events_applied_total: get(&self.events_applied),
            resyncs_total: get(&self.resyncs),
            restarts_total: get(&self.restarts),
            indexed_blocks: 0,
        }
    }
}

/// The KV router's counters at one moment. Totals only grow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvMetrics {
    /// Requests routed (retries not counted again).
    pub requests: u64,
    /// Sum of per-request routing overheads (hashing, index walk, cost), µs.
    pub routing_overhead_us_sum: u64,
    /// Requests per overhead bucket, not cumulative: `[i]` counts overheads in
    /// `(OVERHEAD_BUCKETS_US[i-1], OVERHEAD_BUCKETS_US[i]]`, the last one the rest.
    pub routing_overhead_us_buckets: [u64; OVERHEAD_BUCKETS_US.len() + 1],
    /// Requests per bucket of the chosen worker's overlap (blocks it already held), not
    /// cumulative, bounds [`OVERLAP_BUCKETS_BLOCKS`] like the overhead's.
    pub overlap_blocks_buckets: [u64; OVERLAP_BUCKETS_BLOCKS.len() + 1],
    /// Requests routed to each worker instance, sorted by instance (retries moved to
    /// another worker not counted again).
    pub chosen_total: Vec<(InstanceId, u64)>,
    /// Prompt blocks found cached on the chosen worker.
    pub kv_hit_blocks_total: u64,
    /// Prompt blocks routed (full blocks only: a partial last block is never cached).
    pub kv_prompt_blocks_total: u64,
    /// KV events applied to the index (buffered and stale ones not counted).
    pub events_applied_total: u64,
    /// Gaps in a worker's event ids that called for a snapshot.
    pub resyncs_total: u64,
    /// Workers seen restarting (event id back to 0).
    pub restarts_total: u64,
    /// Entries in the index now: distinct blocks per index shard (a block held by
    /// workers of two shards counts twice).
    pub indexed_blocks: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overheads_land_in_their_bucket() {
        let c = Counters::default();
        for (us, hit) in [(0, 0), (5, 1), (6, 2), (20_000, 3), (20_001, 1_000)] {
            c.routed(us, hit, 2);
        }
        let m = c.snapshot();
        assert_eq!(m.requests, 5);
        assert_eq!(m.routing_overhead_us_sum, 40_012);
        assert_eq!(m.routing_overhead_us_buckets[0], 2);
        assert_eq!(m.routing_overhead_us_buckets[1], 1);
        assert_eq!(m.routing_overhead_us_buckets[9], 1);
        assert_eq!(m.routing_overhead_us_buckets[10], 1);
        assert_eq!(
            (m.kv_hit_blocks_total, m.kv_prompt_blocks_total),
            (1_006, 10)
        );
        // 0 | 1 | 2 | (2, 4] | ... | > 256
        assert_eq!(m.overlap_blocks_buckets[..4], [1, 1, 1, 1]);
        assert_eq!(m.overlap_blocks_buckets[10], 1);
    }
}
