//! llama.cpp as the engine shell's [`StepBackend`]: the scheduler, block manager, prefix
//! cache, KV events and hand-off stay ours; llama.cpp computes the batches.
//!
//! llama.cpp keeps its KV per sequence (a *slot*: one `seq_id` of a unified cache), not
//! in our pool's blocks. The two meet through llama.cpp's per-sequence state
//! (`state_seq_get/set`, see [`crate::state`]):
//! - a block written by a slot's sequence is *owned* by that slot until it is copied into
//!   the pool, which happens when the sequence ends (if prefix caching can reuse it), when
//!   another sequence's prefix hit needs it, or when it is exported;
//! - a sequence that starts from cached blocks (a prefix hit, or blocks a prefill worker
//!   handed over) gets them loaded into its slot from the pool with one `state_seq_set`;
//! - whatever a slot lacks and the pool cannot give (a slot taken from an idle sequence)
//!   is recomputed from the sequence's tokens, so a step is always correct.

use std::collections::HashMap;

use dynamo_mocker::{BackendError, BlockId, SeqId, StepBackend, StepSeq};
use dynamo_native::sampling::{logprobs, Sampler};
use dynamo_protocol::TokenLogprob;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use dynamo_runtime::kv_transfer::{ShmExport, ShmSegment};

use crate::model::Loaded;
use crate::state::{build, SeqState, StateFormat};

/// Who holds a pool block's KV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// Nothing valid (never written, or its slot moved on).
    Empty,
    /// The pool's bytes.
    Pool,
    /// Slot `slot`'s sequence wrote it as its block `index`; the pool's bytes are stale.
    Slot { slot: usize, index: usize },
}

/// A llama.cpp sequence id serving one of our sequences.
#[derive(Debug)]
struct Slot {
    seq: SeqId,
    /// Positions `0..pos` are in llama.cpp's cache for this slot.
    pos: usize,
    /// The pool blocks of positions `0..pos`, in order.
    table: Vec<BlockId>,
}

pub struct LlamaStep {
    loaded: Loaded,
    format: StateFormat,
    block_size: usize,
    block_bytes: usize,
    /// Copy finished sequences' blocks into the pool (prefix caching can reuse them).
    keep_blocks: bool,
    /// The pool, in shared memory so decode workers on this machine copy blocks straight
    /// out of it.
    pool: ShmSegment,
    export: Option<ShmExport>,
    owners: Vec<Owner>,
    slots: Vec<Option<Slot>>,
    by_seq: HashMap<SeqId, usize>,
    batch: LlamaBatch<'static>,
    n_batch: usize,
    sampler: Sampler,
    logprobs: Vec<Option<TokenLogprob>>,
}

fn err(e: impl std::fmt::Display) -> BackendError {
    BackendError(e.to_string())
}

/// One sequence's part of a llama.cpp batch.
struct Planned {
    slot: usize,
    /// First position computed (recomputed ones included).
    from: usize,
    /// One past the last position computed.
    to: usize,
    sample: bool,
}

impl LlamaStep {
    pub(crate) fn new(
        loaded: Loaded,
        format: StateFormat,
        block_size: usize,
        num_blocks: usize,
        slots: usize,
        n_batch: usize,
        keep_blocks: bool,
    ) -> Result<LlamaStep, crate::LlamaCppError> {
        let block_bytes = format.block_bytes(block_size);
        // Pages cost memory only once a block is written.
        let pool = ShmSegment::create("dynamo-kv-pool", block_bytes * num_blocks)
            .map_err(|e| crate::LlamaCppError::Pool(e.to_string()))?;
        let export = pool
            .export()
            .map_err(|e| tracing::warn!(error = %e, "llamacpp engine: KV pool not shared"))
            .ok();
        Ok(LlamaStep {
            loaded,
            format,
            block_size,
            block_bytes,
            keep_blocks,
            pool,
            export,
            owners: vec![Owner::Empty; num_blocks],
            slots: (0..slots).map(|_| None).collect(),
            by_seq: HashMap::new(),
            batch: LlamaBatch::new(n_batch, 1),
            n_batch,
            sampler: Sampler::default(),
            logprobs: Vec::new(),
        })
    }

    fn block(&self, id: BlockId) -> &[u8] {
        &self.pool.as_slice()[id as usize * self.block_bytes..][..self.block_bytes]
    }

    /// Whether block `b`'s KV is where its owner says: in the pool, or in the slot that
    /// wrote it (the slot still holds that block at that index, with all its positions).
    fn owner_valid(&self, b: BlockId) -> bool {
        match self.owners[b as usize] {
            Owner::Pool => true,
            Owner::Empty => false,
            Owner::Slot { slot, index } => self.slots[slot].as_ref().is_some_and(|sl| {
                sl.table.get(index) == Some(&b) && sl.pos >= (index + 1) * self.block_size
            }),
        }
    }

    /// Copies slot `s`'s full blocks that only llama.cpp holds into the pool.
    fn materialize(&mut self, s: usize) -> Result<(), BackendError> {
        let Some(slot) = &self.slots[s] else {
            return Ok(());
        };
        let full = slot.pos / self.block_size;
        let pending: Vec<(usize, BlockId)> = (slot.table.iter().copied().enumerate())
            .take(full)
            .filter(|&(i, b)| self.owners[b as usize] == Owner::Slot { slot: s, index: i })
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let bytes = self.loaded.state(s)?;
        let state = SeqState::parse(&bytes).map_err(err)?;
        let bs = self.block_size;
        for (i, b) in pending {
            let at = b as usize * self.block_bytes;
            let dst = &mut self.pool.as_mut_slice()[at..at + self.block_bytes];
            state.copy_block(i * bs, bs, dst).map_err(err)?;
            self.owners[b as usize] = Owner::Pool;
        }
        Ok(())
    }

    /// Frees slot `s`: its full blocks go to the pool first when they may be reused.
    fn free_slot(&mut self, s: usize, keep: bool) {
        if keep {
            if let Err(e) = self.materialize(s) {
                tracing::warn!(error = %e.0, "llamacpp: a finished sequence's KV could not be kept");
            }
        }
        self.set_slot(s, 0, &[]);
        if let Some(slot) = self.slots[s].take() {
            self.by_seq.remove(&slot.seq);
        }
        self.loaded.clear(s);
    }

    /// The slot of `seq`, taking a free one.
    fn slot_for(&mut self, seq: SeqId) -> Result<usize, BackendError> {
        if let Some(&s) = self.by_seq.get(&seq) {
            return Ok(s);
        }
        let s = self.slots.iter().position(Option::is_none).ok_or_else(|| {
            err(format!(
                "more sequences in one step than the {} llama.cpp sequences of the context",
                self.slots.len()
            ))
        })?;
        self.slots[s] = Some(Slot {
            seq,
            pos: 0,
            table: Vec::new(),
        });
        self.by_seq.insert(seq, s);
        Ok(s)
    }

    /// The longest run of leading blocks of `table` (at most `max`) another slot holds
    /// as the same blocks in llama.cpp: `(slot, blocks)`.
    fn shared_prefix(&self, s: usize, table: &[BlockId], max: usize) -> Option<(usize, usize)> {
        let bs = self.block_size;
        (self.slots.iter().enumerate())
            .filter(|&(t, _)| t != s)
            .filter_map(|(t, slot)| {
                let slot = slot.as_ref()?;
                let held = (slot.pos / bs).min(slot.table.len()).min(max);
                let n = (0..held).take_while(|&i| slot.table[i] == table[i]).count();
                (n > 0).then_some((t, n))
            })
            .max_by_key(|&(_, n)| n)
    }

    /// Brings slot `s` to hold exactly positions `0..have` of `seq` for some `have <=
    /// seq.start`, from what another slot shares or the pool holds; returns `have` (the
    /// positions from `have` to `seq.start` are recomputed).
    fn prepare(&mut self, s: usize, seq: &StepSeq<'_>) -> Result<usize, BackendError> {
        let bs = self.block_size;
        let pos = self.slots[s].as_ref().map_or(0, |slot| slot.pos);
        if pos == seq.start {
            return Ok(pos);
        }
        if pos > seq.start {
            // Preempted and resumed from fewer cached positions: drop the rest.
            self.loaded.truncate(s, seq.start);
            self.set_slot(s, seq.start, &seq.table[..seq.start.div_ceil(bs)]);
            return Ok(seq.start);
        }
        let cached = (seq.start / bs).min(seq.table.len());
        // A live slot holding the same leading blocks shares its cells: no copy at all.
        if let Some((t, n)) = self.shared_prefix(s, seq.table, cached) {
            if n * bs > pos {
                self.set_slot(s, 0, &[]);
                self.loaded.clear(s);
                self.loaded.share(t, s, n * bs)?;
                self.set_slot(s, n * bs, &seq.table[..n]);
                return Ok(n * bs);
            }
        }
        // Otherwise whole blocks from the pool; blocks only a slot holds are copied there.
        let mut usable = 0;
        for (i, &b) in seq.table.iter().enumerate().take(cached) {
            if let Owner::Slot { slot, index } = self.owners[b as usize] {
                if index == i && self.owner_valid(b) {
                    self.materialize(slot)?;
                }
            }
            if self.owners[b as usize] != Owner::Pool {
                break;
            }
            usable = i + 1;
        }
        let have = usable * bs;
        if have <= pos {
            // Nothing better than what the slot holds.
            return Ok(pos);
        }
        let blocks: Vec<&[u8]> = seq.table[..usable].iter().map(|&b| self.block(b)).collect();
        let state = build(&self.format, bs, have, &blocks).map_err(err)?;
        if let Err(e) = self.loaded.set_state(s, &state) {
            // llama.cpp emptied the sequence.
            self.set_slot(s, 0, &[]);
            return Err(e);
        }
        self.set_slot(s, have, &seq.table[..usable]);
        Ok(have)
    }

    /// Slot `s` now holds positions `0..pos` in the blocks `table`. Blocks it no longer
    /// holds at an index stop being owned by it.
    fn set_slot(&mut self, s: usize, pos: usize, table: &[BlockId]) {
        let Some(slot) = self.slots[s].as_mut() else {
            return;
        };
        for (i, &b) in slot.table.iter().enumerate() {
            let kept = table.get(i) == Some(&b) && pos > i * self.block_size;
            if !kept && self.owners[b as usize] == (Owner::Slot { slot: s, index: i }) {
                self.owners[b as usize] = Owner::Empty;
            }
        }
        slot.pos = pos;
        slot.table.clear();
        slot.table.extend_from_slice(table);
    }

    /// Records that slot `s` computed positions `from..to` of `seq` into its blocks.
    /// Blocks that were cached before this step keep their valid owner: their KV is the
    /// same, and a peer may be reading the pool's copy.
    fn wrote(&mut self, s: usize, seq: &StepSeq<'_>, from: usize, to: usize) {
        let bs = self.block_size;
        let end = to.div_ceil(bs).min(seq.table.len());
        self.set_slot(s, to, &seq.table[..end]);
        for i in from / bs..end {
            let b = seq.table[i];
            let mine = Owner::Slot { slot: s, index: i };
            if i * bs < seq.start && self.owners[b as usize] != mine && self.owner_valid(b) {
                continue;
            }
            self.owners[b as usize] = mine;
        }
    }

    /// Drops what llama.cpp holds for the sequences of a failed batch.
    fn reset(&mut self, plan: &[Planned]) {
        for p in plan {
            self.free_slot(p.slot, false);
        }
    }

    /// Runs `plan` through llama.cpp in batches of at most `n_batch` tokens and samples.
    fn compute(
        &mut self,
        batch: &[StepSeq<'_>],
        plan: &[Planned],
    ) -> Result<Vec<u32>, BackendError> {
        let want_logprobs = batch
            .iter()
            .any(|s| s.sample && s.sampling.logprobs.is_some());
        // Token positions, in order: (plan index, position).
        let work: Vec<(usize, usize)> = plan
            .iter()
            .enumerate()
            .flat_map(|(i, p)| (p.from..p.to).map(move |pos| (i, pos)))
            .collect();
        let mut sampled: Vec<Option<u32>> = vec![None; plan.len()];
        let mut lps: Vec<Option<TokenLogprob>> = vec![None; plan.len()];
        for chunk in work.chunks(self.n_batch) {
            self.batch.clear();
            let mut outputs = Vec::new();
            for (k, &(i, pos)) in chunk.iter().enumerate() {
                let p = &plan[i];
                let last = p.sample && pos + 1 == p.to;
                let token = LlamaToken::new(batch[i].tokens[pos] as i32);
                self.batch
                    .add(token, pos as i32, &[p.slot as i32], last)
                    .map_err(err)?;
                if last {
                    outputs.push((i, k));
                }
            }
            self.loaded.decode(&mut self.batch)?;
            for (i, k) in outputs {
                let s = &batch[i];
                let row = self.loaded.logits(k as i32);
                let generated = &s.tokens[s.prompt_len.min(s.tokens.len())..];
                let token =
                    self.sampler
                        .sample(row, s.sampling, generated, s.seed, s.start + s.len);
                if want_logprobs {
                    lps[i] = s.sampling.logprobs.map(|top| logprobs(row, token, top));
                }
                sampled[i] = Some(token);
            }
        }
        let mut tokens = Vec::new();
        self.logprobs.clear();
        for (i, p) in plan.iter().enumerate() {
            if p.sample {
                let token =
                    sampled[i].ok_or_else(|| err("llama.cpp returned no logits for a sequence"))?;
                tokens.push(token);
                if want_logprobs {
                    self.logprobs.push(lps[i].take());
                }
            }
        }
        Ok(tokens)
    }
}

impl StepBackend for LlamaStep {
    fn forward(&mut self, batch: &[StepSeq<'_>]) -> Result<Vec<u32>, BackendError> {
        let mut plan = Vec::with_capacity(batch.len());
        for seq in batch {
            let s = self.slot_for(seq.id)?;
            let have = match self.prepare(s, seq) {
                Ok(have) => have,
                Err(e) => {
                    self.reset(&plan);
                    self.free_slot(s, false);
                    return Err(e);
                }
            };
            plan.push(Planned {
                slot: s,
                from: have,
                to: seq.start + seq.len,
                sample: seq.sample,
            });
        }
        match self.compute(batch, &plan) {
            Ok(tokens) => {
                for (seq, p) in batch.iter().zip(&plan) {
                    if p.to > p.from {
                        self.wrote(p.slot, seq, p.from, p.to);
                    }
                }
                Ok(tokens)
            }
            Err(e) => {
                self.reset(&plan);
                Err(e)
            }
        }
    }

    fn take_logprobs(&mut self) -> Vec<Option<TokenLogprob>> {
        std::mem::take(&mut self.logprobs)
    }

    fn release(&mut self, id: SeqId) {
        if let Some(&s) = self.by_seq.get(&id) {
            self.free_slot(s, self.keep_blocks);
        }
    }

    fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    fn export_blocks(&self, blocks: &[BlockId], out: &mut Vec<u8>) -> Result<(), BackendError> {
        let bs = self.block_size;
        // States of the slots that still own some of the blocks, read once each.
        let mut states: HashMap<usize, Vec<u8>> = HashMap::new();
        for &b in blocks {
            if !self.owner_valid(b) {
                return Err(err(format!("block {b} holds no KV to export")));
            }
            match self.owners[b as usize] {
                Owner::Slot { slot, index } => {
                    let bytes = match states.entry(slot) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(self.loaded.state(slot)?)
                        }
                    };
                    let start = out.len();
                    out.resize(start + self.block_bytes, 0);
                    SeqState::parse(bytes)
                        .and_then(|st| st.copy_block(index * bs, bs, &mut out[start..]))
                        .map_err(err)?;
                }
                _ => out.extend_from_slice(self.block(b)),
            }
        }
        Ok(())
    }

    fn sync_blocks(&mut self, blocks: &[BlockId]) -> Result<(), BackendError> {
        let mut slots: Vec<usize> = blocks
            .iter()
            .filter_map(|&b| match self.owners[b as usize] {
                Owner::Slot { slot, .. } => Some(slot),
                _ => None,
            })
            .collect();
        slots.sort_unstable();
        slots.dedup();
        for s in slots {
            self.materialize(s)?;
        }
        match blocks
            .iter()
            .find(|&&b| self.owners[b as usize] != Owner::Pool)
        {
            Some(b) => Err(err(format!("block {b} holds no KV to share"))),
            None => Ok(()),
        }
    }

    fn shared_pool(&self) -> Option<String> {
        self.export.as_ref().map(|e| e.name().to_string())
    }

    fn import_blocks(&mut self, blocks: &[BlockId], src: &[&[u8]]) -> Result<(), BackendError> {
        if blocks.len() != src.len() || src.iter().any(|s| s.len() != self.block_bytes) {
            return Err(err(format!(
                "{} slices do not fill {} blocks of {} bytes",
                src.len(),
                blocks.len(),
                self.block_bytes
            )));
        }
        for (&b, bytes) in blocks.iter().zip(src) {
            let at = b as usize * self.block_bytes;
            self.pool.as_mut_slice()[at..at + self.block_bytes].copy_from_slice(bytes);
            self.owners[b as usize] = Owner::Pool;
        }
        Ok(())
    }
}
