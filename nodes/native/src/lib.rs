//! dynamo-native: serves a llama-family GGUF model on the CPU with our own forward pass
//! over a paged KV cache, driven by the same scheduler and block manager as the mocker
//! (continuous batching with chunked prefill, prefix caching with KV events, preemption,
//! KV export and import for disaggregated serving).
//!
//! - [`quant`]: weight matrices in their GGML formats and the SIMD matmul kernels.
//! - [`model`]: configuration from GGUF metadata, weights, the batched forward pass.
//! - [`kv_pool`]: the paged KV cache.
//! - [`sampling`]: greedy, temperature, top-k, top-p, penalties, seeded draws.
//! - [`backend`] / [`engine`]: the model as the engine shell's step backend.

pub mod backend;
pub mod bench;
pub mod engine;
pub mod error;
pub mod kv_pool;
pub mod model;
pub mod quant;
pub mod sampling;

pub use engine::{load_model, start, NativeConfig, NativeError};
pub use error::LoadError;
