//! vLLM-style continuous batching over the block pool: a waiting and a running queue, one
//! token budget per step, chunked prefill, one decode token per running sequence, LIFO
//! preemption when blocks run out. Pure and synchronous; the engine's step loop drives it.

use std::collections::VecDeque;

use dynamo_protocol::{FinishReason, KvEvent, TokenLogprob};

use crate::backend::{BackendError, StepBackend, StepSeq};
use crate::block_manager::{BlockCounts, BlockId, BlockManager, ImportError, Imported, KvSnapshot};
use crate::config::{ConfigError, MockerConfig};
use crate::sampler::Vocabulary;
use crate::sequence::{NewSequence, SeqId, Sequence};
use crate::timing::StepWork;

/// Why a request is refused before it is queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    #[error(
        "the request can never fit: {prompt_tokens} prompt tokens + {max_tokens} new tokens need \
         {needed_blocks} KV blocks of {block_size} tokens, the pool has {pool_blocks}"
    )]
    TooLong {
        prompt_tokens: usize,
        max_tokens: u32,
        needed_blocks: u64,
        block_size: usize,
        pool_blocks: usize,
    },
    #[error("prompt token {position} is id {id}, outside the model's vocabulary of {vocab_size}")]
    UnknownToken {
        position: usize,
        id: u32,
        vocab_size: u32,
    },
    #[error(
        "{prompt_tokens} prompt tokens + {max_tokens} new tokens exceed the model's context of \
         {context} tokens"
    )]
    ExceedsContext {
        prompt_tokens: usize,
        max_tokens: u32,
        context: usize,
    },
}

/// One token a step produced for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqOutput {
    pub id: SeqId,
    pub token: u32,
    pub finish: Option<FinishReason>,
    /// Prompt tokens served from the prefix cache; on the sequence's first output only.
    pub cached_tokens: Option<u32>,
    /// The token's log-probability, when the request asked for it.
    pub logprob: Option<TokenLogprob>,
}

/// Counters of the scheduler and its block pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub blocks: BlockCounts,
    pub running: usize,
    pub waiting: usize,
    pub preemptions: u64,
    /// Prompt tokens found in the prefix cache when requests were first admitted.
    pub prefix_hit_tokens: u64,
    /// Prompt tokens of the requests admitted so far.
    pub prompt_tokens: u64,
}

/// The checks a request must pass before it is queued; cheap, so the engine runs them on
/// the caller's side of the channel too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub block_size: usize,
    pub pool_blocks: usize,
    /// Positions the model can attend over (a real model's context); `None`: unbounded.
    pub max_model_len: Option<usize>,
}

impl RequestLimits {
    pub fn new(config: &MockerConfig) -> Self {
        RequestLimits {
            block_size: config.block_size.max(1),
            pool_blocks: config.num_blocks,
            max_model_len: config.max_model_len,
        }
    }

    /// Refuses an empty prompt, `max_tokens == 0`, and a request whose KV could never fit
    /// in the pool (it would otherwise be preempted forever).
    pub fn check(&self, prompt_len: usize, max_tokens: u32) -> Result<(), AdmitError> {
        if prompt_len == 0 {
            return Err(AdmitError::EmptyPrompt);
        }
        if max_tokens == 0 {
            return Err(AdmitError::ZeroMaxTokens);
        }
        // The most KV it will hold: every token but the last generated one.
        let tokens = prompt_len as u64 + max_tokens as u64 - 1;
        if let Some(context) = self.max_model_len {
            if tokens > context as u64 {
                return Err(AdmitError::ExceedsContext {
                    prompt_tokens: prompt_len,
                    max_tokens,
                    context,
                });
            }
        }
        let needed_blocks = tokens.div_ceil(self.block_size as u64);
        if needed_blocks > self.pool_blocks as u64 {
            return Err(AdmitError::TooLong {
                prompt_tokens: prompt_len,
                max_tokens,
                needed_blocks,
                block_size: self.block_size,
                pool_blocks: self.pool_blocks,
            });
        }
        Ok(())
    }
}

/// A step whose backend failed: why, and the sequences it took down (already aborted).
#[derive(Debug)]
pub struct StepFailed {
    pub error: BackendError,
    pub ids: Vec<SeqId>,
    pub work: StepWork,
}

#[derive(Debug)]
pub struct Scheduler {
    limits: RequestLimits,
    block_size: usize,
    hash_seed: u64,
    caching: bool,
    max_num_seqs: usize,
    max_batched_tokens: usize,
    vocab: Vocabulary,
    blocks: BlockManager,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    /// Tokens to compute this step for `running[i]`; scratch reused every step.
    plan: Vec<usize>,
    preemptions: u64,
    prefix_hit_tokens: u64,
    prompt_tokens: u64,
    /// Sequences finished, aborted or preempted since the backend last heard of it.
    released: Vec<SeqId>,
    /// A real model's vocabulary size, when prompts are checked against it.
    real_vocab: Option<u32>,
}

impl Scheduler {
    pub fn new(config: &MockerConfig) -> Result<Self, Vec<ConfigError>> {
        config.validate()?;
        Ok(Scheduler {
            limits: RequestLimits::new(config),
            block_size: config.block_size,
            hash_seed: config.hash_seed,
            caching: config.enable_prefix_caching,
            max_num_seqs: config.max_num_seqs,
            max_batched_tokens: config.max_batched_tokens,
            vocab: Vocabulary::new(
                config.vocab_size,
                config.sorted_special_ids(),
                config.eos_probability,
            ),
            blocks: BlockManager::new(
                config.worker_id,
                config.num_blocks,
                config.enable_prefix_caching,
            ),
            waiting: VecDeque::new(),
            running: Vec::new(),
            plan: Vec::new(),
            preemptions: 0,
            prefix_hit_tokens: 0,
            prompt_tokens: 0,
            released: Vec::new(),
            real_vocab: config.check_token_ids.then_some(config.vocab_size),
        })
    }

    /// What this engine can ever serve.
    pub fn limits(&self) -> RequestLimits {
        self.limits
    }

    /// Queues a request at the back of the waiting queue. Ids are the caller's to keep
    /// unique (the engine numbers its requests).
    pub fn add(&mut self, req: NewSequence) -> Result<(), AdmitError> {
        self.limits.check(req.prompt.len(), req.max_tokens)?;
        if let Some(vocab_size) = self.real_vocab {
            if let Some((position, &id)) = req
                .prompt
                .iter()
                .enumerate()
                .find(|(_, &t)| t >= vocab_size)
            {
                return Err(AdmitError::UnknownToken {
                    position,
                    id,
                    vocab_size,
                });
            }
        }
        self.waiting.push_back(Sequence::new(req));
        Ok(())
    }

    /// Removes a sequence wherever it is and frees its blocks at once. False if unknown
    /// (already finished, say).
    pub fn abort(&mut self, id: SeqId) -> bool {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let mut seq = self.running.remove(i);
            seq.release_blocks(&mut self.blocks);
            self.released.push(id);
            return true;
        }
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            if let Some(mut seq) = self.waiting.remove(i) {
                seq.release_blocks(&mut self.blocks);
            }
            self.released.push(id);
            return true;
        }
        false
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            blocks: self.blocks.counts(),
            running: self.running.len(),
            waiting: self.waiting.len(),
            preemptions: self.preemptions,
            prefix_hit_tokens: self.prefix_hit_tokens,
            prompt_tokens: self.prompt_tokens,
        }
    }

    /// Moves the KV events published since the last call to `out`.
    pub fn drain_events(&mut self, out: &mut Vec<KvEvent>) {
        self.blocks.drain_events(out);
    }

    /// The whole cache as events, for a router that lost track (drain events first).
    pub fn kv_snapshot(&self) -> KvSnapshot {
        self.blocks.snapshot()
    }

    /// Forgets the prefix cache (publishes `Cleared`).
    pub fn clear_cache(&mut self) {
        self.blocks.clear();
    }

    /// Caches a chain of blocks computed elsewhere (a prefill worker's hand-off); see
    /// [`BlockManager::import`].
    pub fn import_blocks(
        &mut self,
        parent: Option<dynamo_protocol::BlockHash>,
        hashes: &[dynamo_protocol::BlockHash],
    ) -> Result<Imported, ImportError> {
        self.blocks.import(parent, hashes)
    }

    /// Runs one step: schedules under the budget, computes, appends one output per
    /// sequence that produced a token to `out`, retires finished sequences. Returns what
    /// the step computed, for the timing model.
    pub fn step(&mut self, out: &mut Vec<SeqOutput>) -> StepWork {
        match self.run_step(out, None) {
            Ok(work) => work,
            // Without a backend nothing can fail.
            Err(failed) => failed.work,
        }
    }

    /// Runs one step whose tokens `backend` computes and samples. When the backend fails,
    /// every sequence it was given is aborted (blocks freed) and named in the error.
    pub fn step_with(
        &mut self,
        out: &mut Vec<SeqOutput>,
        backend: &mut dyn StepBackend,
    ) -> Result<StepWork, StepFailed> {
        self.run_step(out, Some(backend))
    }

    fn run_step(
        &mut self,
        out: &mut Vec<SeqOutput>,
        mut backend: Option<&mut dyn StepBackend>,
    ) -> Result<StepWork, StepFailed> {
        let mut budget = self.max_batched_tokens;
        self.plan.clear();
        let preempted = self.schedule_running(&mut budget);
        if !preempted {
            self.admit_waiting(&mut budget);
        }
        // Preempted sequences, before the batch that no longer has them.
        self.tell_released(backend.as_deref_mut());
        let total = self.blocks.counts().total.max(1);
        let mut work = StepWork {
            kv_usage: self.blocks.counts().active as f64 / total as f64,
            ..StepWork::default()
        };

        let mut logprobs = Vec::new().into_iter();
        let mut sampled = match backend.as_deref_mut() {
            None => None,
            Some(backend) => match self.forward(backend) {
                Ok(tokens) => {
                    logprobs = backend.take_logprobs().into_iter();
                    Some(tokens.into_iter())
                }
                Err((error, ids)) => {
                    for &id in &ids {
                        self.abort(id);
                    }
                    return Err(StepFailed { error, ids, work });
                }
            },
        };

        for (seq, &num_new) in self.running.iter_mut().zip(&self.plan) {
            if seq.is_decoding() {
                work.decode_seqs += 1;
            } else {
                work.prefill_tokens += num_new;
            }
            seq.computed += num_new;
            if self.caching {
                seq.promote_full_blocks(&mut self.blocks, self.block_size, self.hash_seed);
            }
            if seq.remaining() == 0 {
                let (token, finish, logprob) = match sampled.as_mut().and_then(Iterator::next) {
                    Some(token) => {
                        let logprob = logprobs.next().flatten();
                        let (token, finish) = seq.accept(token);
                        (token, finish, logprob)
                    }
                    None => {
                        let (token, finish) = seq.generate(&self.vocab);
                        let logprob = (seq.sampling.logprobs)
                            .map(|top| seq.own_logprob(&self.vocab, token, top));
                        (token, finish, logprob)
                    }
                };
                out.push(SeqOutput {
                    id: seq.id,
                    token,
                    finish,
                    cached_tokens: seq.cached_tokens.take(),
                    logprob,
                });
            }
        }

        let blocks = &mut self.blocks;
        let released = &mut self.released;
        self.running.retain_mut(|seq| {
            if seq.finished {
                seq.release_blocks(blocks);
                released.push(seq.id);
            }
            !seq.finished
        });
        self.tell_released(backend);
        Ok(work)
    }

    /// Tells the backend which sequences it will not see again (finished or aborted), so
    /// it can free what it keeps per sequence; without a backend, forgets them.
    fn tell_released(&mut self, backend: Option<&mut dyn StepBackend>) {
        match backend {
            Some(backend) => {
                for id in self.released.drain(..) {
                    backend.release(id);
                }
            }
            None => self.released.clear(),
        }
    }

    /// Hands the planned batch to `backend`; checks it sampled one token per sampling
    /// entry. On failure, the ids of the batch's sequences.
    fn forward(
        &self,
        backend: &mut dyn StepBackend,
    ) -> Result<Vec<u32>, (BackendError, Vec<SeqId>)> {
        let batch: Vec<StepSeq<'_>> = self
            .running
            .iter()
            .zip(&self.plan)
            .map(|(seq, &len)| StepSeq {
                id: seq.id,
                tokens: &seq.tokens,
                prompt_len: seq.prompt_len,
                start: seq.computed,
                len,
                table: &seq.table,
                sample: seq.remaining() == len,
                sampling: &seq.sampling,
                seed: seq.seed,
            })
            .collect();
        let wanted = batch.iter().filter(|s| s.sample).count();
        let ids = || batch.iter().map(|s| s.id).collect::<Vec<_>>();
        match backend.forward(&batch) {
            Ok(tokens) if tokens.len() == wanted => Ok(tokens),
            Ok(tokens) => Err((
                BackendError(format!(
                    "the model sampled {} tokens for {wanted} sequences",
                    tokens.len()
                )),
                ids(),
            )),
            Err(err) => Err((err, ids())),
        }
    }

    /// Takes one reference to each cached block of `hashes` (so none is evicted or
    /// rewritten until [`Scheduler::unpin_blocks`]) and returns their ids; all or none:
    /// `Err(i)` when block `i` is not cached.
    pub fn pin_blocks(
        &mut self,
        hashes: &[dynamo_protocol::BlockHash],
    ) -> Result<Vec<BlockId>, usize> {
        let mut ids = Vec::with_capacity(hashes.len());
        let taken = self.blocks.acquire_prefix(hashes, &mut ids);
        if taken < hashes.len() {
            self.blocks.release(&ids);
            return Err(taken);
        }
        Ok(ids)
    }

    /// Drops the references [`Scheduler::pin_blocks`] took.
    pub fn unpin_blocks(&mut self, ids: &[BlockId]) {
        self.blocks.release(ids);
    }

    /// The pool block caching `hash`, if any.
    pub fn block_of(&self, hash: dynamo_protocol::BlockHash) -> Option<BlockId> {
        self.blocks.block_of(hash)
    }

    /// Gives every running sequence its share of the budget in queue order, preempting
    /// the newest ones when blocks run out. Returns whether anything was preempted.
    fn schedule_running(&mut self, budget: &mut usize) -> bool {
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
            let seq = &self.running[i];
            let num_new = seq.remaining().min(*budget);
            let need = (seq.computed + num_new)
                .div_ceil(self.block_size)
                .saturating_sub(seq.table.len());
            while need > self.blocks.available() && self.running.len() > i + 1 {
                self.preempt_last();
                preempted = true;
            }
            if need > self.blocks.available() {
                // Nothing newer is left to preempt: this one waits.
                self.preempt_last();
                return true;
            }
            let seq = &mut self.running[i];
            if self.blocks.allocate(need, &mut seq.table).is_err() {
                return true;
            }
            self.plan.push(num_new);
            *budget -= num_new;
            i += 1;
        }
        preempted
    }

    fn preempt_last(&mut self) {
        if let Some(mut seq) = self.running.pop() {
            seq.release_blocks(&mut self.blocks);
            // Its blocks are gone: a backend drops what it keeps for it, and the
            // sequence starts over from its cached prefix when it runs again.
            self.released.push(seq.id);
            self.preemptions += 1;
            tracing::debug!(seq = seq.id, "preempted: out of KV blocks");
            self.waiting.push_front(seq);
        }
    }

    /// Admits waiting sequences in order while the budget, the batch size and the pool
    /// allow; stops at the first one that does not fit.
    fn admit_waiting(&mut self, budget: &mut usize) {
        // `plan[i]` belongs to `running[i]`: admission may only append once every running
        // sequence is planned, which holds whenever budget is left after `schedule_running`.
        debug_assert!(*budget == 0 || self.plan.len() == self.running.len());
        while *budget > 0 && self.running.len() < self.max_num_seqs {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            let len = seq.tokens.len();
            if self.caching {
                seq.hash_blocks(len, self.block_size, self.hash_seed);
            }
            let hit = self.blocks.peek_prefix(&seq.hashes);
            // At least one token is computed, so that the step produces a token.
            let computed = (hit.blocks * self.block_size).min(len - 1);
            let num_new = (len - computed).min(*budget);
            let need = (computed + num_new)
                .div_ceil(self.block_size)
                .saturating_sub(hit.blocks);
            if need > self.blocks.available() - hit.inactive {
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            let taken = self
                .blocks
                .acquire_prefix(&seq.hashes[..hit.blocks], &mut seq.table);
            if self.blocks.allocate(need, &mut seq.table).is_err() {
                // Cannot happen after the check above; put it back untouched.
                seq.release_blocks(&mut self.blocks);
                self.waiting.push_front(seq);
                break;
            }
            seq.computed = computed;
            seq.promoted = taken;
            if !seq.admitted_once {
                seq.admitted_once = true;
                seq.cached_tokens = Some(computed as u32);
                self.prefix_hit_tokens += computed as u64;
                self.prompt_tokens += seq.prompt_len as u64;
            }
            self.running.push(seq);
            self.plan.push(num_new);
            *budget -= num_new;
        }
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
