//! One forward pass over a ragged batch: the new tokens of every scheduled sequence are
//! flattened into one matrix, so each weight matrix is read once per step whatever the
//! batch; attention runs per sequence through its block table.

use dynamo_mocker::BlockId;

use super::config::ModelConfig;
use super::rope::Rope;
use super::weights::{LayerWeights, Weights};
use super::{attention, vmath};
use crate::kv_pool::KvPool;
use crate::quant::{ComputePool, QMatrix, Workspace};

/// One sequence's part of a forward pass.
#[derive(Debug, Clone, Copy)]
pub struct BatchSeq<'a> {
    /// The tokens at positions `start..start + tokens.len()`.
    pub tokens: &'a [u32],
    pub start: usize,
    /// Blocks holding positions `0..start + tokens.len()`.
    pub table: &'a [BlockId],
    /// Whether the logits of the last token are wanted.
    pub logits: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error("position {pos} is beyond the model's context of {context}")]
    TooLong { pos: usize, context: usize },
    #[error("a block table of {blocks} blocks cannot hold position {pos}")]
    ShortTable { blocks: usize, pos: usize },
}

/// Activations of one step, kept between steps so a step allocates nothing once warm.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    scores: Vec<f32>,
    last: Vec<f32>,
}

fn fit(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

pub struct Model {
    pub config: ModelConfig,
    weights: Weights,
    rope: Rope,
    pool: ComputePool,
    ws: Workspace,
    s: Scratch,
}

fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    // Summed in f64 like llama.cpp, so the scale matches it to the last bit more often.
    let sum: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
    let mean = (sum / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

fn matmul(
    w: &QMatrix,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    ws: &mut Workspace,
    pool: &ComputePool,
) {
    w.matmul(&x[..n * w.cols()], n, &mut out[..n * w.rows()], ws, pool);
}

fn add_bias(rows: &mut [f32], bias: Option<&Vec<f32>>) {
    if let Some(b) = bias {
        for row in rows.chunks_exact_mut(b.len()) {
            for (x, &y) in row.iter_mut().zip(b) {
                *x += y;
            }
        }
    }
}

impl Model {
    pub fn new(config: ModelConfig, weights: Weights, threads: usize) -> Model {
        let rope = Rope::new(config.rope_style, config.rope_dims, config.rope_base);
        Model {
            config,
            weights,
            rope,
            pool: ComputePool::new(threads.max(1)),
            ws: Workspace::default(),
            s: Scratch::default(),
        }
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Computes `batch`, writing every new position's keys and values into `kv`, and
    /// returns the logits (`vocab` each) of the sequences that asked, in batch order.
    pub fn forward<'o>(
        &mut self,
        kv: &mut KvPool,
        batch: &[BatchSeq<'_>],
        logits: &'o mut Vec<f32>,
    ) -> Result<&'o [f32], ForwardError> {
        let c = &self.config;
        let (dim, vocab) = (c.dim, c.vocab);
        let total: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let mut max_pos = 0;
        for seq in batch {
            let end = seq.start + seq.tokens.len();
            if end > c.context_length {
                return Err(ForwardError::TooLong {
                    pos: end - 1,
                    context: c.context_length,
                });
            }
            if seq.table.len() * kv.block_size() < end {
                return Err(ForwardError::ShortTable {
                    blocks: seq.table.len(),
                    pos: end - 1,
                });
            }
            if let Some(&id) = seq.tokens.iter().find(|&&id| id as usize >= vocab) {
                return Err(ForwardError::BadToken { id, vocab });
            }
            max_pos = max_pos.max(end);
        }
        if total == 0 {
            logits.clear();
            return Ok(&logits[..]);
        }
        self.rope.ensure(max_pos);

        let x = fit(&mut self.s.x, total * dim);
        let mut t = 0;
        for seq in batch {
            for &id in seq.tokens {
                self.weights
                    .embed
                    .dequantize_row(id as usize, &mut x[t * dim..(t + 1) * dim]);
                t += 1;
            }
        }
        for (li, layer) in self.weights.layers.iter().enumerate() {
            layer_forward(
                &self.config,
                li,
                layer,
                &self.rope,
                kv,
                batch,
                total,
                &mut self.s,
                &mut self.ws,
                &self.pool,
            );
        }

        // The last token of each sequence that wants logits.
        let wanted: Vec<usize> = {
            let mut rows = Vec::new();
            let mut end = 0;
            for seq in batch {
                end += seq.tokens.len();
                if seq.logits {
                    rows.push(end - 1);
                }
            }
            rows
        };
        let last = fit(&mut self.s.last, wanted.len() * dim);
        for (i, &row) in wanted.iter().enumerate() {
            rms_norm(
                &self.s.x[row * dim..(row + 1) * dim],
                &self.weights.output_norm,
                self.config.rms_eps,
                &mut last[i * dim..(i + 1) * dim],
            );
        }
        let out = fit(logits, wanted.len() * vocab);
        if !wanted.is_empty() {
            matmul(
                self.weights.output(),
                &self.s.last,
                wanted.len(),
                out,
                &mut self.ws,
                &self.pool,
            );
        }
        Ok(&logits[..wanted.len() * vocab])
    }
}

#[allow(clippy::too_many_arguments)]
fn layer_forward(
    c: &ModelConfig,
    li: usize,
    w: &LayerWeights,
    rope: &Rope,
    kv: &mut KvPool,
    batch: &[BatchSeq<'_>],
    total: usize,
    s: &mut Scratch,
    ws: &mut Workspace,
    pool: &ComputePool,
) {
    let (dim, hd, qdim, kvdim, ffn) = (c.dim, c.head_dim, c.heads * c.head_dim, c.kv_dim(), c.ffn);
    let h = fit(&mut s.h, total * dim);
    for (xr, hr) in s.x[..total * dim]
        .chunks_exact(dim)
        .zip(h.chunks_exact_mut(dim))
    {
        rms_norm(xr, &w.attn_norm, c.rms_eps, hr);
    }
    let q = fit(&mut s.q, total * qdim);
    matmul(&w.q, &s.h, total, q, ws, pool);
    add_bias(q, w.q_bias.as_ref());
    let k = fit(&mut s.k, total * kvdim);
    matmul(&w.k, &s.h, total, k, ws, pool);
    add_bias(k, w.k_bias.as_ref());
    let v = fit(&mut s.v, total * kvdim);
    matmul(&w.v, &s.h, total, v, ws, pool);
    add_bias(v, w.v_bias.as_ref());

    // Rotate and store every new position first: a token attends to the chunk's earlier ones.
    let mut t = 0;
    for seq in batch {
        for j in 0..seq.tokens.len() {
            let pos = seq.start + j;
            rope.apply(&mut s.q[t * qdim..(t + 1) * qdim], hd, pos);
            rope.apply(&mut s.k[t * kvdim..(t + 1) * kvdim], hd, pos);
            kv.write(
                seq.table,
                pos,
                li,
                &s.k[t * kvdim..(t + 1) * kvdim],
                &s.v[t * kvdim..(t + 1) * kvdim],
            );
            t += 1;
        }
    }

    let att = fit(&mut s.att, total * qdim);
    let group = c.heads / c.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let bs = kv.block_size();
    let mut t = 0;
    for seq in batch {
        for j in 0..seq.tokens.len() {
            let ctx = seq.start + j + 1;
            let blocks = ctx.div_ceil(bs);
            // One row of `ctx` scores per query head of the group.
            let scores = fit(&mut s.scores, group * ctx);
            for g in 0..c.kv_heads {
                let q0 = t * qdim + g * group * hd;
                let qg = &s.q[q0..q0 + group * hd];
                for (bi, &block) in seq.table[..blocks].iter().enumerate() {
                    let n = (ctx - bi * bs).min(bs);
                    let keys = kv.rows(block, li, false);
                    attention::scores_group(
                        qg,
                        group,
                        keys,
                        kvdim,
                        g * hd,
                        n,
                        scale,
                        &mut scores[bi * bs..],
                        ctx,
                    );
                }
                for h in 0..group {
                    let row = &mut scores[h * ctx..(h + 1) * ctx];
                    let sum = vmath::exp_shifted_sum(row, vmath::max(row));
                    let head = g * group + h;
                    let out = &mut att[t * qdim + head * hd..t * qdim + (head + 1) * hd];
                    out.fill(0.0);
                    for (bi, &block) in seq.table[..blocks].iter().enumerate() {
                        let n = (ctx - bi * bs).min(bs);
                        let values = kv.rows(block, li, true);
                        attention::accumulate(out, &row[bi * bs..], values, kvdim, g * hd, n);
                    }
                    let inv = 1.0 / sum;
                    for o in out.iter_mut() {
                        *o *= inv;
                    }
                }
            }
            t += 1;
        }
    }

    let proj = fit(&mut s.proj, total * dim);
    matmul(&w.o, &s.att, total, proj, ws, pool);
    for (x, p) in s.x[..total * dim].iter_mut().zip(proj.iter()) {
        *x += p;
    }

    let h = fit(&mut s.h, total * dim);
    for (xr, hr) in s.x[..total * dim]
        .chunks_exact(dim)
        .zip(h.chunks_exact_mut(dim))
    {
        rms_norm(xr, &w.ffn_norm, c.rms_eps, hr);
    }
    let gate = fit(&mut s.gate, total * ffn);
    matmul(&w.gate, &s.h, total, gate, ws, pool);
    let up = fit(&mut s.up, total * ffn);
    matmul(&w.up, &s.h, total, up, ws, pool);
    vmath::silu_mul(gate, up);
    let proj = fit(&mut s.proj, total * dim);
    matmul(&w.down, &s.gate, total, proj, ws, pool);
    for (x, p) in s.x[..total * dim].iter_mut().zip(proj.iter()) {
        *x += p;
    }
}
