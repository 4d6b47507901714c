//! Starting a llama.cpp worker: load the model into a context sized for the pool, learn
//! how the context serialises its KV, and hand the backend to the engine shell.

use std::time::Instant;

use dynamo_mocker::MockerEngine;
use dynamo_protocol::KvLayout;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use crate::backend::LlamaStep;
use crate::model::{ContextShape, Loaded};
use crate::state::{SeqState, StateFormat};

/// llama.cpp serves at most this many sequences in one context (`LLAMA_MAX_SEQ`).
pub const MAX_SEQS: usize = 256;

/// The same settings as the native engine's, with the same defaults (a small cache:
/// llama.cpp allocates all of it at start).
pub type LlamaCppConfig = dynamo_native::NativeConfig;

#[derive(Debug, thiserror::Error)]
pub enum LlamaCppError {
    #[error("initialising llama.cpp: {0}")]
    Init(String),
    #[error("llama.cpp cannot load {path}: {message}")]
    Load { path: String, message: String },
    #[error("creating the llama.cpp context: {0}")]
    Context(String),
    #[error("max_num_seqs = {0}: llama.cpp serves at most {MAX_SEQS} sequences at once")]
    TooManySeqs(usize),
    #[error("reserving the KV pool: {0}")]
    Pool(String),
    #[error("reading llama.cpp's KV layout: {0}")]
    Probe(String),
    #[error("starting the engine: {0}")]
    Engine(#[from] dynamo_mocker::EngineError),
}

/// Computes one token in llama.cpp sequence 0 and reads how its KV is serialised.
fn probe(loaded: &mut Loaded) -> Result<StateFormat, LlamaCppError> {
    let probe = |e: &dyn std::fmt::Display| LlamaCppError::Probe(e.to_string());
    let mut batch = LlamaBatch::new(1, 1);
    // Any token will do; BOS when the model has one.
    let bos = Some(loaded.model().vocab().bos())
        .filter(|t| t.0 >= 0 && t.0 < loaded.model().n_vocab())
        .unwrap_or(LlamaToken::new(0));
    batch.add(bos, 0, &[0], false).map_err(|e| probe(&e))?;
    loaded.decode(&mut batch).map_err(|e| probe(&e))?;
    let bytes = loaded.state(0).map_err(|e| probe(&e))?;
    loaded.clear(0);
    let state = SeqState::parse(&bytes).map_err(|e| {
        probe(&format!(
            "{e} (models whose KV cells carry extra data, such as M-RoPE, are not supported)"
        ))
    })?;
    if state.positions() != 1 || state.format.layers == 0 {
        return Err(probe(&"the probe's state does not hold its one position"));
    }
    Ok(state.format)
}

/// The pool's layout as the hand-off describes it.
fn layout(loaded: &Loaded, f: &StateFormat, block_size: usize) -> Result<KvLayout, LlamaCppError> {
    let m = loaded.model();
    let heads = m.n_head().max(1);
    let kv_heads = m.n_head_kv().max(1);
    // The key length when the file names one (Qwen3, Gemma), else the embedding per head.
    let arch = m.meta_val_str("general.architecture").unwrap_or_default();
    let head_dim = m
        .meta_val_str(&format!("{arch}.attention.key_length"))
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(u32::try_from(m.n_embd()).unwrap_or(0) / heads);
    let dims = (kv_heads * head_dim) as usize;
    if dims == 0 || f.k_row != f.v_row || f.k_row % dims != 0 {
        return Err(LlamaCppError::Probe(format!(
            "KV rows of {} and {} bytes for {kv_heads} heads of {head_dim} dims",
            f.k_row, f.v_row
        )));
    }
    Ok(KvLayout {
        layers: f.layers as u32,
        kv_heads,
        head_dim,
        dtype_bytes: (f.k_row / dims) as u32,
        block_size: block_size as u32,
    })
}

/// Loads the model into llama.cpp and starts a worker serving it.
pub fn start(config: &LlamaCppConfig) -> Result<MockerEngine, LlamaCppError> {
    if config.max_num_seqs > MAX_SEQS {
        return Err(LlamaCppError::TooManySeqs(config.max_num_seqs));
    }
    let started = Instant::now();
    // Tokens per llama_decode (a step's tokens go in several when there are more): at
    // most 1024, since llama.cpp keeps a logits row per batch token; at least one per
    // sequence, which llama.cpp reserves.
    let n_batch = (config.max_batched_tokens.min(1024))
        .max(config.max_num_seqs)
        .max(config.block_size);
    let shape = ContextShape {
        threads: config.threads,
        // The pool's positions, and a batch's worth for blocks held by two slots at once
        // while one is being loaded.
        cells: config.num_blocks * config.block_size + n_batch,
        seqs: config.max_num_seqs,
        n_batch,
    };
    let mut loaded = Loaded::load(&config.model, &shape)?;
    let format = probe(&mut loaded)?;
    let layout = layout(&loaded, &format, config.block_size)?;
    let model = loaded.model();
    let max_model_len = usize::try_from(model.n_ctx_train())
        .unwrap_or(usize::MAX)
        .min(shape.cells);
    tracing::info!(
        model = %config.model.display(),
        load_ms = started.elapsed().as_secs_f64() * 1e3,
        threads = config.threads,
        cells = shape.cells,
        block_bytes = format.block_bytes(config.block_size),
        "llamacpp engine: model loaded"
    );
    let shell = config.shell(
        u32::try_from(model.n_vocab()).unwrap_or(u32::MAX),
        layout,
        max_model_len,
    );
    let backend = LlamaStep::new(
        loaded,
        format,
        config.block_size,
        config.num_blocks,
        config.max_num_seqs,
        n_batch,
        config.enable_prefix_caching,
    )?;
    Ok(MockerEngine::start_with_backend(shell, Box::new(backend))?)
}
