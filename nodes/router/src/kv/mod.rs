//! KV-aware routing: send each request where its prompt's KV blocks are already cached,
//! weighed against the work each worker already has.
//!
//! - [`indexer`]: which worker holds which block (from KV events, or from the router's own
//!   decisions with a TTL), and how long a prefix of a request each one holds.
//! - [`shards`]: the index split by worker, one lock per shard, so events of different
//!   workers apply in parallel.
//! - [`cost`]: the cost of a worker for a request, the selection, and the router's account
//!   of the requests in flight.
//! - [`router`]: the [`crate::Policy`] and the [`KvRouterHandle`] the host feeds events to.

pub mod config;
pub mod cost;
pub mod indexer;
pub mod metrics;
mod pages;
pub mod router;
pub mod shards;
mod sync;
mod worker_set;

pub use config::{
    KvConfig, KvConfigError, KvMode, DEFAULT_OVERLAP_WEIGHT, DEFAULT_WEIGHT_QUEUE_TOKENS,
};
pub use indexer::{KvIndexer, OverlapScores};
pub use metrics::{KvMetrics, OVERHEAD_BUCKETS_US, OVERLAP_BUCKETS_BLOCKS};
pub use router::KvRouterHandle;
pub use shards::ShardedIndex;
pub use sync::EventOutcome;
