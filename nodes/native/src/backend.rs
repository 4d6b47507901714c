//! The native model as the engine's [`StepBackend`]: the scheduler's batch goes through
//! one forward pass over the paged pool, then each finished row is sampled.

use dynamo_mocker::{BackendError, BlockId, StepBackend, StepSeq};
use dynamo_protocol::TokenLogprob;

use dynamo_runtime::kv_transfer::ShmExport;

use crate::kv_pool::KvPool;
use crate::model::{BatchSeq, Model};
use crate::sampling::{logprobs, Sampler};

pub struct NativeBackend {
    model: Model,
    kv: KvPool,
    /// Serves `kv` to decode workers on this machine while the backend lives.
    export: Option<ShmExport>,
    sampler: Sampler,
    logits: Vec<f32>,
    /// The last step's log-probabilities, when a request asked for them.
    logprobs: Vec<Option<TokenLogprob>>,
}

impl NativeBackend {
    /// A backend over `kv`; its pool is offered to peers on this machine when it can
    /// be exported (otherwise hand-offs carry the bytes, and the failure is logged).
    pub fn new(model: Model, kv: KvPool) -> NativeBackend {
        let export = kv
            .share()
            .map_err(|e| tracing::warn!(error = %e, "native engine: KV pool not shared"))
            .ok();
        NativeBackend {
            model,
            kv,
            export,
            sampler: Sampler::default(),
            logits: Vec::new(),
            logprobs: Vec::new(),
        }
    }
}

impl StepBackend for NativeBackend {
    fn forward(&mut self, batch: &[StepSeq<'_>]) -> Result<Vec<u32>, BackendError> {
        let seqs: Vec<BatchSeq<'_>> = batch
            .iter()
            .map(|s| BatchSeq {
                tokens: &s.tokens[s.start..s.start + s.len],
                start: s.start,
                table: s.table,
                logits: s.sample,
            })
            .collect();
        let vocab = self.model.config.vocab;
        let logits = self
            .model
            .forward(&mut self.kv, &seqs, &mut self.logits)
            .map_err(|e| BackendError(e.to_string()))?;
        let mut rows = logits.chunks_exact(vocab);
        let mut tokens = Vec::new();
        self.logprobs.clear();
        let want = batch
            .iter()
            .any(|s| s.sample && s.sampling.logprobs.is_some());
        for s in batch.iter().filter(|s| s.sample) {
            let Some(row) = rows.next() else {
                return Err(BackendError("the model returned too few logits".into()));
            };
            let generated = &s.tokens[s.prompt_len.min(s.tokens.len())..];
            let token = self
                .sampler
                .sample(row, s.sampling, generated, s.seed, s.start + s.len);
            if want {
                (self.logprobs).push(s.sampling.logprobs.map(|top| logprobs(row, token, top)));
            }
            tokens.push(token);
        }
        Ok(tokens)
    }

    fn take_logprobs(&mut self) -> Vec<Option<TokenLogprob>> {
        std::mem::take(&mut self.logprobs)
    }

    fn block_bytes(&self) -> usize {
        self.kv.block_bytes()
    }

    fn export_blocks(&self, blocks: &[BlockId], out: &mut Vec<u8>) -> Result<(), BackendError> {
        self.kv.export(blocks, out);
        Ok(())
    }

    fn import_blocks(&mut self, blocks: &[BlockId], src: &[&[u8]]) -> Result<(), BackendError> {
        if self.kv.import(blocks, src) {
            Ok(())
        } else {
            Err(BackendError(format!(
                "{} slices do not fill {} blocks of {} bytes",
                src.len(),
                blocks.len(),
                self.kv.block_bytes()
            )))
        }
    }

    fn shared_pool(&self) -> Option<String> {
        self.export.as_ref().map(|e| e.name().to_string())
    }
}
