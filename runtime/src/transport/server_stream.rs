//! The server's half of one request stream: decode the request, call the service, and
//! move its responses onto the connection as far as the stream's credit allows.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::frame::{self, FrameError, Header, StreamId};
use crate::edge::{Message, RequestContext, ResponseStream, Service};
use crate::error::ServeError;

/// Ready responses coalesced into one queue send, up to this many bytes.
const BATCH_BYTES: usize = 16 * 1024;

/// An endpoint with its types erased, so one server holds endpoints of any types.
pub(super) trait Endpoint: Send + Sync {
    /// Decodes the request, calls the service and returns the task that streams its
    /// responses into `out`.
    fn open(
        &self,
        stream_id: StreamId,
        payload: &[u8],
        ctx: RequestContext,
        out: Outbox,
    ) -> Result<BoxFuture<'static, ()>, FrameError>;
}

pub(super) struct Typed<Req, Resp> {
    pub(super) service: Arc<dyn Service<Req, Resp>>,
}

impl<Req: Message, Resp: Message> Endpoint for Typed<Req, Resp> {
    fn open(
        &self,
        stream_id: StreamId,
        payload: &[u8],
        ctx: RequestContext,
        out: Outbox,
    ) -> Result<BoxFuture<'static, ()>, FrameError> {
        let req: Req = frame::decode_payload(payload)?;
        let token = ctx.cancellation_token();
        let stream = self.service.call(req, ctx);
        Ok(Box::pin(pump(stream_id, stream, token, out)))
    }
}

/// Where one stream's frames go: the connection's writer, gated by the stream's credit.
pub(super) struct Outbox {
    pub(super) frames: mpsc::Sender<Bytes>,
    pub(super) credits: Arc<Semaphore>,
}

/// Moves one response stream onto the connection until it ends or is cancelled. Items the
/// stream already has ready (and credit allows) go out together, in one queue send and
/// one write: a unary call's response and its End travel as one.
async fn pump<Resp: Serialize>(
    stream_id: StreamId,
    mut stream: ResponseStream<Resp>,
    cancel: CancellationToken,
    out: Outbox,
) {
    let mut buf = BytesMut::with_capacity(256);
    loop {
        let next = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            next = stream.next() => next,
        };
        if matches!(next, Some(Ok(_))) {
            // Wait for the client to make room; End and Error frames need no credit.
            let credit = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                c = out.credits.acquire() => c,
            };
            match credit {
                Ok(permit) => permit.forget(),
                Err(_) => return,
            }
        }
        let mut last = append_item(&mut buf, stream_id, next);
        while !last && buf.len() < BATCH_BYTES {
            let Ok(permit) = out.credits.try_acquire() else {
                break;
            };
            // Not ready: the unused permit goes back when dropped.
            let Some(next) = stream.next().now_or_never() else {
                break;
            };
            if matches!(next, Some(Ok(_))) {
                permit.forget();
            }
            last = append_item(&mut buf, stream_id, next);
        }
        if buf.is_empty() {
            return;
        }
        let frames = buf.split().freeze();
        let sent = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            r = out.frames.send(frames) => r.is_ok(),
        };
        if last || !sent {
            return;
        }
    }
}

/// Appends the frame for one item of the service's stream; returns whether it ends it.
fn append_item<Resp: Serialize>(
    buf: &mut BytesMut,
    stream_id: StreamId,
    next: Option<Result<Resp, ServeError>>,
) -> bool {
    match next {
        Some(Ok(item)) => match frame::append(buf, &Header::Response { stream_id }, Some(&item)) {
            Ok(()) => false,
            Err(e) => {
                let error = ServeError::internal(format!("cannot encode response: {e}"));
                append_end(buf, Header::Error { stream_id, error });
                true
            }
        },
        Some(Err(error)) => {
            append_end(buf, Header::Error { stream_id, error });
            true
        }
        None => {
            append_end(buf, Header::End { stream_id });
            true
        }
    }
}

/// Appends a frame that carries no payload. Only an error message too large for a frame
/// can fail; a short internal error goes instead.
fn append_end(buf: &mut BytesMut, header: Header<'_>) {
    let stream_id = header.stream_id();
    if let Err(e) = frame::append(buf, &header, None::<&()>) {
        tracing::warn!(error = %e, "cannot encode end-of-stream frame");
        let error = ServeError::internal("error message too large to send");
        let _ = frame::append(buf, &Header::Error { stream_id, error }, None::<&()>);
    }
}
