//! dynamo-router: the router node. For each `llm.tokens/v1` request it picks one live
//! instance of its output port and returns that instance's token stream.
//!
//! ```text
//! preprocessor ──TokenRequest──▶ RouterService ──▶ policy.choose(candidates) ──▶ worker
//!              ◀──TokenDelta stream (in-flight counted, cancel on drop, retry once)──┘
//! ```
//!
//! The choice is a [`Policy`]: synchronous and short. The built-in ones are selected by
//! [`RouterMode`] (`round-robin`, `random`, `least-loaded` are lock-free; `kv` and
//! `kv-approx` take one short mutex around their index); others plug into the same trait
//! through [`RouterService::with_policy`]. A policy that keeps its own account of the work
//! in flight returns a [`RequestTracker`] from [`Policy::route`], told of the first token
//! and of a retry's move, and dropped when the stream ends.
//!
//! ```
//! use std::sync::Arc;
//!
//! use dynamo_protocol::{TokenDelta, TokenRequest};
//! use dynamo_router::{RouterMode, RouterService};
//! use dynamo_runtime::{ErrorKind, InstanceSet, RequestContext, Service};
//! use futures::StreamExt;
//!
//! // The live workers behind the router's `out` port; the runtime adds and removes them
//! // (`workers.add(lease_id, client)`) as they come and go.
//! let workers = Arc::new(InstanceSet::<TokenRequest, TokenDelta>::new("decode"));
//! let mode: RouterMode = "least-loaded".parse()?;
//! let router = RouterService::new(mode, workers.clone()).named("router");
//!
//! let request = TokenRequest {
//!     model: "m".into(),
//!     token_ids: vec![1, 2, 3],
//!     sampling: Default::default(),
//!     stop: Default::default(),
//! };
//! let mut stream = router.call(request, RequestContext::new("req-1"));
//! // No worker yet: one `Unavailable` error naming the router, then the end.
//! let first = futures::executor::block_on(stream.next());
//! assert_eq!(first.and_then(Result::err).map(|e| e.kind), Some(ErrorKind::Unavailable));
//!
//! // For metrics: (instance id, in flight, routed so far), sorted by id.
//! for (instance, in_flight, routed) in router.stats() {
//!     println!("{instance}: {in_flight} in flight, {routed} routed");
//! }
//! # Ok::<(), dynamo_router::ModeError>(())
//! ```

//! ## KV-aware routing
//!
//! `kv` and `kv-approx` pick the worker with the lowest
//! `overlap_weight × blocks to prefill + blocks held for decode` (see [`kv::cost`]). The
//! host feeds the workers' KV events to the router's [`KvRouterHandle`]:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use dynamo_protocol::{KvEvent, KvEventData, StoredBlock, TokenDelta, TokenRequest};
//! use dynamo_router::{EventOutcome, KvConfig, KvMode, RouterService};
//! use dynamo_runtime::InstanceSet;
//!
//! let workers = Arc::new(InstanceSet::<TokenRequest, TokenDelta>::new("decode"));
//! let config = KvConfig {
//!     block_size: 16,               // the workers' block size
//!     overlap_weight: 8.0,           // the default (DEFAULT_OVERLAP_WEIGHT)
//!     temperature: 0.0,
//!     ttl: Duration::from_secs(2),  // unconfirmed predictions (kv-approx: its decisions)
//!     ..KvConfig::for_mode(KvMode::Events)
//! };
//! let router = RouterService::with_kv(KvMode::Events, config, workers)?.named("router");
//! let kv = router.kv_handle().expect("a KV router has a handle");
//!
//! // For each event of each worker (worker_id = the worker's instance id):
//! let event = KvEvent {
//!     worker_id: 7,
//!     event_id: 0,
//!     data: KvEventData::Stored { parent: None, blocks: vec![StoredBlock { hash: 42 }] },
//! };
//! match kv.apply_event(event) {
//!     EventOutcome::NeedsResync => { /* fetch worker 7's snapshot, then: */
//!         kv.apply_snapshot(7, Some(0), &[KvEventData::Cleared]);
//!     }
//!     _ => {}
//! }
//! assert!(kv.needs_resync().is_empty());
//! kv.remove_worker(7); // when the instance leaves
//! let m = kv.metrics(); // routing_overhead_us_*, kv_hit_blocks_total, kv_prompt_blocks_total…
//! assert_eq!(m.events_applied_total, 1);
//! # Ok::<(), dynamo_router::KvConfigError>(())
//! ```

pub mod disagg;
pub mod kv;
pub mod mode;
pub mod policy;
pub mod service;
mod stream;
mod table;

#[cfg(test)]
mod service_tests;
#[cfg(test)]
mod test_fakes;

pub use disagg::{DisaggConfig, DisaggMetrics, DisaggRouter};
pub use kv::{EventOutcome, KvConfig, KvConfigError, KvMetrics, KvMode, KvRouterHandle};
pub use mode::{ModeError, RouterMode};
pub use policy::{InstanceLoad, LeastLoaded, Policy, Random, RequestTracker, RoundRobin, Routed};
pub use service::{RouterService, DEFAULT_MIGRATION_LIMIT};
