//! The mocker's settings, with defaults close to a vLLM worker on one GPU and a
//! `validate()` that says which setting is wrong.

use dynamo_protocol::{KvLayout, DEFAULT_BLOCK_HASH_SEED};
use serde::{Deserialize, Serialize};

/// Limits that keep the pool's bookkeeping (and a typo) from exhausting memory: 16M
/// blocks is over a thousand times a large GPU's pool.
pub const MAX_NUM_BLOCKS: usize = 1 << 24;
pub const MAX_BLOCK_SIZE: usize = 1 << 16;
pub const MAX_EVENT_BUFFER: usize = 1 << 20;
/// Largest KV block a hand-off moves in one piece: 64 MiB is a 70B model's 16-token
/// block several times over.
pub const MAX_BLOCK_BYTES: u64 = 64 << 20;

/// SmolLM2-135M's KV shape (30 layers, 3 KV heads of dim 64, f16), `block_size` 0: the
/// block size is the config's own `block_size`.
pub const SMOLLM2_135M_KV_LAYOUT: KvLayout = KvLayout {
    layers: 30,
    kv_heads: 3,
    head_dim: 64,
    dtype_bytes: 2,
    block_size: 0,
};

/// Settings of one mocker worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MockerConfig {
    /// Identity of this worker in KV events; unique among the engines behind one router.
    pub worker_id: u64,
    /// Tokens per KV block (the engine's page size); must match the router's.
    pub block_size: usize,
    /// Size of the KV block pool.
    pub num_blocks: usize,
    /// Most sequences in one batch.
    pub max_num_seqs: usize,
    /// Token budget of one step (prefill chunks plus one token per decoding sequence).
    pub max_batched_tokens: usize,
    /// Reuse KV blocks of equal prefixes and publish KV events.
    pub enable_prefix_caching: bool,
    /// Time divisor of the timing model; infinite is instant mode: the step loop never
    /// sleeps. In a file: a positive number, or `"instant"` (also `inf` in TOML).
    #[serde(with = "speedup_serde")]
    pub speedup: f64,
    /// Output tokens are drawn from `0..vocab_size`.
    pub vocab_size: u32,
    /// Ids never drawn as ordinary output (BOS, padding, chat-template markers).
    pub special_token_ids: Vec<u32>,
    /// Chance per generated token that the request's end-of-sequence id is drawn (unless
    /// the request sets `ignore_eos`), so that `finish_reason = stop` happens now and then.
    pub eos_probability: f64,
    /// Seeds the output of requests that bring no seed of their own.
    pub seed: u64,
    /// Seed of the chained block hash; must match the router's.
    pub hash_seed: u64,
    /// KV events kept for a slow subscriber before it sees a gap.
    pub event_buffer: usize,
    /// The shape of the model's KV cache, which fixes the bytes of a block handed from a
    /// prefill worker to a decode worker. Its `block_size` is 0 (take `block_size` above)
    /// or equal to `block_size`; [`MockerConfig::layout`] is the layout in effect.
    pub kv_layout: KvLayout,
    /// The model's context (positions); requests that would pass it are refused. `None`
    /// for the mocker, whose model has no such limit.
    pub max_model_len: Option<usize>,
    /// Refuse prompts with token ids outside `0..vocab_size` (a real model cannot embed
    /// them); the mocker takes any id.
    pub check_token_ids: bool,
    /// Keep the bytes of the KV blocks in a pool on this process's GPU 0 (the graph's
    /// `device = "cuda"`), so a hand-off to a decode worker on this machine goes by CUDA
    /// IPC. The timing model writes each handed-off block's fabricated bytes there.
    pub kv_on_gpu: bool,
}

impl Default for MockerConfig {
    fn default() -> Self {
        MockerConfig {
            worker_id: 0,
            block_size: 16,
            num_blocks: 16_384,
            max_num_seqs: 256,
            max_batched_tokens: 8_192,
            enable_prefix_caching: true,
            speedup: 1.0,
            vocab_size: 32_000,
            special_token_ids: vec![0, 1, 2],
            eos_probability: 1.0 / 2_048.0,
            seed: 0,
            hash_seed: DEFAULT_BLOCK_HASH_SEED,
            event_buffer: 4_096,
            kv_layout: SMOLLM2_135M_KV_LAYOUT,
            max_model_len: None,
            check_token_ids: false,
            kv_on_gpu: false,
        }
    }
}

/// A setting that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("`{field}` must be at least 1")]
    Zero { field: &'static str },
    #[error("`speedup` must be a positive number or `inf` (instant mode), got {0}")]
    Speedup(f64),
    #[error("`eos_probability` must lie in 0..=1, got {0}")]
    EosProbability(f64),
    #[error(
        "`vocab_size` {vocab_size} leaves no ordinary token once the {special} special ids \
         below it are skipped"
    )]
    NoOrdinaryTokens { vocab_size: u32, special: usize },
    #[error("`{field}` = {value} is more than this engine supports ({max})")]
    TooLarge {
        field: &'static str,
        value: usize,
        max: usize,
    },
    #[error(
        "`kv_layout.block_size` = {layout} disagrees with `block_size` = {block_size} \
         (leave it 0 to follow `block_size`)"
    )]
    LayoutBlockSize { layout: u32, block_size: usize },
    #[error("`kv_layout.{field}` must be at least 1")]
    LayoutZero { field: &'static str },
    #[error("a KV block of `kv_layout` takes {bytes} bytes, more than this engine moves ({max})")]
    LayoutTooLarge { bytes: u64, max: u64 },
}

impl MockerConfig {
    /// The default settings in instant mode: no sleeping, for CPU measurements of the rest
    /// of the pipeline.
    pub fn instant() -> Self {
        MockerConfig {
            speedup: f64::INFINITY,
            ..MockerConfig::default()
        }
    }

    /// True when the step loop must not sleep at all.
    pub fn is_instant(&self) -> bool {
        self.speedup == f64::INFINITY
    }

    /// Tokens the whole pool holds.
    pub fn total_kv_tokens(&self) -> usize {
        self.num_blocks.saturating_mul(self.block_size)
    }

    /// The KV layout in effect: `kv_layout` with the block size of `block_size`.
    pub fn layout(&self) -> KvLayout {
        KvLayout {
            block_size: u32::try_from(self.block_size).unwrap_or(u32::MAX),
            ..self.kv_layout
        }
    }

    /// Every problem with these settings, in a stable order; `Ok` when they can work.
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let mut errors = Vec::new();
        for (field, value) in [
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
            ("max_num_seqs", self.max_num_seqs),
            ("max_batched_tokens", self.max_batched_tokens),
            ("event_buffer", self.event_buffer),
        ] {
            if value == 0 {
                errors.push(ConfigError::Zero { field });
            }
        }
        for (field, value, max) in [
            ("block_size", self.block_size, MAX_BLOCK_SIZE),
            ("num_blocks", self.num_blocks, MAX_NUM_BLOCKS),
            ("event_buffer", self.event_buffer, MAX_EVENT_BUFFER),
        ] {
            if value > max {
                errors.push(ConfigError::TooLarge { field, value, max });
            }
        }
        if self.speedup.is_nan() || self.speedup <= 0.0 {
            errors.push(ConfigError::Speedup(self.speedup));
        }
        if !(0.0..=1.0).contains(&self.eos_probability) {
            errors.push(ConfigError::EosProbability(self.eos_probability));
        }
        let special = self.sorted_special_ids().len();
        if special as u64 >= self.vocab_size as u64 {
            errors.push(ConfigError::NoOrdinaryTokens {
                vocab_size: self.vocab_size,
                special,
            });
        }
        self.validate_layout(&mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn validate_layout(&self, errors: &mut Vec<ConfigError>) {
        let layout = self.kv_layout;
        if layout.block_size != 0 && layout.block_size as usize != self.block_size {
            errors.push(ConfigError::LayoutBlockSize {
                layout: layout.block_size,
                block_size: self.block_size,
            });
        }
        let mut complete = true;
        for (field, value) in [
            ("layers", layout.layers),
            ("kv_heads", layout.kv_heads),
            ("head_dim", layout.head_dim),
            ("dtype_bytes", layout.dtype_bytes),
        ] {
            if value == 0 {
                complete = false;
                errors.push(ConfigError::LayoutZero { field });
            }
        }
        // Checked here, so `KvLayout::bytes_per_block` cannot overflow on a valid config.
        let bytes = [
            2,
            u64::from(layout.layers),
            u64::from(layout.kv_heads),
            u64::from(layout.head_dim),
            u64::from(layout.dtype_bytes),
            self.block_size as u64,
        ]
        .into_iter()
        .try_fold(1u64, u64::checked_mul)
        .unwrap_or(u64::MAX);
        if complete && bytes > MAX_BLOCK_BYTES {
            errors.push(ConfigError::LayoutTooLarge {
                bytes,
                max: MAX_BLOCK_BYTES,
            });
        }
    }

    /// Special ids inside the vocabulary, sorted and without duplicates.
    pub(crate) fn sorted_special_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .special_token_ids
            .iter()
            .copied()
            .filter(|&id| id < self.vocab_size)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// `speedup` as a number, or the word `"instant"` for infinity (JSON has no infinity).
mod speedup_serde {
    use std::fmt;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(speedup: &f64, s: S) -> Result<S::Ok, S::Error> {
        if *speedup == f64::INFINITY {
            s.serialize_str("instant")
        } else {
            s.serialize_f64(*speedup)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        d.deserialize_any(SpeedupVisitor)
    }

    struct SpeedupVisitor;

    impl Visitor<'_> for SpeedupVisitor {
        type Value = f64;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a positive number or \"instant\"")
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
            Ok(v as f64)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
            Ok(v as f64)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
            match v {
                "instant" | "inf" | "infinity" => Ok(f64::INFINITY),
                other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
            }
        }
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
