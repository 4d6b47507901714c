//! Why a model could not be loaded or served.

use crate::quant::QuantError;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("GGUF: {0}")]
    Gguf(String),
    #[error("GGUF metadata key {0:?} is missing")]
    MissingKey(String),
    #[error(
        "architecture `{0}` is not supported by the native engine (llama, mistral, qwen2 are)"
    )]
    UnsupportedArch(String),
    #[error("tensor `{0}` is missing from the model file")]
    MissingTensor(String),
    #[error("tensor `{name}`: {message}")]
    Tensor { name: String, message: String },
    #[error("tensor `{name}`: {source}")]
    Quant { name: String, source: QuantError },
    #[error("model shape: {0}")]
    Shape(String),
}

impl LoadError {
    pub(crate) fn gguf(e: impl std::fmt::Display) -> LoadError {
        LoadError::Gguf(e.to_string())
    }
}
