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

pub mod mode;
pub mod policy;
pub mod service;
mod stream;
mod table;

#[cfg(test)]
mod service_tests;

pub use mode::{ModeError, RouterMode};
pub use policy::{InstanceLoad, LeastLoaded, Policy, Random, RoundRobin};
pub use service::RouterService;
