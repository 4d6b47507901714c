//! Disaggregated prefill/decode: the router prefills a prompt on a prefill worker, which
//! hands the prompt's KV blocks to the decode worker the router chose, then streams the
//! decode worker's answer.
//!
//! ```text
//!            ┌─ choose D (decode policy, least-loaded by default; D's slot held from here)
//! request ──▶┤  uncached on D < prefill_threshold ───────────────────────▶ D (local prefill)
//!            └─ choose P (prefill policy) ─▶ P: PrefillRequest{handoff_id = request id,
//!                 │ Unavailable: one other P      decode_instance = D} ─▶ PrefillResult
//!                 │ none live / all gone: D alone (fallback), or Unavailable if enforced
//!                 └──────────────────────────────────────────────────────▶ D (prefix hit)
//! ```
//!
//! Per-instance load accounting, the decode retry and cancel-on-drop are the ones of
//! [`RouterService`]: the decode side *is* a `RouterService`, and the prefill side keeps
//! the same load table over the prefill workers.
//!
//! ```
//! use std::sync::Arc;
//!
//! use dynamo_protocol::{PrefillRequest, PrefillResult, TokenDelta, TokenRequest};
//! use dynamo_router::{DisaggConfig, DisaggRouter, LeastLoaded, RoundRobin};
//! use dynamo_runtime::InstanceSet;
//!
//! let prefill = Arc::new(InstanceSet::<PrefillRequest, PrefillResult>::new("prefill"));
//! let decode = Arc::new(InstanceSet::<TokenRequest, TokenDelta>::new("decode"));
//! let config = DisaggConfig { prefill_threshold: 64, enforce: false, max_prefill_queue: 4 };
//! let router = DisaggRouter::new(
//!     config,
//!     prefill,
//!     Arc::new(RoundRobin::default()), // or a `KvRouterHandle::policy()` over the prefill workers
//!     decode,
//!     Arc::new(LeastLoaded::default()),
//! )
//! .named("router");
//! let m = router.metrics(); // disagg_prefill_total = m.prefill_total, …
//! assert_eq!(m.requests_total, 0);
//! ```

#[cfg(test)]
mod fake_prefill;
mod metrics;
mod prefill;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Instant;

use dynamo_protocol::{PrefillRequest, PrefillResult, TokenDelta, TokenRequest};
use dynamo_runtime::{
    error_stream, InstanceId, InstanceSet, RequestContext, ResponseStream, ServeError, Service,
};
use futures::StreamExt;
use tracing::Instrument;

pub use metrics::{DisaggMetrics, PREFILL_LATENCY_BUCKETS_US};

use crate::policy::Policy;
use crate::service::{dispatch, RouterService};
use crate::stream::LoadGuard;
use crate::table::Pick;
use metrics::Counters;
use prefill::{Job, Outcome, PrefillPort};

/// When a request is prefilled elsewhere.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DisaggConfig {
    /// Prompts with fewer *uncached* tokens than this are prefilled by the decode worker
    /// itself (the conditional policy); 0 sends every prompt to a prefill worker. With a
    /// KV-aware prefill policy (fed by the decode workers' events too), the uncached part
    /// is the prompt less what the chosen decode worker already holds (overlap blocks ×
    /// block size); otherwise it is the whole prompt.
    pub prefill_threshold: usize,
    /// When no prefill worker is live: fail the request with `Unavailable` instead of
    /// falling back to aggregated serving on the decode worker.
    pub enforce: bool,
    /// The other half of the conditional policy: when every live prefill worker already
    /// has this many prefills in flight, the decode worker prefills the prompt itself
    /// rather than queue behind them. 0 never does.
    pub max_prefill_queue: usize,
}

/// The router of a disaggregated deployment: one input port, a `decode` and a `prefill`
/// output port. Cheap to clone; clones share counters.
#[derive(Clone)]
pub struct DisaggRouter {
    inner: Arc<Inner>,
}

struct Inner {
    config: DisaggConfig,
    /// The prefill policy's KV state, if it is KV-aware: the chosen decode worker's
    /// overlap for the conditional policy.
    kv: Option<crate::KvRouterHandle>,
    /// Named like the disaggregated router; its load table is the decode workers'.
    decode: RouterService,
    prefill: PrefillPort,
    counters: Counters,
}

impl DisaggRouter {
    /// A router named `router` (see [`DisaggRouter::named`]). `prefill_policy` chooses among
    /// the prefill workers (round-robin, or a [`crate::KvRouterHandle::policy`] fed with the
    /// prefill workers' KV events); `decode_policy` among the decode workers
    /// ([`crate::LeastLoaded`] is the usual one).
    pub fn new(
        config: DisaggConfig,
        prefill: Arc<InstanceSet<PrefillRequest, PrefillResult>>,
        prefill_policy: Arc<dyn Policy>,
        decode: Arc<InstanceSet<TokenRequest, TokenDelta>>,
        decode_policy: Arc<dyn Policy>,
    ) -> Self {
        DisaggRouter {
            inner: Arc::new(Inner {
                config,
                kv: prefill_policy.kv(),
                decode: RouterService::with_policy(decode_policy, decode),
                prefill: PrefillPort::new(prefill, prefill_policy),
                counters: Counters::default(),
            }),
        }
    }

    /// The node name used in errors and spans. Settings are fixed once the router is
    /// shared: naming a clone makes a fresh router (own load table and counters).
    pub fn named(self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.with_decode(|decode| decode.named(name))
    }

    /// How many times a request whose decode worker dies mid-stream moves to another
    /// decode worker (see [`RouterService::migration_limit`]).
    pub fn migration_limit(self, limit: u32) -> Self {
        self.with_decode(|decode| decode.migration_limit(limit))
    }

    fn with_decode(self, change: impl FnOnce(RouterService) -> RouterService) -> Self {
        let inner = match Arc::try_unwrap(self.inner) {
            Ok(inner) => inner,
            Err(shared) => Inner {
                config: shared.config,
                kv: shared.kv.clone(),
                decode: shared.decode.clone(),
                prefill: PrefillPort::new(
                    shared.prefill.set.clone(),
                    shared.prefill.policy.clone(),
                ),
                counters: Counters::default(),
            },
        };
        DisaggRouter {
            inner: Arc::new(Inner {
                decode: change(inner.decode),
                ..inner
            }),
        }
    }

    pub fn name(&self) -> &str {
        self.inner.decode.name()
    }

    pub fn config(&self) -> DisaggConfig {
        self.inner.config
    }

    /// The per-request decisions and prefill latencies so far.
    pub fn metrics(&self) -> DisaggMetrics {
        self.inner.counters.snapshot()
    }

    /// `(instance id, requests in flight, requests ever sent)` per decode worker, sorted
    /// by id. A request is in flight on its decode worker from the moment it is chosen,
    /// prefill included, and counts as sent once the decode call is made.
    pub fn decode_stats(&self) -> Vec<(InstanceId, u64, u64)> {
        self.inner.decode.stats()
    }

    /// The same for the prefill workers (a prefill call is in flight until its result).
    pub fn prefill_stats(&self) -> Vec<(InstanceId, u64, u64)> {
        let p = &self.inner.prefill;
        p.loads.stats(&p.set)
    }
}

impl Inner {
    /// The prompt tokens `decode` would have to prefill: the whole prompt, less the
    /// blocks `decode` already holds when the KV state knows.
    fn uncached_tokens(&self, request: &TokenRequest, decode: InstanceId) -> usize {
        let tokens = request.token_ids.len();
        let Some(kv) = &self.kv else {
            return tokens;
        };
        let overlap = kv.overlaps(&request.token_ids).get(decode) as usize;
        tokens.saturating_sub(overlap.saturating_mul(kv.config().block_size))
    }

    /// Whether every live prefill worker has `max_prefill_queue` prefills in flight.
    fn prefill_queue_full(&self) -> bool {
        let limit = self.config.max_prefill_queue as u64;
        if limit == 0 {
            return false;
        }
        let live = self.prefill.set.ids();
        let stats = self.prefill.loads.stats(&self.prefill.set);
        let mut in_flight = stats
            .iter()
            .filter(|(id, _, _)| live.contains(id))
            .map(|(_, n, _)| *n);
        match in_flight.next() {
            None => false,
            Some(first) => in_flight.fold(first, u64::min) >= limit,
        }
    }
}

impl Service<TokenRequest, TokenDelta> for DisaggRouter {
    /// One `disagg_router` span per request: `decode_instance`, `uncached_tokens` (with a
    /// threshold), `prefill_instance` (and `prefill_retried_from`), `path` (`prefill`,
    /// `local`, `fallback`, `rejected`, `prefill_failed`), `prefill_us`; `instance`/`retried_from` when the decode call
    /// moved to another worker, and a KV policy's `overlap_blocks`/`prompt_blocks` (the
    /// prefill policy's, when both are KV-aware).
    fn call(&self, request: TokenRequest, ctx: RequestContext) -> ResponseStream<TokenDelta> {
        let inner = &self.inner;
        inner.counters.request();
        let span = tracing::debug_span!(
            "disagg_router",
            router = %inner.decode.name(),
            request_id = %ctx.request_id,
            path = tracing::field::Empty,
            decode_instance = tracing::field::Empty,
            prefill_instance = tracing::field::Empty,
            prefill_retried_from = tracing::field::Empty,
            prefill_us = tracing::field::Empty,
            instance = tracing::field::Empty,
            retried_from = tracing::field::Empty,
            overlap_blocks = tracing::field::Empty,
            prompt_blocks = tracing::field::Empty,
            uncached_tokens = tracing::field::Empty,
        );
        let entered = span.enter();
        let decode = inner.decode.shared();
        let Some(pick) = decode
            .loads
            .pick(&decode.set, decode.policy.as_ref(), &request)
        else {
            tracing::debug!("no live decode worker");
            inner.counters.rejected();
            return error_stream(ServeError::unavailable(format!(
                "router `{}` has no live decode worker",
                inner.decode.name()
            )));
        };
        span.record("decode_instance", pick.id);
        // Held through the prefill, so concurrent requests see this decode worker busy.
        let load = LoadGuard::charge(pick.load.clone());
        let threshold = inner.config.prefill_threshold;
        let short = threshold > 0 && {
            let uncached = inner.uncached_tokens(&request, pick.id);
            span.record("uncached_tokens", uncached);
            uncached < threshold
        };
        if short || inner.prefill_queue_full() {
            span.record("path", "local");
            inner.counters.local();
            let stream = dispatch(decode, pick, load, request, ctx, span.clone());
            drop(entered);
            return stream;
        }
        drop(entered);
        let pending = Pending(Some(self.inner.clone()));
        let step_span = span.clone();
        let step = prefill_then_decode(self.inner.clone(), pending, pick, load, request, ctx, span);
        Box::pin(futures::stream::once(step.instrument(step_span)).flatten())
    }
}

/// The prefill step, then the decode call (or the request's error). Dropping the future
/// drops the prefill call, which cancels the prefill worker's request.
async fn prefill_then_decode(
    inner: Arc<Inner>,
    mut pending: Pending,
    pick: Pick,
    load: LoadGuard,
    request: TokenRequest,
    ctx: RequestContext,
    span: tracing::Span,
) -> ResponseStream<TokenDelta> {
    let started = Instant::now();
    let job = Job {
        request: &request,
        handoff_id: &ctx.request_id,
        decode_instance: pick.id,
        ctx: &ctx,
        span: &span,
    };
    let outcome = inner.prefill.run(job, || inner.counters.retry()).await;
    pending.decided();
    let c = &inner.counters;
    let name = inner.decode.name();
    match outcome {
        Outcome::Done { instance, result } => {
            let latency = started.elapsed();
            c.prefilled(latency);
            span.record("path", "prefill");
            span.record("prefill_us", latency.as_micros() as u64);
            tracing::debug!(
                prefill = instance,
                blocks = result.blocks,
                cached_tokens = result.cached_tokens,
                "prefilled"
            );
        }
        Outcome::NoWorker { last } if inner.config.enforce => {
            c.rejected();
            span.record("path", "rejected");
            let why = last.map_or_else(String::new, |e| format!(" (last: {e})"));
            return error_stream(ServeError::unavailable(format!(
                "router `{name}` has no live prefill worker and disaggregation is enforced{why}"
            )));
        }
        Outcome::NoWorker { last } => {
            c.fallback();
            span.record("path", "fallback");
            match last {
                Some(error) => tracing::debug!(%error, "prefill workers gone; decode alone"),
                None => tracing::debug!("no live prefill worker; decode alone"),
            }
        }
        Outcome::Failed { instance, error } => {
            c.prefill_error();
            span.record("path", "prefill_failed");
            return error_stream(ServeError::new(
                error.kind,
                format!(
                    "router `{name}`: prefill worker {instance} failed: {}",
                    error.message
                ),
            ));
        }
        Outcome::Cancelled => {
            c.cancelled();
            span.record("path", "cancelled");
            return error_stream(ServeError::cancelled());
        }
    }
    dispatch(inner.decode.shared(), pick, load, request, ctx, span)
}

/// Counts a request as cancelled if it is dropped before its prefill step decided (also
/// before it was first polled).
struct Pending(Option<Arc<Inner>>);

impl Pending {
    fn decided(&mut self) {
        self.0 = None;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take() {
            inner.counters.cancelled();
        }
    }
}
