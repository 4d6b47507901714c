//! dynamo-llamacpp: llama.cpp in process (`engine = "llamacpp"`), through the
//! `llama-cpp-2` bindings, as a step backend of the engine shell shared with the mocker
//! and the native engine. The scheduler (continuous batching, chunked prefill,
//! preemption), the paged block pool with prefix caching and KV events, and the KV
//! hand-off of disaggregated serving are the shell's; llama.cpp computes each step over
//! its own per-sequence cache, and KV moves between that cache and the pool's blocks
//! through llama.cpp's per-sequence state (`state_seq_*`).
//!
//! - [`state`]: llama.cpp's serialised sequence state ↔ pool blocks.
//! - [`model`] (private): the model and context, owned together.
//! - [`backend`]: the step backend (slots, block ownership, sampling).
//! - [`engine`]: configuration and start.
//!
//! Building it compiles llama.cpp (C++, through CMake; bindgen needs libclang).

pub mod backend;
pub mod engine;
mod model;
pub mod state;

pub use engine::{start, LlamaCppConfig, LlamaCppError, MAX_SEQS};
