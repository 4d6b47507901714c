//! dynamo-mocker: a GPU-free engine that schedules, caches and times requests like a vLLM
//! worker, publishes real KV events and emits real token ids, for load tests and for
//! measuring the CPU cost of the rest of the pipeline (instant mode).
//!
//! The cores are pure and synchronous ([`BlockManager`], [`Scheduler`], [`timing`]); the
//! [`MockerEngine`] is the thin async shell that serves `llm.tokens/v1` and publishes
//! `kv.events/v1`. For disaggregated serving, [`PrefillService`] (a prefill worker's `in`
//! port) hands a prompt's KV blocks to a decode worker's [`KvImportService`] (its `kv`
//! port), which caches them so the decode request finds them as a prefix hit.

pub mod backend;
pub mod block_manager;
pub mod config;
pub mod engine;
mod gpu_pool;
pub mod handoff;
pub mod payload;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod stats;
mod step_loop;
mod stream;
pub mod timing;

pub use backend::{BackendError, StepBackend, StepSeq};
pub use block_manager::{
    BlockCounts, BlockId, BlockManager, ImportError, Imported, KvSnapshot, OutOfBlocks, PrefixMatch,
};
pub use config::{ConfigError, MockerConfig, SMOLLM2_135M_KV_LAYOUT};
pub use engine::{EngineError, MockerEngine};
pub use handoff::{send_kv_chunks, KvImportService, PrefillService, KV_CHUNK_BLOCKS, KV_WINDOW};
pub use scheduler::{AdmitError, RequestLimits, Scheduler, SchedulerStats, SeqOutput, StepFailed};
pub use sequence::{NewSequence, SeqId};
pub use stats::MockerStats;
pub use timing::{decode_ms, prefill_ms, step_duration, StepWork};
