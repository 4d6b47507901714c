//! The response stream the router hands back: the chosen worker's stream, wrapped so the
//! instance's in-flight counter is released when it ends, fails or is dropped, dropping
//! it cancels the worker's request, a worker found dead before its first item is
//! replaced once by another, and a worker that dies mid-stream has the request migrated:
//! another worker gets the prompt plus the tokens already streamed and the rest of the
//! token budget, and its tokens continue the same stream.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use dynamo_protocol::{TokenDelta, TokenRequest};
use dynamo_runtime::{ErrorKind, InstanceId, RequestContext, ResponseStream, ServeError};
use futures::{Stream, StreamExt};
use tokio_util::sync::DropGuard;

use crate::policy::{InstanceLoad, RequestTracker};
use crate::service::Shared;
use crate::table::{Client, Pick};

/// Holds one in-flight slot of an instance; gives it back on drop.
pub(crate) struct LoadGuard(Arc<InstanceLoad>);

impl LoadGuard {
    /// Takes a slot; the request counts as routed once [`LoadGuard::dispatched`].
    pub(crate) fn charge(load: Arc<InstanceLoad>) -> Self {
        load.reserve();
        LoadGuard(load)
    }

    /// The request was sent to the instance.
    pub(crate) fn dispatched(&self) {
        self.0.dispatched();
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// One call to one worker. Fields drop in order: the worker's stream, then its request's
/// cancellation (so an engine that ignores a dropped stream still sees the cancel), then
/// the in-flight slot.
pub(crate) struct Attempt {
    stream: ResponseStream<TokenDelta>,
    cancel: DropGuard,
    _load: LoadGuard,
}

impl Attempt {
    /// Charges the instance and calls it on a child of `ctx`.
    pub(crate) fn start(pick: Pick, request: TokenRequest, ctx: &RequestContext) -> Self {
        Self::charged(&pick.client, LoadGuard::charge(pick.load), request, ctx)
    }

    /// Calls an instance whose slot is already held (reserved before a prefill) on a
    /// child of `ctx`.
    pub(crate) fn charged(
        client: &Client<TokenRequest, TokenDelta>,
        load: LoadGuard,
        request: TokenRequest,
        ctx: &RequestContext,
    ) -> Self {
        load.dispatched();
        let child = ctx.child();
        let cancel = child.drop_guard();
        Attempt {
            stream: client.call(request, child),
            cancel,
            _load: load,
        }
    }

    /// The worker finished: release the slot without cancelling its request.
    fn finish(self) {
        let Attempt {
            stream,
            cancel,
            _load,
        } = self;
        drop(stream);
        drop(cancel.disarm());
    }
}

/// What a retry or a migration needs; dropped once the first item arrives when migration
/// is off.
pub(crate) struct Retry {
    pub request: TokenRequest,
    pub ctx: RequestContext,
    pub shared: Arc<Shared>,
    /// The instance serving the request now.
    pub failed: InstanceId,
    /// Tokens streamed so far (kept only while a migration is possible).
    pub generated: Vec<u32>,
    pub migrations_left: u32,
}

impl Retry {
    /// The request a new worker continues from: the prompt plus what was streamed, with
    /// the rest of the token budget. `None` once the budget is spent.
    fn continuation(&self) -> Option<TokenRequest> {
        let done = u32::try_from(self.generated.len()).ok()?;
        let left = self.request.stop.max_tokens.checked_sub(done)?;
        if left == 0 {
            return None;
        }
        let mut next = self.request.clone();
        next.token_ids.extend_from_slice(&self.generated);
        next.stop.max_tokens = left;
        Some(next)
    }
}

pub(crate) struct RoutedStream {
    attempt: Option<Attempt>,
    retry: Option<Retry>,
    span: tracing::Span,
    /// The policy's account of the request: told of the first item, dropped at the end.
    tracker: Option<Box<dyn RequestTracker>>,
    first_seen: bool,
    /// Set after a migration: the new worker's first delta reports its own prefix-cache
    /// hits on the continuation, which are not the request's.
    migrated: bool,
    /// The one retry before the first item was used.
    retried: bool,
}

impl RoutedStream {
    pub(crate) fn new(
        attempt: Attempt,
        retry: Option<Retry>,
        span: tracing::Span,
        tracker: Option<Box<dyn RequestTracker>>,
    ) -> Self {
        RoutedStream {
            attempt: Some(attempt),
            retry,
            span,
            tracker,
            first_seen: false,
            migrated: false,
            retried: false,
        }
    }

    /// The first worker was gone: call another, once. `None` if there is none, retries
    /// are off, or the caller has already gone away.
    fn retry(&mut self, error: &ServeError) -> Option<Attempt> {
        let retry = self.retry.as_mut()?;
        if self.retried || retry.ctx.is_cancelled() || !retry.shared.retry {
            return None;
        }
        self.retried = true;
        let _entered = self.span.enter();
        let shared = &retry.shared;
        let pick = shared.loads.pick_other(&shared.set, retry.failed)?;
        tracing::debug!(failed = retry.failed, next = pick.id, %error, "worker unavailable before its first item; retrying");
        self.span.record("retried_from", retry.failed);
        self.span.record("instance", pick.id);
        if let Some(tracker) = self.tracker.as_mut() {
            tracker.moved_to(pick.id);
        }
        retry.failed = pick.id;
        Some(Attempt::start(pick, retry.request.clone(), &retry.ctx))
    }

    /// The worker died mid-stream: continue the request on another one. `None` if
    /// migration is off or spent, no other worker is live, or the caller has gone away.
    fn migrate(&mut self, error: &ServeError) -> Option<Attempt> {
        let retry = self.retry.as_mut()?;
        if retry.migrations_left == 0 || retry.ctx.is_cancelled() {
            return None;
        }
        let request = retry.continuation()?;
        let shared = retry.shared.clone();
        let pick = shared.loads.pick_other(&shared.set, retry.failed)?;
        let _entered = self.span.enter();
        tracing::warn!(
            failed = retry.failed,
            next = pick.id,
            streamed = retry.generated.len(),
            %error,
            "worker died mid-stream; migrating the request"
        );
        self.span.record("migrated_from", retry.failed);
        self.span.record("instance", pick.id);
        retry.failed = pick.id;
        retry.migrations_left -= 1;
        if let Some(tracker) = self.tracker.as_mut() {
            tracker.moved_to(pick.id);
        }
        self.migrated = true;
        Some(Attempt::start(pick, request, &retry.ctx))
    }

    /// Keeps what a migration needs of `delta`, or drops the request copy when no
    /// migration can follow.
    fn record(&mut self, delta: &mut TokenDelta) {
        if self.migrated {
            self.migrated = false;
            delta.cached_tokens = None;
        }
        let keep = match self.retry.as_mut() {
            Some(r) if r.migrations_left > 0 => {
                r.generated.extend_from_slice(&delta.token_ids);
                true
            }
            _ => false,
        };
        if !keep {
            self.retry = None;
        }
    }
}

impl Stream for RoutedStream {
    type Item = Result<TokenDelta, ServeError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let Some(attempt) = this.attempt.as_mut() else {
                return Poll::Ready(None);
            };
            // Not entered per poll (per token): see the preprocessor's stream. Retries and
            // migrations, which log, enter the span themselves.
            let polled = ready!(attempt.stream.poll_next_unpin(cx));
            match polled {
                Some(Ok(mut delta)) => {
                    this.record(&mut delta);
                    if !this.first_seen {
                        this.first_seen = true;
                        if let Some(tracker) = this.tracker.as_mut() {
                            tracker.first_token();
                        }
                    }
                    return Poll::Ready(Some(Ok(delta)));
                }
                Some(Err(error)) => {
                    if error.kind == ErrorKind::Unavailable {
                        let next = if this.first_seen {
                            this.migrate(&error)
                        } else {
                            this.retry(&error)
                        };
                        if let Some(next) = next {
                            // Replacing drops the dead attempt: its slot and request go.
                            this.attempt = Some(next);
                            continue;
                        }
                    }
                    // An error ends the call: release the worker now, not at drop.
                    this.attempt = None;
                    this.retry = None;
                    this.tracker = None;
                    return Poll::Ready(Some(Err(error)));
                }
                None => {
                    if let Some(done) = this.attempt.take() {
                        done.finish();
                    }
                    this.retry = None;
                    this.tracker = None;
                    return Poll::Ready(None);
                }
            }
        }
    }
}
