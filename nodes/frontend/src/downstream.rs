//! The call to the downstream service, seen from the frontend: a stream of deltas with a
//! deadline, whose request context is cancelled if the call is abandoned (client gone,
//! timeout, error) and left alone once the response is complete.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use dynamo_protocol::TextDelta;
use dynamo_runtime::ResponseStream;
use futures::StreamExt;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, DropGuard, WaitForCancellationFutureOwned};

use crate::error::ApiError;

pub(crate) struct Call {
    stream: ResponseStream<TextDelta>,
    /// Cancels the request context when the call is dropped before it completed.
    cancel_on_drop: Option<DropGuard>,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    /// Resolves when the server stops waiting for in-flight requests (end of the grace).
    stopping: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl std::fmt::Debug for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Call")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Call {
    pub(crate) fn new(
        stream: ResponseStream<TextDelta>,
        cancel_on_drop: DropGuard,
        started: Instant,
        timeout: Duration,
        stopping: CancellationToken,
    ) -> Self {
        Call {
            stream,
            cancel_on_drop: Some(cancel_on_drop),
            deadline: Box::pin(tokio::time::sleep_until(started + timeout)),
            timeout,
            stopping: Box::pin(stopping.cancelled_owned()),
        }
    }

    /// The next delta, a downstream error, a timeout, or `None` at the end.
    pub(crate) fn poll_delta(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<TextDelta, ApiError>>> {
        match self.stream.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(delta))) => Poll::Ready(Some(Ok(delta))),
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_ready() {
                    Poll::Ready(Some(Err(ApiError::timeout(self.timeout))))
                } else if self.stopping.as_mut().poll(cx).is_ready() {
                    Poll::Ready(Some(Err(ApiError::from(
                        dynamo_runtime::ServeError::unavailable("the server is shutting down"),
                    ))))
                } else {
                    Poll::Pending
                }
            }
        }
    }

    pub(crate) async fn next_delta(&mut self) -> Option<Result<TextDelta, ApiError>> {
        poll_fn(|cx| self.poll_delta(cx)).await
    }

    /// The response is complete: dropping the call must not cancel anything any more.
    pub(crate) fn complete(&mut self) {
        if let Some(guard) = self.cancel_on_drop.take() {
            guard.disarm();
        }
    }
}

/// The error for a stream that ended without a finish reason (an instance went away).
pub(crate) fn ended_early() -> ApiError {
    ApiError::from(dynamo_runtime::ServeError::unavailable(
        "the model backend ended the response before it finished",
    ))
}
