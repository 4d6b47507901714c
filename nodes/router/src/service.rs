//! [`RouterService`]: the router node's input port.

use std::sync::Arc;
use std::time::Instant;

use dynamo_protocol::{TokenDelta, TokenRequest};
use dynamo_runtime::{
    error_stream, InstanceId, InstanceSet, RequestContext, ResponseStream, ServeError, Service,
};

use crate::kv::{KvConfig, KvConfigError, KvMode, KvRouterHandle};
use crate::mode::RouterMode;
use crate::policy::Policy;
use crate::stream::{Attempt, LoadGuard, Retry, RoutedStream};
use crate::table::{Loads, Pick};

/// Chooses one live instance of its output port for each request and returns that
/// instance's response stream.
///
/// Per request it takes no lock: one snapshot of the instance set, one load of the
/// counter table, the policy's choice, two atomic increments, and one boxed stream.
/// When another instance is live it also keeps a copy of the request, so a worker found
/// dead before its first item can be replaced once (see [`RouterService::retry_unavailable`]).
#[derive(Clone)]
pub struct RouterService {
    shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub name: Arc<str>,
    pub policy: Arc<dyn Policy>,
    pub set: Arc<InstanceSet<TokenRequest, TokenDelta>>,
    pub loads: Loads,
    pub retry: bool,
    /// How many times one request may move to another worker after its worker died
    /// mid-stream (0: never).
    pub migration_limit: u32,
    pub kv: Option<KvRouterHandle>,
}

/// Migrations per request unless the graph says otherwise.
pub const DEFAULT_MIGRATION_LIMIT: u32 = 3;

impl RouterService {
    /// A router named `router` (see [`RouterService::named`]) in a built-in mode. A KV
    /// mode gets the default [`KvConfig`]; its event entry point is
    /// [`RouterService::kv_handle`].
    pub fn new(mode: RouterMode, instances: Arc<InstanceSet<TokenRequest, TokenDelta>>) -> Self {
        match mode.kv_mode() {
            Some(kv) => {
                Self::with_kv_handle(KvRouterHandle::build(kv, KvConfig::for_mode(kv)), instances)
            }
            None => Self::with_policy(mode.policy(), instances),
        }
    }

    /// A KV-aware router (`kv` or `kv-approx`) with these settings. Feed it the workers'
    /// KV events through [`RouterService::kv_handle`].
    pub fn with_kv(
        mode: KvMode,
        config: KvConfig,
        instances: Arc<InstanceSet<TokenRequest, TokenDelta>>,
    ) -> Result<Self, KvConfigError> {
        Ok(Self::with_kv_handle(
            KvRouterHandle::new(mode, config)?,
            instances,
        ))
    }

    /// A KV-aware router over an existing KV state (e.g. one shared by two routers).
    pub fn with_kv_handle(
        handle: KvRouterHandle,
        instances: Arc<InstanceSet<TokenRequest, TokenDelta>>,
    ) -> Self {
        let mut router = Self::with_policy(handle.policy(), instances);
        if let Some(shared) = Arc::get_mut(&mut router.shared) {
            shared.kv = Some(handle);
        }
        router
    }

    /// The KV state of a KV-aware router, to feed events to and read metrics from.
    pub fn kv_handle(&self) -> Option<KvRouterHandle> {
        self.shared.kv.clone()
    }

    /// A router with any policy, e.g. a KV-aware one fed by an indexer elsewhere.
    pub fn with_policy(
        policy: Arc<dyn Policy>,
        instances: Arc<InstanceSet<TokenRequest, TokenDelta>>,
    ) -> Self {
        RouterService {
            shared: Arc::new(Shared {
                name: Arc::from("router"),
                policy,
                set: instances,
                loads: Loads::new(),
                retry: true,
                migration_limit: DEFAULT_MIGRATION_LIMIT,
                kv: None,
            }),
        }
    }

    /// The node name used in errors and spans.
    pub fn named(self, name: impl Into<String>) -> Self {
        self.rebuild(|s| s.name = Arc::from(name.into()))
    }

    /// Whether a worker that fails with `Unavailable` before its first item is replaced
    /// once by another (default on). Off saves a copy of each request.
    pub fn retry_unavailable(self, retry: bool) -> Self {
        self.rebuild(|s| s.retry = retry)
    }

    /// How many times a request whose worker dies mid-stream is moved to another worker,
    /// which is sent the prompt plus the tokens already streamed and continues the answer
    /// (default [`DEFAULT_MIGRATION_LIMIT`]; 0 turns migration off, and such a request
    /// fails with `Unavailable`).
    pub fn migration_limit(self, limit: u32) -> Self {
        self.rebuild(|s| s.migration_limit = limit)
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// `(instance id, requests in flight, requests ever routed)` per instance, sorted by
    /// id: every live instance, and gone ones whose streams are still open.
    pub fn stats(&self) -> Vec<(InstanceId, u64, u64)> {
        self.shared.loads.stats(&self.shared.set)
    }

    /// Settings are fixed once the router is shared; builders make a fresh one.
    fn rebuild(self, change: impl FnOnce(&mut Shared)) -> Self {
        let mut shared = match Arc::try_unwrap(self.shared) {
            Ok(shared) => shared,
            Err(shared) => Shared {
                name: shared.name.clone(),
                policy: shared.policy.clone(),
                set: shared.set.clone(),
                loads: Loads::new(),
                retry: shared.retry,
                migration_limit: shared.migration_limit,
                kv: shared.kv.clone(),
            },
        };
        change(&mut shared);
        RouterService {
            shared: Arc::new(shared),
        }
    }
}

impl Service<TokenRequest, TokenDelta> for RouterService {
    fn call(&self, request: TokenRequest, ctx: RequestContext) -> ResponseStream<TokenDelta> {
        // `instance` is the chosen worker; a KV policy adds its overlap, cost and the
        // number of candidates it weighed.
        let span = tracing::info_span!(
            "router",
            router = %self.shared.name,
            request_id = %ctx.request_id,
            instance = tracing::field::Empty,
            overhead_us = tracing::field::Empty,
            retried_from = tracing::field::Empty,
            migrated_from = tracing::field::Empty,
            overlap_blocks = tracing::field::Empty,
            prompt_blocks = tracing::field::Empty,
            cost = tracing::field::Empty,
            candidates = tracing::field::Empty,
        );
        let started = (!span.is_disabled()).then(Instant::now);
        let entered = span.enter();
        let shared = &self.shared;
        let Some(pick) = shared
            .loads
            .pick(&shared.set, shared.policy.as_ref(), &request)
        else {
            tracing::debug!("no live worker");
            return error_stream(ServeError::unavailable(format!(
                "router `{}` has no live worker",
                shared.name
            )));
        };
        span.record("instance", pick.id);
        if let Some(started) = started {
            span.record("overhead_us", started.elapsed().as_micros() as u64);
        }
        let load = LoadGuard::charge(pick.load.clone());
        let stream = dispatch(shared, pick, load, request, ctx, span.clone());
        drop(entered);
        stream
    }
}

/// Calls `pick`, whose slot `load` already holds, and wraps its stream: in-flight release,
/// cancel on drop, one retry elsewhere if the worker is found dead before its first item,
/// migration elsewhere if it dies mid-stream, and the policy's tracker. Shared by [`RouterService`] and the disaggregated router's
/// decode step.
pub(crate) fn dispatch(
    shared: &Arc<Shared>,
    mut pick: Pick,
    load: LoadGuard,
    request: TokenRequest,
    ctx: RequestContext,
    span: tracing::Span,
) -> ResponseStream<TokenDelta> {
    // Copy the request before the worker consumes it, only if a retry or a migration
    // could go anywhere.
    let movable = shared.retry || shared.migration_limit > 0;
    let copy = (movable && pick.has_alternative).then(|| request.clone());
    let failed = pick.id;
    let tracker = pick.tracker.take();
    let attempt = Attempt::charged(&pick.client, load, request, &ctx);
    let retry = copy.map(|request| Retry {
        request,
        ctx,
        shared: shared.clone(),
        failed,
        generated: Vec::new(),
        migrations_left: shared.migration_limit,
    });
    Box::pin(RoutedStream::new(attempt, retry, span, tracker))
}
