//! The engine's figures, measured the way llama.cpp's `llama-bench` and
//! `llama-batched-bench` measure theirs, so the two can be put side by side:
//! prefill of a 512-token prompt in one pass (pp512), single-stream decode of 64 tokens
//! from an empty context (tg64), and aggregate decode of B streams, each with a 32-token
//! prompt, generating 32 tokens together (batched-bench's S_TG).

use std::time::Instant;

use crate::kv_pool::KvPool;
use crate::model::{BatchSeq, ForwardError, Model};
use crate::sampling::argmax;

/// Arbitrary but fixed token ids below every vocabulary this engine loads.
fn tokens(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 100 + (i.wrapping_mul(7919).wrapping_add(salt * 104_729)) % 20_000)
        .collect()
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("reserving a KV pool: {0}")]
    Pool(#[from] std::io::Error),
}

fn fresh_pool(
    m: &Model,
    seqs: usize,
    tokens_each: usize,
) -> Result<(KvPool, Vec<Vec<u32>>), BenchError> {
    let per = tokens_each.div_ceil(16);
    let c = &m.config;
    let pool = KvPool::new(c.layers, c.kv_dim(), 16, per * seqs)?;
    let tables = (0..seqs)
        .map(|s| ((s * per) as u32..((s + 1) * per) as u32).collect())
        .collect();
    Ok((pool, tables))
}

/// Tokens per second of prefilling `n` prompt tokens in one forward pass (median of `reps`).
pub fn prefill(m: &mut Model, n: usize, reps: usize) -> Result<f64, BenchError> {
    let prompt = tokens(n, 1);
    let mut logits = Vec::new();
    let mut times = Vec::new();
    for _ in 0..reps.max(1) {
        let (mut kv, tables) = fresh_pool(m, 1, n + 1)?;
        let started = Instant::now();
        let seq = BatchSeq {
            tokens: &prompt,
            start: 0,
            table: &tables[0],
            logits: true,
        };
        m.forward(&mut kv, &[seq], &mut logits)?;
        times.push(started.elapsed().as_secs_f64());
    }
    Ok(n as f64 / median(&mut times))
}

/// Aggregate tokens per second of `batch` streams decoding `steps` tokens together after
/// a `prompt`-token prompt each (the prompts' prefill is not timed). Median of `reps`.
pub fn decode(
    m: &mut Model,
    batch: usize,
    prompt: usize,
    steps: usize,
    reps: usize,
) -> Result<f64, BenchError> {
    let mut times = Vec::new();
    let mut logits = Vec::new();
    for _ in 0..reps.max(1) {
        let (mut kv, tables) = fresh_pool(m, batch, prompt + steps + 1)?;
        let mut seqs: Vec<Vec<u32>> = (0..batch)
            .map(|s| tokens(prompt.max(1), s as u32))
            .collect();
        let mut starts = vec![0usize; batch];
        let mut first = true;
        let mut started = Instant::now();
        for _ in 0..=steps {
            let batch_seqs: Vec<BatchSeq<'_>> = seqs
                .iter()
                .zip(&tables)
                .zip(&starts)
                .map(|((s, t), &start)| BatchSeq {
                    tokens: &s[start..],
                    start,
                    table: t,
                    logits: true,
                })
                .collect();
            let rows = m.forward(&mut kv, &batch_seqs, &mut logits)?;
            let next: Vec<u32> = rows.chunks_exact(m.config.vocab).map(argmax).collect();
            for ((s, start), t) in seqs.iter_mut().zip(starts.iter_mut()).zip(next) {
                *start = s.len();
                s.push(t);
            }
            if first {
                // The prompts are in; the decode steps are what is timed.
                first = false;
                started = Instant::now();
            }
        }
        times.push(started.elapsed().as_secs_f64());
    }
    Ok((batch * steps) as f64 / median(&mut times))
}

/// Milliseconds to export the KV blocks of a `tokens`-token sequence from one pool and
/// import them into another (median of `reps`), and the bytes moved.
pub fn kv_handoff(m: &Model, tokens: usize, reps: usize) -> Result<(f64, usize), BenchError> {
    let (from, tables) = fresh_pool(m, 1, tokens)?;
    let (mut to, _) = fresh_pool(m, 1, tokens)?;
    let blocks = &tables[0];
    let mut bytes = Vec::new();
    let mut times = Vec::new();
    for _ in 0..reps.max(1) {
        bytes.clear();
        let started = Instant::now();
        from.export(blocks, &mut bytes);
        let src: Vec<&[u8]> = bytes.chunks(from.block_bytes()).collect();
        let ok = to.import(blocks, &src);
        times.push(started.elapsed().as_secs_f64());
        debug_assert!(ok);
    }
    Ok((median(&mut times) * 1e3, bytes.len()))
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
