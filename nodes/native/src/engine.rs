//! Starting a native worker: load the model, size the pool, hand both to the engine shell
//! (scheduler, block manager, KV events, hand-off) shared with the mocker.

use std::path::PathBuf;
use std::time::Instant;

use dynamo_mocker::{MockerConfig, MockerEngine};
use dynamo_protocol::KvLayout;

use crate::backend::NativeBackend;
use crate::error::LoadError;
use crate::kv_pool::KvPool;
use crate::model::{load, Model};

#[derive(Debug, Clone, PartialEq)]
pub struct NativeConfig {
    pub model: PathBuf,
    pub worker_id: u64,
    /// Compute threads of this engine (matmuls). 1 unless the machine has cores to spare.
    pub threads: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_num_seqs: usize,
    pub max_batched_tokens: usize,
    pub enable_prefix_caching: bool,
    /// Seeds requests that bring no seed of their own.
    pub seed: u64,
}

impl NativeConfig {
    pub fn new(model: impl Into<PathBuf>) -> NativeConfig {
        NativeConfig {
            model: model.into(),
            worker_id: 0,
            threads: 1,
            block_size: 16,
            num_blocks: 1024,
            max_num_seqs: 64,
            max_batched_tokens: 512,
            enable_prefix_caching: true,
            seed: 0,
        }
    }
}

impl NativeConfig {
    /// The engine shell's configuration for a real model of `vocab_size` tokens and
    /// `max_model_len` positions whose KV blocks are laid out as `layout` (the native and
    /// the llama.cpp engine alike): prompt ids outside the vocabulary are refused.
    pub fn shell(&self, vocab_size: u32, layout: KvLayout, max_model_len: usize) -> MockerConfig {
        MockerConfig {
            worker_id: self.worker_id,
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            max_num_seqs: self.max_num_seqs,
            max_batched_tokens: self.max_batched_tokens,
            enable_prefix_caching: self.enable_prefix_caching,
            vocab_size,
            special_token_ids: Vec::new(),
            seed: self.seed,
            kv_layout: layout,
            max_model_len: Some(max_model_len),
            check_token_ids: true,
            ..MockerConfig::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("loading the model: {0}")]
    Load(#[from] LoadError),
    #[error("reserving the KV pool: {0}")]
    Pool(std::io::Error),
    #[error("starting the engine: {0}")]
    Engine(#[from] dynamo_mocker::EngineError),
}

/// A loaded model and the figures of its load.
pub struct Loaded {
    pub model: Model,
    pub layout: KvLayout,
    pub load_ms: f64,
    pub weight_bytes: usize,
}

/// Loads the model of `config` (no engine yet).
pub fn load_model(config: &NativeConfig) -> Result<Loaded, LoadError> {
    let started = Instant::now();
    let (model_config, weights) = load(&config.model)?;
    let weight_bytes = weights.memory_bytes();
    let layout = KvLayout {
        layers: model_config.layers as u32,
        kv_heads: model_config.kv_heads as u32,
        head_dim: model_config.head_dim as u32,
        dtype_bytes: crate::kv_pool::ELEM_BYTES as u32,
        block_size: config.block_size as u32,
    };
    let model = Model::new(model_config, weights, config.threads);
    Ok(Loaded {
        model,
        layout,
        load_ms: started.elapsed().as_secs_f64() * 1e3,
        weight_bytes,
    })
}

/// Loads the model and starts a worker serving it.
pub fn start(config: &NativeConfig) -> Result<MockerEngine, NativeError> {
    let loaded = load_model(config)?;
    let c = &loaded.model.config;
    tracing::info!(
        model = %config.model.display(),
        load_ms = loaded.load_ms,
        weight_mib = loaded.weight_bytes >> 20,
        kernel = crate::quant::kernel_name(),
        threads = config.threads,
        "native engine: model loaded"
    );
    let kv = KvPool::new(c.layers, c.kv_dim(), config.block_size, config.num_blocks)
        .map_err(NativeError::Pool)?;
    let shell = config.shell(
        u32::try_from(c.vocab).unwrap_or(u32::MAX),
        loaded.layout,
        c.context_length,
    );
    let backend = NativeBackend::new(loaded.model, kv);
    Ok(MockerEngine::start_with_backend(shell, Box::new(backend))?)
}
