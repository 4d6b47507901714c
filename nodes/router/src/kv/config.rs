//! The KV router's settings, as the graph file gives them.

use std::time::Duration;

use dynamo_protocol::DEFAULT_BLOCK_HASH_SEED;

/// Where the KV router learns what each worker has cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvMode {
    /// `kv`: from the workers' KV events; routed requests' blocks are predicted for `ttl`
    /// until the worker's `Stored` event confirms them.
    Events,
    /// `kv-approx`: no events; the router assumes a routed request's blocks stay cached
    /// on the chosen worker for `ttl`.
    Approx,
}

impl KvMode {
    /// The router mode's spelling in the graph file.
    pub fn as_str(self) -> &'static str {
        match self {
            KvMode::Events => "kv",
            KvMode::Approx => "kv-approx",
        }
    }
}

/// Settings of a KV-aware router.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvConfig {
    /// Tokens per KV block; must equal the workers' block size.
    pub block_size: usize,
    /// Seed of the chained block hash; must equal the workers'.
    pub hash_seed: u64,
    /// Weight of the blocks still to prefill against the blocks held for decode (default
    /// [`DEFAULT_OVERLAP_WEIGHT`]).
    pub overlap_weight: f64,
    /// 0 picks the cheapest worker; above 0 samples a softmax over normalised costs.
    pub temperature: f64,
    /// How long blocks the router records on its own live unconfirmed: in `kv` the
    /// predicted blocks of a routed request (default 2 s), in `kv-approx` its routing
    /// decisions (default 120 s).
    pub ttl: Duration,
    /// Shards of the index (1–64): events of workers in different shards apply in
    /// parallel; a lookup visits every shard.
    pub index_shards: usize,
    /// Prefill queued per worker (tokens, the mean over the candidates) that adds
    /// `overlap_weight` once more to the weight in effect. The weight multiplies both
    /// prefill terms of the cost (a request's uncached blocks and the worker's queued
    /// prefill), so as queues grow they count for more against the blocks held for
    /// decode: while requests wait for prefill, a block a hit saves, or a queue avoided,
    /// is taken off the wait of every request behind it. 0 keeps the weight fixed. It
    /// applies to a disaggregated router's choice of prefill worker too. See
    /// [`effective_weight`].
    pub weight_queue_tokens: u64,
}

/// `overlap_weight × (1 + queued / weight_queue_tokens)`, where `queued` is the mean
/// prefill, in tokens, the router has sent the candidates and not yet seen prefilled;
/// `overlap_weight` alone when `weight_queue_tokens` is 0.
pub fn effective_weight(config: &KvConfig, queued_tokens_per_worker: f64) -> f64 {
    if config.weight_queue_tokens == 0 {
        return config.overlap_weight;
    }
    let queued = queued_tokens_per_worker.max(0.0);
    config.overlap_weight * (1.0 + queued / config.weight_queue_tokens as f64)
}

/// The default `overlap_weight`: a block to prefill weighs as much as eight blocks held by
/// running requests. NVIDIA Dynamo's default is 1, which weighs a request's prefill no
/// more than one running request's context. On the Mooncake conversation trace with eight
/// mocker workers (README, Performance) weight 8 against 1: hit rate 29.0–29.1% against
/// 25.4–25.9% on the first 2,000 rows (busiest worker 1.06–1.09× the mean against
/// 1.03–1.07×), 24.3% against 19.9% over the whole trace, and under load a TTFT median
/// 1.78× round-robin's against 1.18×. Weight 16 gains little more and puts the busiest
/// worker at 1.13×.
pub const DEFAULT_OVERLAP_WEIGHT: f64 = 8.0;

/// The default `weight_queue_tokens`: 2,048 tokens of prefill queued per worker double
/// the weight. On the Mooncake conversation trace under load (the README's first 2,000
/// rows at engine speedup 1.75, side by side with round-robin) it took the TTFT median
/// from 1.76× round-robin's (a fixed weight 8) to 2.01×; at light load, where queues are
/// short, it changes little.
pub const DEFAULT_WEIGHT_QUEUE_TOKENS: u64 = 2048;

/// The default `index_shards`: the machine's cores, at most 4 (each shard more costs
/// every lookup one more walk).
pub fn default_index_shards() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
}

impl KvConfig {
    /// The defaults for a mode (they differ only in `ttl`).
    pub fn for_mode(mode: KvMode) -> Self {
        KvConfig {
            block_size: 16,
            hash_seed: DEFAULT_BLOCK_HASH_SEED,
            overlap_weight: DEFAULT_OVERLAP_WEIGHT,
            temperature: 0.0,
            ttl: match mode {
                KvMode::Events => Duration::from_secs(2),
                KvMode::Approx => Duration::from_secs(120),
            },
            index_shards: default_index_shards(),
            weight_queue_tokens: DEFAULT_WEIGHT_QUEUE_TOKENS,
        }
    }

    /// Every setting a router cannot work with.
    pub fn validate(&self) -> Result<(), KvConfigError> {
        if self.block_size == 0 {
            return Err(KvConfigError::BlockSize);
        }
        if !(self.overlap_weight.is_finite() && self.overlap_weight >= 0.0) {
            return Err(KvConfigError::OverlapWeight(self.overlap_weight));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(KvConfigError::Temperature(self.temperature));
        }
        if self.ttl.is_zero() {
            return Err(KvConfigError::Ttl);
        }
        if !(1..=super::shards::MAX_SHARDS).contains(&self.index_shards) {
            return Err(KvConfigError::IndexShards(self.index_shards));
        }
        Ok(())
    }
}

impl Default for KvConfig {
    fn default() -> Self {
        Self::for_mode(KvMode::Events)
    }
}

/// A KV router setting out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KvConfigError {
    #[error("router `block_size` must be at least 1")]
    BlockSize,
    #[error("router `overlap_weight` must be a finite number ≥ 0, not {0}")]
    OverlapWeight(f64),
    #[error("router `temperature` must be a finite number ≥ 0, not {0}")]
    Temperature(f64),
    #[error("router `ttl` must be longer than 0")]
    Ttl,
    #[error("router `index_shards` must be 1 to 64, not {0}")]
    IndexShards(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        assert_eq!(KvConfig::default().validate(), Ok(()));
        assert_eq!(
            KvConfig::for_mode(KvMode::Approx).ttl,
            Duration::from_secs(120)
        );
        let bad = |f: fn(&mut KvConfig)| {
            let mut c = KvConfig::default();
            f(&mut c);
            c.validate().map_err(|e| e.to_string())
        };
        assert!(bad(|c| c.block_size = 0).is_err_and(|e| e.contains("block_size")));
        assert!(bad(|c| c.overlap_weight = -1.0).is_err_and(|e| e.contains("overlap_weight")));
        assert!(bad(|c| c.temperature = f64::NAN).is_err_and(|e| e.contains("temperature")));
        assert!(bad(|c| c.ttl = Duration::ZERO).is_err_and(|e| e.contains("ttl")));
        assert!(bad(|c| c.index_shards = 0).is_err_and(|e| e.contains("index_shards")));
        assert!(bad(|c| c.index_shards = 65).is_err_and(|e| e.contains("index_shards")));
    }
}
