//! dynamo-frontend: the OpenAI-compatible HTTP frontend of a dynamo graph.
//!
//! It validates and normalises OpenAI requests (`/v1/chat/completions`,
//! `/v1/completions`) into [`dynamo_protocol::ChatRequest`], calls its downstream
//! [`dynamo_runtime::Service`], and turns the [`dynamo_protocol::TextDelta`] stream into
//! SSE chunks or one JSON answer. It also serves `/v1/models`, `/health`, `/live` and
//! `/metrics`. The caller binds the listener and hands it to [`serve`].
//!
//! ```no_run
//! # async fn run(downstream: dynamo_frontend::Downstream) -> Result<(), Box<dyn std::error::Error>> {
//! use dynamo_frontend::{serve, Frontend, FrontendConfig};
//! let frontend = Frontend::new(FrontendConfig::for_models(["llama-3-8b"]), downstream)?
//!     .with_readiness(|| true);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! serve(listener, frontend, shutdown).await?;
//! # Ok(()) }
//! ```

mod chunks;
pub mod config;
mod downstream;
pub mod error;
mod frontend;
mod generate;
mod logprobs;
pub mod metrics;
pub mod openai;
mod routes;
pub mod server;
mod stream;
mod tracker;

pub use config::FrontendConfig;
pub use error::{ApiError, FrontendError};
pub use frontend::{Downstream, Frontend, Readiness};
pub use generate::REQUEST_ID_HEADER;
pub use metrics::FrontendMetrics;
pub use server::{serve, serve_with_hook, AcceptHook};
pub use tracker::CLIENT_CLOSED;
