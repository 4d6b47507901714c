//! [`Frontend`]: the configuration, the downstream service and the metrics, shared by all
//! routes. Build one, then hand it to [`crate::serve`] (or mount [`Frontend::router`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use dynamo_protocol::{ChatRequest, TextDelta};
use dynamo_runtime::Service;
use tokio_util::sync::CancellationToken;

use crate::config::FrontendConfig;
use crate::error::FrontendError;
use crate::metrics::FrontendMetrics;

/// The downstream this frontend calls (the preprocessor's input port, through the runtime).
pub type Downstream = Arc<dyn Service<ChatRequest, TextDelta>>;

/// Says whether the downstream can take requests now (`GET /health`).
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// The OpenAI-compatible HTTP frontend.
#[derive(Clone)]
pub struct Frontend {
    pub(crate) config: Arc<FrontendConfig>,
    pub(crate) downstream: Downstream,
    pub(crate) metrics: Arc<FrontendMetrics>,
    pub(crate) readiness: Readiness,
    pub(crate) ids: Arc<RequestIds>,
    /// Cancelled when shutdown's grace period is over: in-flight requests end at once.
    pub(crate) stopping: CancellationToken,
}

impl std::fmt::Debug for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frontend")
            .field("config", &self.config)
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

impl Frontend {
    /// Checks `config` and builds a frontend that calls `downstream`. It reports ready
    /// until [`Frontend::with_readiness`] says otherwise.
    pub fn new(config: FrontendConfig, downstream: Downstream) -> Result<Self, FrontendError> {
        config.validate()?;
        let metrics = Arc::new(FrontendMetrics::new(&config.served_models));
        Ok(Frontend {
            config: Arc::new(config),
            downstream,
            metrics,
            readiness: Arc::new(|| true),
            ids: Arc::new(RequestIds::new()),
            stopping: CancellationToken::new(),
        })
    }

    /// Uses `ready` to answer `GET /health` (200 when true, 503 when false).
    pub fn with_readiness(mut self, ready: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.readiness = Arc::new(ready);
        self
    }

    pub fn config(&self) -> &FrontendConfig {
        &self.config
    }

    /// The metrics registry: register extra gauges or collectors here (engine KV blocks).
    pub fn metrics(&self) -> &Arc<FrontendMetrics> {
        &self.metrics
    }

    /// The HTTP routes, for callers that run their own server or test without a socket.
    pub fn router(&self) -> axum::Router {
        crate::routes::router(Arc::new(self.clone()))
    }
}

/// Request ids for requests that bring none: a per-process prefix and a counter.
#[derive(Debug)]
pub(crate) struct RequestIds {
    prefix: String,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        RequestIds {
            prefix: format!("{:x}{:05x}", nanos, std::process::id() & 0xf_ffff),
            next: AtomicU64::new(1),
        }
    }

    pub(crate) fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:x}", self.prefix)
    }
}

/// Seconds since the Unix epoch, for `created`.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_distinct() {
        let ids = RequestIds::new();
        let (a, b) = (ids.next(), ids.next());
        assert_ne!(a, b);
        assert!(a.is_ascii());
    }
}
