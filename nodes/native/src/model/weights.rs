//! The model's tensors, read from a memory-mapped GGUF file into kernel-ready matrices.

use std::path::Path;

use dynamo_preprocessor::gguf::{GgmlType, GgufFile, TensorInfo};
use memmap2::Mmap;

use super::config::ModelConfig;
use crate::error::LoadError;
use crate::quant::QMatrix;

/// One transformer block.
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub q: QMatrix,
    pub k: QMatrix,
    pub v: QMatrix,
    /// Qwen2-style projection biases.
    pub q_bias: Option<Vec<f32>>,
    pub k_bias: Option<Vec<f32>>,
    pub v_bias: Option<Vec<f32>>,
    pub o: QMatrix,
    pub ffn_norm: Vec<f32>,
    pub gate: QMatrix,
    pub up: QMatrix,
    pub down: QMatrix,
}

pub struct Weights {
    pub embed: QMatrix,
    pub layers: Vec<LayerWeights>,
    pub output_norm: Vec<f32>,
    /// `None` when the output head is the embedding table (tied).
    pub output: Option<QMatrix>,
}

impl Weights {
    pub fn output(&self) -> &QMatrix {
        self.output.as_ref().unwrap_or(&self.embed)
    }

    /// Bytes the loaded weights take in memory.
    pub fn memory_bytes(&self) -> usize {
        let norms = |l: &LayerWeights| (l.attn_norm.len() + l.ffn_norm.len()) * 4;
        self.embed.memory_bytes()
            + self.output.as_ref().map_or(0, QMatrix::memory_bytes)
            + self.output_norm.len() * 4
            + self
                .layers
                .iter()
                .map(|l| {
                    norms(l)
                        + [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                            .iter()
                            .map(|m| m.memory_bytes())
                            .sum::<usize>()
                })
                .sum::<usize>()
    }
}

/// Bytes of `elems` elements of `ty`, if the format is known.
fn tensor_bytes(ty: GgmlType, elems: usize) -> Option<usize> {
    let (block, bytes) = match ty {
        GgmlType::F32 => (1, 4),
        GgmlType::F16 | GgmlType::BF16 => (1, 2),
        GgmlType::Q4_0 => (32, 18),
        GgmlType::Q4_1 => (32, 20),
        GgmlType::Q5_0 => (32, 22),
        GgmlType::Q5_1 => (32, 24),
        GgmlType::Q8_0 => (32, 34),
        GgmlType::Q8_1 => (32, 36),
        GgmlType::Q2K => (256, 84),
        GgmlType::Q3K => (256, 110),
        GgmlType::Q4K => (256, 144),
        GgmlType::Q5K => (256, 176),
        GgmlType::Q6K => (256, 210),
        GgmlType::Q8K => (256, 292),
        GgmlType::Other(_) => return None,
    };
    (elems % block == 0).then_some(elems / block * bytes)
}

struct Reader<'a> {
    gguf: &'a GgufFile,
    map: &'a Mmap,
}

impl Reader<'_> {
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.gguf.tensors.iter().find(|t| t.name == name)
    }

    fn bytes(&self, t: &TensorInfo) -> Result<&[u8], LoadError> {
        let bad = |message: String| LoadError::Tensor {
            name: t.name.clone(),
            message,
        };
        let elems = t
            .dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
            .ok_or_else(|| bad("dimensions overflow".into()))?;
        let len = tensor_bytes(t.ggml_type, elems)
            .ok_or_else(|| bad(format!("element type {:?} is not supported", t.ggml_type)))?;
        let start = usize::try_from(self.gguf.data_offset.saturating_add(t.offset))
            .map_err(|_| bad("offset overflows".into()))?;
        self.map
            .get(start..start.saturating_add(len))
            .ok_or_else(|| bad("data runs past the end of the file".into()))
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix, LoadError> {
        let t = self
            .info(name)
            .ok_or_else(|| LoadError::MissingTensor(name.to_string()))?;
        let dims: Vec<u64> = t.dims.clone();
        if dims != [cols as u64, rows as u64] {
            return Err(LoadError::Tensor {
                name: name.to_string(),
                message: format!("shape {dims:?}, expected [{cols}, {rows}]"),
            });
        }
        QMatrix::from_ggml(t.ggml_type, rows, cols, self.bytes(t)?).map_err(|source| {
            LoadError::Quant {
                name: name.to_string(),
                source,
            }
        })
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, LoadError> {
        let t = self
            .info(name)
            .ok_or_else(|| LoadError::MissingTensor(name.to_string()))?;
        self.vector_of(t, len)
    }

    fn opt_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>, LoadError> {
        self.info(name).map(|t| self.vector_of(t, len)).transpose()
    }

    fn vector_of(&self, t: &TensorInfo, len: usize) -> Result<Vec<f32>, LoadError> {
        let bad = |message: String| LoadError::Tensor {
            name: t.name.clone(),
            message,
        };
        if t.dims != [len as u64] {
            return Err(bad(format!("shape {:?}, expected [{len}]", t.dims)));
        }
        let bytes = self.bytes(t)?;
        match t.ggml_type {
            GgmlType::F32 => Ok(bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()),
            GgmlType::F16 => Ok(bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()),
            other => Err(bad(format!("a norm or bias of type {other:?}"))),
        }
    }
}

/// Opens `path`, reads its header and every tensor the model needs.
pub fn load(path: &Path) -> Result<(ModelConfig, Weights), LoadError> {
    let io = |source| LoadError::Io {
        path: path.display().to_string(),
        source,
    };
    let gguf = GgufFile::open(path).map_err(LoadError::gguf)?;
    let config = ModelConfig::from_gguf(&gguf)?;
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the file is only read, and every tensor is copied out before the map is
    // dropped at the end of this function; a concurrent truncation would surface as
    // SIGBUS, the same as for any reader of a model file.
    let map = unsafe { Mmap::map(&file) }.map_err(io)?;
    let r = Reader {
        gguf: &gguf,
        map: &map,
    };
    let c = &config;
    let embed = r.matrix("token_embd.weight", c.vocab, c.dim)?;
    let mut layers = Vec::with_capacity(c.layers);
    for i in 0..c.layers {
        let n = |s: &str| format!("blk.{i}.{s}");
        layers.push(LayerWeights {
            attn_norm: r.vector(&n("attn_norm.weight"), c.dim)?,
            q: r.matrix(&n("attn_q.weight"), c.heads * c.head_dim, c.dim)?,
            k: r.matrix(&n("attn_k.weight"), c.kv_dim(), c.dim)?,
            v: r.matrix(&n("attn_v.weight"), c.kv_dim(), c.dim)?,
            q_bias: r.opt_vector(&n("attn_q.bias"), c.heads * c.head_dim)?,
            k_bias: r.opt_vector(&n("attn_k.bias"), c.kv_dim())?,
            v_bias: r.opt_vector(&n("attn_v.bias"), c.kv_dim())?,
            o: r.matrix(&n("attn_output.weight"), c.dim, c.heads * c.head_dim)?,
            ffn_norm: r.vector(&n("ffn_norm.weight"), c.dim)?,
            gate: r.matrix(&n("ffn_gate.weight"), c.ffn, c.dim)?,
            up: r.matrix(&n("ffn_up.weight"), c.ffn, c.dim)?,
            down: r.matrix(&n("ffn_down.weight"), c.dim, c.ffn)?,
        });
    }
    let output = match r.info("output.weight") {
        Some(_) => Some(r.matrix("output.weight", c.vocab, c.dim)?),
        None => None,
    };
    let weights = Weights {
        embed,
        layers,
        output_norm: r.vector("output_norm.weight", c.dim)?,
        output,
    };
    Ok((config, weights))
}
