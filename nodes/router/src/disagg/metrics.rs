//! Counters of the disaggregated router, lock-free, for the host to export as metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (µs, inclusive) of the prefill-latency histogram's buckets; a last,
/// unbounded bucket follows.
pub const PREFILL_LATENCY_BUCKETS_US: [u64; 12] = [
    1_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

#[derive(Debug, Default)]
pub(crate) struct Counters {
    requests: AtomicU64,
    prefill: AtomicU64,
    local: AtomicU64,
    fallback: AtomicU64,
    retries: AtomicU64,
    prefill_errors: AtomicU64,
    rejected: AtomicU64,
    cancelled: AtomicU64,
    latency_us_sum: AtomicU64,
    latency_buckets: [AtomicU64; PREFILL_LATENCY_BUCKETS_US.len() + 1],
}

fn add(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub fn request(&self) {
        add(&self.requests);
    }

    /// A prefill worker answered after `latency`; the request goes on to decode.
    pub fn prefilled(&self, latency: Duration) {
        add(&self.prefill);
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us_sum.fetch_add(us, Ordering::Relaxed);
        let at = PREFILL_LATENCY_BUCKETS_US.partition_point(|&b| b < us);
        if let Some(bucket) = self.latency_buckets.get(at) {
            add(bucket);
        }
    }

    pub fn local(&self) {
        add(&self.local);
    }

    pub fn fallback(&self) {
        add(&self.fallback);
    }

    pub fn retry(&self) {
        add(&self.retries);
    }

    pub fn prefill_error(&self) {
        add(&self.prefill_errors);
    }

    pub fn rejected(&self) {
        add(&self.rejected);
    }

    pub fn cancelled(&self) {
        add(&self.cancelled);
    }

    pub fn snapshot(&self) -> DisaggMetrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DisaggMetrics {
            requests_total: get(&self.requests),
            prefill_total: get(&self.prefill),
            local_prefill_total: get(&self.local),
            fallback_total: get(&self.fallback),
            prefill_retries_total: get(&self.retries),
            prefill_errors_total: get(&self.prefill_errors),
            rejected_total: get(&self.rejected),
            cancelled_total: get(&self.cancelled),
            prefill_latency_us_sum: get(&self.latency_us_sum),
            prefill_latency_us_buckets: std::array::from_fn(|i| get(&self.latency_buckets[i])),
        }
    }
}

/// The disaggregated router's counters at one moment. Totals only grow.
///
/// Every request counted in `requests_total` ends in exactly one of `prefill_total`,
/// `local_prefill_total`, `fallback_total`, `prefill_errors_total`, `rejected_total` and
/// `cancelled_total`, once its routing is decided (requests still waiting for their
/// prefill are in none yet).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DisaggMetrics {
    /// Requests received.
    pub requests_total: u64,
    /// `disagg_prefill_total`: prefilled on a prefill worker, then sent to decode.
    pub prefill_total: u64,
    /// `disagg_local_prefill_total`: prompts shorter than the threshold, prefilled by the
    /// decode worker itself.
    pub local_prefill_total: u64,
    /// `disagg_fallback_total`: no prefill worker was live (or every one tried was gone),
    /// so the decode worker prefilled (aggregated serving).
    pub fallback_total: u64,
    /// Prefill calls moved to another prefill worker after the first was found gone.
    pub prefill_retries_total: u64,
    /// Requests failed by their prefill worker's error.
    pub prefill_errors_total: u64,
    /// Requests refused: no decode worker live, or no prefill worker with `enforce` on.
    pub rejected_total: u64,
    /// Requests whose caller went away while their prefill was running.
    pub cancelled_total: u64,
    /// Sum of the latencies counted in `prefill_total` (choice to result, retry
    /// included), µs.
    pub prefill_latency_us_sum: u64,
    /// Prefills per latency bucket, not cumulative: `[i]` counts latencies in
    /// `(PREFILL_LATENCY_BUCKETS_US[i-1], PREFILL_LATENCY_BUCKETS_US[i]]`, the last one the
    /// rest.
    pub prefill_latency_us_buckets: [u64; PREFILL_LATENCY_BUCKETS_US.len() + 1],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_their_bucket() {
        let c = Counters::default();
        for us in [0, 1_000, 1_001, 10_000_000, 10_000_001] {
            c.prefilled(Duration::from_micros(us));
        }
        let m = c.snapshot();
        assert_eq!(m.prefill_total, 5);
        assert_eq!(m.prefill_latency_us_sum, 20_002_002);
        assert_eq!(m.prefill_latency_us_buckets[0], 2);
        assert_eq!(m.prefill_latency_us_buckets[1], 1);
        assert_eq!(m.prefill_latency_us_buckets[11], 1);
        assert_eq!(m.prefill_latency_us_buckets[12], 1);
    }
}
