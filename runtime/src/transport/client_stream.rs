//! The response stream a socket client hands out: decodes items as the consumer polls,
//! returns flow-control credit as items are taken, and on drop (before the server ended
//! it) tells the server to cancel the request.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::frame::{self, Header, StreamId};
use super::socket_client::Connection;
use crate::edge::{Message, RequestContext};
use crate::error::ServeError;

/// What the connection's reader hands a stream.
pub(super) enum Incoming {
    Item(Bytes),
    End,
    Error(ServeError),
}

/// A stream whose request has been sent.
pub(super) struct Open {
    rx: mpsc::Receiver<Incoming>,
    guard: StreamGuard,
    /// Items taken since credit was last returned, and when to return it.
    consumed: u32,
    credit_batch: u32,
}

impl Open {
    pub(super) fn new(rx: mpsc::Receiver<Incoming>, guard: StreamGuard, window: u32) -> Self {
        Open {
            rx,
            guard,
            consumed: 0,
            credit_batch: (window / 2).max(1),
        }
    }

    /// Counts one taken item; every half window, returns that much credit to the server.
    fn took_one(&mut self) {
        self.consumed += 1;
        if self.consumed >= self.credit_batch {
            let n = std::mem::take(&mut self.consumed);
            let stream_id = self.guard.stream_id;
            send_control(&self.guard.conn, &Header::Credit { stream_id, n });
        }
    }
}

/// Unregisters a stream and, unless it ended on its own, tells the server to cancel it.
pub(super) struct StreamGuard {
    pub(super) conn: Arc<Connection>,
    stream_id: StreamId,
    finished: bool,
}

impl StreamGuard {
    pub(super) fn new(conn: Arc<Connection>, stream_id: StreamId) -> Self {
        StreamGuard {
            conn,
            stream_id,
            finished: false,
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.conn.streams().remove(&self.stream_id);
        if !self.finished {
            let stream_id = self.stream_id;
            send_control(&self.conn, &Header::Cancel { stream_id });
        }
    }
}

/// Queues a small control frame without waiting; if the writer's queue is full it goes
/// out from a task behind the frames already waiting.
fn send_control(conn: &Connection, header: &Header<'_>) {
    if conn.closed.is_cancelled() {
        return;
    }
    let Ok(frame) = frame::encode(&mut BytesMut::new(), header, None::<&()>) else {
        return;
    };
    if let Err(mpsc::error::TrySendError::Full(frame)) = conn.out.try_send(frame) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let out = conn.out.clone();
            rt.spawn(async move { out.send(frame).await });
        }
    }
}

enum State {
    Opening(BoxFuture<'static, Result<Open, ServeError>>),
    Open(Open),
    Done,
}

pub(super) struct ClientStream<Resp> {
    state: State,
    /// The caller's context: its cancellation cancels the server's request too.
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    path: Arc<str>,
    _types: PhantomData<fn() -> Resp>,
}

impl<Resp: Message> ClientStream<Resp> {
    pub(super) fn new(
        open: BoxFuture<'static, Result<Open, ServeError>>,
        ctx: &RequestContext,
        path: Arc<str>,
    ) -> Self {
        ClientStream {
            state: State::Opening(open),
            cancelled: Box::pin(ctx.cancellation_token().cancelled_owned()),
            path,
            _types: PhantomData,
        }
    }

    /// Ends the stream with `item`. `ended_by_server`: nothing left to cancel upstream.
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
                State::Open(open) => break open.rx.poll_recv(cx),
            }
        };
        match received {
            Poll::Ready(Some(Incoming::Item(bytes))) => {
                if let State::Open(open) = &mut this.state {
                    open.took_one();
                }
                match frame::decode_payload(&bytes) {
                    Ok(item) => Poll::Ready(Some(Ok(item))),
                    Err(e) => {
                        let msg = format!("cannot decode response: {e}");
                        this.finish(Some(Err(ServeError::internal(msg))), false)
                    }
                }
            }
            Poll::Ready(Some(Incoming::End)) => this.finish(None, true),
            Poll::Ready(Some(Incoming::Error(e))) => this.finish(Some(Err(e)), true),
            Poll::Ready(None) => {
                let msg = format!("connection to {} lost mid-stream", this.path);
                // The connection is gone: there is no one to send a Cancel to.
                this.finish(Some(Err(ServeError::unavailable(msg))), true)
            }
            // Only checked while idle, so a busy stream pays nothing for it.
            Poll::Pending if this.cancelled.as_mut().poll(cx).is_ready() => {
                this.finish(Some(Err(ServeError::cancelled())), false)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
