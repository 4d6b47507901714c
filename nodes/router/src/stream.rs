//! The response stream the router hands back: the chosen worker's stream, wrapped so the
//! instance's in-flight counter is released when it ends, fails or is dropped, dropping
//! it cancels the worker's request, and a worker found dead before its first item is
//! replaced once by another.

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

/// What a retry needs; dropped once the first item arrives.
pub(crate) struct Retry {
    pub request: TokenRequest,
    pub ctx: RequestContext,
    pub shared: Arc<Shared>,
    pub failed: InstanceId,
}

pub(crate) struct RoutedStream {
    attempt: Option<Attempt>,
    retry: Option<Retry>,
    span: tracing::Span,
    /// The policy's account of the request: told of the first item, dropped at the end.
    tracker: Option<Box<dyn RequestTracker>>,
    first_seen: bool,
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
        }
    }

    /// The first worker was gone: call another, once. `None` if there is none or the
    /// caller has already gone away.
    fn retry(&mut self, error: &ServeError) -> Option<Attempt> {
        let retry = self.retry.take()?;
        if retry.ctx.is_cancelled() {
            return None;
        }
        let _entered = self.span.enter();
        let shared = &retry.shared;
        let pick = shared.loads.pick_other(&shared.set, retry.failed)?;
        tracing::debug!(failed = retry.failed, next = pick.id, %error, "worker unavailable before its first item; retrying");
        self.span.record("retried_from", retry.failed);
        self.span.record("instance", pick.id);
        if let Some(tracker) = self.tracker.as_mut() {
            tracker.moved_to(pick.id);
        }
        Some(Attempt::start(pick, retry.request, &retry.ctx))
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
            let polled = {
                let _entered = this.span.enter();
                ready!(attempt.stream.poll_next_unpin(cx))
            };
            match polled {
                Some(Ok(delta)) => {
                    this.retry = None;
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
                        if let Some(next) = this.retry(&error) {
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
