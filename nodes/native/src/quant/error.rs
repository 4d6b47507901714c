//! What can go wrong when a weight matrix is built from GGML bytes.

/// Why a [`super::QMatrix`] could not be built. Every variant is a property of the model
/// file, so a loader reports it and refuses the model; nothing here is retryable.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum QuantError {
    /// The tensor's element type has no kernel here (K-quants, Q5, BF16, ...).
    #[error("unsupported GGML tensor type {0} for a weight matrix (supported: F32, F16, Q4_0, Q4_1, Q8_0)")]
    UnsupportedType(String),
    /// Block types pack 32 elements per block, so a row must be a whole number of blocks.
    #[error("{ty} matrix has {cols} columns, not a multiple of the block size 32")]
    ColsNotBlockMultiple { ty: &'static str, cols: usize },
    /// The byte slice does not hold exactly `rows` rows of `cols` elements.
    #[error("{ty} matrix of {rows}x{cols} needs {expected} bytes, got {got}")]
    WrongByteLength {
        ty: &'static str,
        rows: usize,
        cols: usize,
        expected: usize,
        got: usize,
    },
    /// A zero-sized matrix is a broken file, not a model.
    #[error("matrix shape {rows}x{cols} has a zero dimension")]
    EmptyShape { rows: usize, cols: usize },
}
