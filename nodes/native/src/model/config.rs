//! The shape of a llama-family model, read from its GGUF metadata.

use dynamo_preprocessor::gguf::GgufFile;

use crate::error::LoadError;

/// How rotary position embedding pairs up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: llama.cpp's `NORM` (Llama, SmolLM2 as converted to GGUF).
    Interleaved,
    /// Halves `(i, i + d/2)`: llama.cpp's `NEOX` (Qwen2).
    Halves,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: String,
    pub layers: usize,
    pub dim: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context_length: usize,
    pub rope_base: f32,
    pub rope_dims: usize,
    pub rope_style: RopeStyle,
    pub rms_eps: f32,
}

impl ModelConfig {
    pub fn from_gguf(gguf: &GgufFile) -> Result<ModelConfig, LoadError> {
        let arch = gguf
            .opt_str("general.architecture")
            .map_err(LoadError::gguf)?
            .unwrap_or("llama")
            .to_string();
        let rope_style = match arch.as_str() {
            "llama" | "mistral" => RopeStyle::Interleaved,
            "qwen2" => RopeStyle::Halves,
            other => return Err(LoadError::UnsupportedArch(other.to_string())),
        };
        let int = |key: &str| -> Result<Option<usize>, LoadError> {
            Ok(gguf
                .opt_u64(&format!("{arch}.{key}"))
                .map_err(LoadError::gguf)?
                .and_then(|v| usize::try_from(v).ok()))
        };
        let need = |key: &str| -> Result<usize, LoadError> {
            int(key)?.ok_or_else(|| LoadError::MissingKey(format!("{arch}.{key}")))
        };
        let float = |key: &str, default: f32| -> f32 {
            match gguf.get(&format!("{arch}.{key}")) {
                Some(dynamo_preprocessor::gguf::GgufValue::F32(v)) => *v,
                Some(dynamo_preprocessor::gguf::GgufValue::F64(v)) => *v as f32,
                _ => default,
            }
        };
        let layers = need("block_count")?;
        let dim = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let kv_heads = int("attention.head_count_kv")?.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || dim % heads != 0 || heads % kv_heads != 0 {
            return Err(LoadError::Shape(format!(
                "{heads} heads / {kv_heads} KV heads do not divide embedding width {dim}"
            )));
        }
        let head_dim = dim / heads;
        let vocab = match int("vocab_size")? {
            Some(v) => v,
            None => gguf
                .str_array("tokenizer.ggml.tokens")
                .map_err(LoadError::gguf)?
                .len(),
        };
        Ok(ModelConfig {
            layers,
            dim,
            heads,
            kv_heads,
            head_dim,
            ffn: need("feed_forward_length")?,
            vocab,
            context_length: int("context_length")?.unwrap_or(2048),
            rope_base: float("rope.freq_base", 10_000.0),
            rope_dims: int("rope.dimension_count")?.unwrap_or(head_dim),
            rope_style,
            rms_eps: float("attention.layer_norm_rms_epsilon", 1e-5),
            arch,
        })
    }

    /// Width of the keys (and values) of one token in one layer.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}
