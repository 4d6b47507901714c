//! The model and its llama.cpp context, owned together, and the few context operations
//! the backend needs, with llama.cpp's failures as [`BackendError`]s.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::OnceLock;

use dynamo_mocker::BackendError;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::{DecodeError, LlamaStateSeqFlags};

use crate::engine::LlamaCppError;

type Context<'model> = LlamaContext<'model>;

self_cell::self_cell!(
    /// A model and the one context computing with it.
    struct ModelAndContext {
        owner: LlamaModel,
        #[covariant]
        dependent: Context,
    }
);

/// The loaded model and its context.
pub(crate) struct Loaded(ModelAndContext);

// SAFETY: a llama.cpp context has no thread affinity: it may be used from any thread as
// long as one thread at a time does, which `&mut self` (the step loop owns the backend)
// guarantees. The model is `Send` and `Sync` already.
unsafe impl Send for Loaded {}

/// llama.cpp's process-wide initialisation, done once.
fn backend() -> Result<&'static LlamaBackend, LlamaCppError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            // llama.cpp's own log lines go to `tracing` (debug), not to stderr.
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| LlamaCppError::Init(e.clone()))
}

/// What the context is made with.
pub(crate) struct ContextShape {
    pub threads: usize,
    /// Cache cells: every position of every sequence at once.
    pub cells: usize,
    /// llama.cpp sequences (our sequences in flight at once).
    pub seqs: usize,
    /// Tokens per `llama_decode`.
    pub n_batch: usize,
}

fn backend_err(what: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError(format!("llama.cpp {what}: {e}"))
}

impl Loaded {
    pub(crate) fn load(path: &Path, shape: &ContextShape) -> Result<Loaded, LlamaCppError> {
        let backend = backend()?;
        let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
            .map_err(|e| LlamaCppError::Load {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        let cells = u32::try_from(shape.cells.max(1)).unwrap_or(u32::MAX);
        let threads = i32::try_from(shape.threads.max(1)).unwrap_or(1);
        let n_batch = u32::try_from(shape.n_batch.max(1)).unwrap_or(u32::MAX);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(cells))
            .with_n_batch(n_batch)
            .with_n_ubatch(n_batch.min(512))
            .with_n_seq_max(u32::try_from(shape.seqs).unwrap_or(1))
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            // One cache for every sequence: cells go where they are needed.
            .with_kv_unified(true)
            // Values stored by position, like keys (the pool's block layout).
            .with_flash_attention_policy(llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED);
        let cell = ModelAndContext::try_new(model, |model| model.new_context(backend, params))
            .map_err(|e| LlamaCppError::Context(e.to_string()))?;
        Ok(Loaded(cell))
    }

    pub(crate) fn model(&self) -> &LlamaModel {
        self.0.borrow_owner()
    }

    /// The serialised KV state of llama.cpp sequence `seq`.
    pub(crate) fn state(&self, seq: usize) -> Result<Vec<u8>, BackendError> {
        let ctx = self.0.borrow_dependent();
        let seq = seq as i32;
        let flags = LlamaStateSeqFlags::empty();
        let size = ctx.state_seq_get_size_ext(seq, flags);
        let mut bytes = vec![0u8; size];
        // SAFETY: `bytes` has the size llama.cpp asked for.
        let written = unsafe { ctx.state_seq_get_data_ext(bytes.as_mut_ptr(), seq, flags) };
        if written != size {
            return Err(BackendError(format!(
                "llama.cpp wrote {written} bytes of KV state, announced {size}"
            )));
        }
        Ok(bytes)
    }

    /// Replaces sequence `seq`'s KV with `state` (made by [`crate::state::build`]).
    pub(crate) fn set_state(&mut self, seq: usize, state: &[u8]) -> Result<(), BackendError> {
        let ok = self.0.with_dependent_mut(|_, ctx| {
            // SAFETY: `state` is in the format this context writes (checked against a
            // state it wrote when the engine started); llama.cpp checks every size and
            // type again while reading and refuses a mismatch.
            unsafe { ctx.state_seq_set_data_ext(state, seq as i32, LlamaStateSeqFlags::empty()) }
        });
        if ok {
            Ok(())
        } else {
            Err(BackendError(
                "llama.cpp refused the KV state of cached blocks".into(),
            ))
        }
    }

    /// Makes sequence `to` share sequence `from`'s cells of positions `0..positions`
    /// (no copy: a unified cache's cell can belong to several sequences).
    pub(crate) fn share(
        &mut self,
        from: usize,
        to: usize,
        positions: usize,
    ) -> Result<(), BackendError> {
        self.0
            .with_dependent_mut(|_, ctx| {
                ctx.copy_kv_cache_seq(
                    from as i32,
                    to as i32,
                    Some(0),
                    u32::try_from(positions).ok(),
                )
            })
            .map_err(|e| backend_err("sharing cached positions", e))
    }

    /// Drops sequence `seq`'s positions from `from` on.
    pub(crate) fn truncate(&mut self, seq: usize, from: usize) {
        self.0.with_dependent_mut(|_, ctx| {
            let from = u32::try_from(from).ok();
            if let Err(e) = ctx.clear_kv_cache_seq(u32::try_from(seq).ok(), from, None) {
                tracing::warn!(error = %e, "llamacpp: dropping KV positions failed");
            }
        });
    }

    /// Drops everything of sequence `seq`.
    pub(crate) fn clear(&mut self, seq: usize) {
        self.truncate(seq, 0);
    }

    pub(crate) fn decode(&mut self, batch: &mut LlamaBatch<'_>) -> Result<(), BackendError> {
        self.0
            .with_dependent_mut(|_, ctx| ctx.decode(batch))
            .map_err(|e| match e {
                DecodeError::NoKvCacheSlot => BackendError(
                    "llama.cpp's KV cache has no room for the batch (raise num_blocks)".into(),
                ),
                e => backend_err("decode", e),
            })
    }

    /// The logits of the batch's `i`-th token (one that asked for logits).
    pub(crate) fn logits(&self, i: i32) -> &[f32] {
        self.0.borrow_dependent().get_logits_ith(i)
    }
}
