//! One request inside the scheduler: its tokens, how far its KV is computed, and the
//! blocks that hold it.

use dynamo_protocol::{block_hashes, BlockHash, FinishReason, SamplingOptions, TokenLogprob};

use crate::block_manager::{BlockId, BlockManager};
use crate::sampler::{TokenSampler, Vocabulary};

/// Identity of a sequence inside one engine.
pub type SeqId = u64;

/// A request as the scheduler takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSequence {
    pub id: SeqId,
    pub prompt: Vec<u32>,
    /// Tokens to generate at most; at least 1.
    pub max_tokens: u32,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Seeds the output tokens.
    pub seed: u64,
    /// How a real model samples (the mocker draws uniformly whatever they say).
    pub sampling: SamplingOptions,
}

#[derive(Debug)]
pub(crate) struct Sequence {
    pub id: SeqId,
    /// Prompt followed by the tokens generated so far.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub max_tokens: u32,
    pub generated: u32,
    /// Tokens whose KV is computed; the last generated token's KV is computed next step.
    pub computed: usize,
    /// Blocks holding `tokens`, in order.
    pub table: Vec<BlockId>,
    /// `table[..promoted]` are settled: cached, or full blocks that were not cached.
    pub promoted: usize,
    /// Chained hashes of the full blocks of `tokens` known so far.
    pub hashes: Vec<BlockHash>,
    /// Set at the first admission, taken by the first output.
    pub cached_tokens: Option<u32>,
    pub admitted_once: bool,
    pub finished: bool,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    sampler: TokenSampler,
    pub seed: u64,
    pub sampling: SamplingOptions,
}

impl Sequence {
    pub fn new(req: NewSequence) -> Self {
        let prompt_len = req.prompt.len();
        let mut tokens = req.prompt;
        tokens.reserve(req.max_tokens.min(1 << 16) as usize);
        Sequence {
            id: req.id,
            tokens,
            prompt_len,
            max_tokens: req.max_tokens,
            generated: 0,
            computed: 0,
            table: Vec::new(),
            promoted: 0,
            hashes: Vec::new(),
            cached_tokens: None,
            admitted_once: false,
            finished: false,
            stop_token_ids: req.stop_token_ids,
            ignore_eos: req.ignore_eos,
            sampler: TokenSampler::new(req.seed),
            seed: req.seed,
            sampling: req.sampling,
        }
    }

    /// Tokens whose KV still has to be computed before the next token can be produced.
    pub fn remaining(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// True when the next compute is one decode token rather than (re)prefill.
    pub fn is_decoding(&self) -> bool {
        self.generated > 0 && self.remaining() == 1
    }

    /// Extends `hashes` to every full block of `tokens[..upto]`.
    pub fn hash_blocks(&mut self, upto: usize, block_size: usize, seed: u64) {
        let full = upto.min(self.tokens.len()) / block_size;
        if self.hashes.len() < full {
            // The protocol hashes whole prefixes; recomputing the prefix keeps this engine
            // byte-for-byte in agreement with the router.
            self.hashes = block_hashes(&self.tokens[..full * block_size], block_size, seed);
        }
    }

    /// Caches the blocks that the computed tokens have filled since the last call.
    pub fn promote_full_blocks(&mut self, blocks: &mut BlockManager, block_size: usize, seed: u64) {
        let full = (self.computed / block_size).min(self.table.len());
        if full <= self.promoted {
            return;
        }
        self.hash_blocks(full * block_size, block_size, seed);
        let parent = self.promoted.checked_sub(1).map(|i| self.hashes[i]);
        blocks.promote(
            &mut self.table[self.promoted..full],
            parent,
            &self.hashes[self.promoted..full],
        );
        self.promoted = full;
    }

    /// Produces the next token; returns why the sequence finished, if it did.
    pub fn generate(&mut self, vocab: &Vocabulary) -> (u32, Option<FinishReason>) {
        let token = self
            .sampler
            .next_token(vocab, &self.stop_token_ids, self.ignore_eos);
        self.accept(token)
    }

    /// Appends a token produced for this sequence; returns why it finished, if it did.
    /// The log-probability of `token` under the timing model's own draw, with `top`
    /// alternatives (see [`Vocabulary::logprob`]).
    pub fn own_logprob(&self, vocab: &Vocabulary, token: u32, top: u32) -> TokenLogprob {
        vocab.logprob(token, &self.stop_token_ids, self.ignore_eos, top)
    }

    pub fn accept(&mut self, token: u32) -> (u32, Option<FinishReason>) {
        self.tokens.push(token);
        self.generated += 1;
        let finish = if !self.ignore_eos && self.stop_token_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else if self.generated >= self.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        self.finished = finish.is_some();
        (token, finish)
    }

    /// Gives back every block and forgets the computed KV (preemption, abort, finish).
    pub fn release_blocks(&mut self, blocks: &mut BlockManager) {
        blocks.release(&self.table);
        self.table.clear();
        self.promoted = 0;
        self.computed = 0;
    }
}
