//! What computes a step when the engine runs a real model instead of the timing model.
//!
//! The scheduler and block manager stay the same: they decide which sequences run, how
//! many of their tokens are computed this step and which pool blocks hold their KV. A
//! [`StepBackend`] computes exactly that batch (one forward pass over every scheduled
//! token, KV written into the named blocks) and samples the next token of each sequence
//! that finished its prompt or decoded. Sampling is a function of the request's options,
//! its seed and its tokens so far, so a preempted and recomputed sequence draws the same
//! tokens.

use dynamo_protocol::{SamplingOptions, TokenLogprob};

use crate::block_manager::BlockId;
use crate::sequence::SeqId;

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy)]
pub struct StepSeq<'a> {
    pub id: SeqId,
    /// The prompt followed by every token generated so far.
    pub tokens: &'a [u32],
    pub prompt_len: usize,
    /// KV of positions `0..start` is already in `table`'s blocks.
    pub start: usize,
    /// Positions `start..start + len` are computed this step.
    pub len: usize,
    /// The blocks holding positions `0..start + len`, `block_size` positions each.
    pub table: &'a [BlockId],
    /// Whether this step yields the sequence's next token (its last position is computed).
    pub sample: bool,
    pub sampling: &'a SamplingOptions,
    pub seed: u64,
}

/// A failure of the model itself; every sequence of the step fails with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

/// A model that computes the scheduler's steps over the engine's KV pool.
pub trait StepBackend: Send + 'static {
    /// Computes `batch` and returns one token for every entry whose `sample` is set, in
    /// batch order.
    fn forward(&mut self, batch: &[StepSeq<'_>]) -> Result<Vec<u32>, BackendError>;

    /// The log-probabilities of the tokens the last [`StepBackend::forward`] sampled, in
    /// the same order (`None` where the request asked for none); empty when the model
    /// computes none.
    fn take_logprobs(&mut self) -> Vec<Option<TokenLogprob>> {
        Vec::new()
    }

    /// Sequence `id` finished, was aborted or was preempted: its blocks are released.
    /// Called at the end of the step it finished in, or before the next batch otherwise.
    /// A preempted sequence comes back later under the same id, starting over from its
    /// cached prefix. Its cached blocks must stay readable (a prefill's blocks are
    /// exported after it ends).
    fn release(&mut self, _id: SeqId) {}

    /// Bytes of one pool block (every layer's keys and values, as the engine's
    /// `KvLayout` describes them).
    fn block_bytes(&self) -> usize;

    /// Appends the bytes of `blocks`, in order, to `out`; fails rather than send bytes
    /// that are not the blocks' KV.
    fn export_blocks(&self, blocks: &[BlockId], out: &mut Vec<u8>) -> Result<(), BackendError>;

    /// Overwrites each of `blocks` with the matching slice of `src` (`block_bytes()` each;
    /// slices of a message's payload, or of a peer's shared pool mapped in place).
    fn import_blocks(&mut self, blocks: &[BlockId], src: &[&[u8]]) -> Result<(), BackendError>;

    /// Makes the pool's bytes of `blocks` current, for peers that read them from the
    /// shared pool ([`StepBackend::shared_pool`]); a backend whose pool always is does
    /// nothing.
    fn sync_blocks(&mut self, _blocks: &[BlockId]) -> Result<(), BackendError> {
        Ok(())
    }

    /// The export name of this backend's pool when it lives in shared memory another
    /// process on this machine can map (block `id` at `id * block_bytes()`), so a hand-off
    /// sends block ids instead of bytes.
    fn shared_pool(&self) -> Option<String> {
        None
    }
}
