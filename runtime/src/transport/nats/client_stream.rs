//! The response stream a NATS client hands out: decodes items as the consumer polls,
//! returns flow-control credit as items are taken, and on drop (before the server ended
//! it) tells the server to cancel the call.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::Stream;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::client::Shared;
use super::wire;
use crate::edge::{Message, RequestContext};
use crate::error::ServeError;

/// What the client's reader hands a stream.
pub(super) enum Incoming {
    Accepted { control: Arc<str> },
    Item(Bytes),
    End,
    Error(ServeError),
}

/// A call whose request has been sent.
pub(super) struct Open {
    rx: mpsc::Receiver<Incoming>,
    guard: StreamGuard,
    consumed: u32,
    credit_batch: u32,
    /// One of the endpoint's in-flight slots, held until the call ends.
    _slot: OwnedSemaphorePermit,
}

impl Open {
    pub(super) fn new(
        rx: mpsc::Receiver<Incoming>,
        guard: StreamGuard,
        window: u32,
        slot: OwnedSemaphorePermit,
    ) -> Self {
        Open {
            rx,
            guard,
            consumed: 0,
            credit_batch: (window / 2).max(1),
            _slot: slot,
        }
    }

    /// Counts one taken item; every half window, returns that much credit.
    fn took_one(&mut self) {
        self.consumed += 1;
        if self.consumed >= self.credit_batch {
            if let Some(control) = &self.guard.control {
                let n = std::mem::take(&mut self.consumed);
                self.guard.shared.credit(self.guard.stream_id, control, n);
            }
        }
    }
}

/// Forgets a call and, unless it ended on its own, cancels it on the server.
pub(super) struct StreamGuard {
    shared: Arc<Shared>,
    stream_id: u64,
    control: Option<Arc<str>>,
    finished: bool,
}

impl StreamGuard {
    pub(super) fn new(shared: Arc<Shared>, stream_id: u64) -> Self {
        StreamGuard {
            shared,
            stream_id,
            control: None,
            finished: false,
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.shared
            .release(self.stream_id, self.control.as_ref(), self.finished);
    }
}

enum State {
    Opening(BoxFuture<'static, Result<Open, ServeError>>),
    Open(Open),
    Done,
}

pub(super) struct ClientStream<Resp> {
    state: State,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    target: Arc<str>,
    _types: PhantomData<fn() -> Resp>,
}

impl<Resp: Message> ClientStream<Resp> {
    pub(super) fn new(
        open: BoxFuture<'static, Result<Open, ServeError>>,
        ctx: &RequestContext,
        target: Arc<str>,
    ) -> Self {
        ClientStream {
            state: State::Opening(open),
            cancelled: Box::pin(ctx.cancellation_token().cancelled_owned()),
            target,
            _types: PhantomData,
        }
    }

    fn finish(
        &mut self,
        item: Option<Result<Resp, ServeError>>,
        ended_by_server: bool,
    ) -> Poll<Option<Result<Resp, ServeError>>> {
        if let State::Open(open) = &mut self.state {
            open.guard.finished = ended_by_server;
        }
        self.state = State::Done;
        Poll::Ready(item)
    }
}

impl<Resp: Message> Stream for ClientStream<Resp> {
    type Item = Result<Resp, ServeError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let received = loop {
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Opening(open) => match open.as_mut().poll(cx) {
                    Poll::Ready(Ok(o)) => this.state = State::Open(o),
                    Poll::Ready(Err(e)) => return this.finish(Some(Err(e)), true),
                    Poll::Pending => break Poll::Pending,
                },
                State::Open(open) => match open.rx.poll_recv(cx) {
                    Poll::Ready(Some(Incoming::Accepted { control, .. })) => {
                        open.guard.control = Some(control);
                    }
                    other => break other,
                },
            }
        };
        match received {
            Poll::Ready(Some(Incoming::Item(bytes))) => {
                if let State::Open(open) = &mut this.state {
                    open.took_one();
                }
                match wire::decode_payload(&bytes) {
                    Ok(item) => Poll::Ready(Some(Ok(item))),
                    Err(e) => {
                        let msg = format!("cannot decode response from {}: {e}", this.target);
                        this.finish(Some(Err(ServeError::internal(msg))), false)
                    }
                }
            }
            Poll::Ready(Some(Incoming::End)) => this.finish(None, true),
            // Errors the reader raised (timeout, gap) already cancelled the server side.
            Poll::Ready(Some(Incoming::Error(e))) => this.finish(Some(Err(e)), true),
            Poll::Ready(Some(Incoming::Accepted { .. })) => {
                let msg = format!("{} accepted the call twice", this.target);
                this.finish(Some(Err(ServeError::internal(msg))), false)
            }
            Poll::Ready(None) => {
                let msg = format!(
                    "responses from {} stopped without an end (client closed or window overrun)",
                    this.target
                );
                this.finish(Some(Err(ServeError::unavailable(msg))), false)
            }
            Poll::Pending if this.cancelled.as_mut().poll(cx).is_ready() => {
                this.finish(Some(Err(ServeError::cancelled())), false)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
