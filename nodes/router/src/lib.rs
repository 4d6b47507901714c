//! dynamo-router: the router node. For each `llm.tokens/v1` request it picks one live
//! instance of its output port and returns that instance's token stream.
//!
//! ```text
//! preprocessor ──TokenRequest──▶ RouterService ──▶ policy.choose(candidates) ──▶ worker
//!              ◀──TokenDelta stream (in-flight counted, cancel on drop, retry once)──┘
//! ```
//!
//! The choice is a [`Policy`]: pure, synchronous, lock-free. The built-in ones are
//! selected by [`RouterMode`] (`round-robin`, `random`, `least-loaded`); KV-aware
//! policies plug into the same trait through [`RouterService::with_policy`].
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

pub use kv::{EventOutcome, KvConfig, KvConfigError, KvMetrics, KvMode, KvRouterHandle};
pub use mode::{ModeError, RouterMode};
pub use policy::{InstanceLoad, LeastLoaded, Policy, Random, RequestTracker, RoundRobin, Routed};
pub use service::RouterService;
