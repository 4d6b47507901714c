//! The server's half of one request stream: decode the request, call the service, and
//! move its responses onto the connection as far as the stream's credit allows.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::frame::{self, FrameError, Header, StreamId};
use crate::edge::{Message, RequestContext, ResponseStream, Service};
use crate::error::ServeError;

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

/// Moves one response stream onto the connection until it ends or is cancelled.
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
        let (frame, last) = match next {
            Some(Ok(item)) => {
                match frame::encode(&mut buf, &Header::Response { stream_id }, Some(&item)) {
                    Ok(f) => (Some(f), false),
                    Err(e) => {
                        let error = ServeError::internal(format!("cannot encode response: {e}"));
                        (
                            encode_end(&mut buf, Header::Error { stream_id, error }),
                            true,
                        )
                    }
                }
            }
            Some(Err(error)) => (
                encode_end(&mut buf, Header::Error { stream_id, error }),
                true,
            ),
            None => (encode_end(&mut buf, Header::End { stream_id }), true),
        };
        let Some(frame) = frame else { return };
        if !last {
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
        let sent = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            r = out.frames.send(frame) => r.is_ok(),
        };
        if last || !sent {
            return;
        }
    }
}

/// Encodes a frame that carries no payload. Only an error message too large for a frame
/// can fail; a short internal error goes instead, and if even that fails the stream stops.
fn encode_end(buf: &mut BytesMut, header: Header<'_>) -> Option<Bytes> {
    let stream_id = header.stream_id();
    match frame::encode(buf, &header, None::<&()>) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode end-of-stream frame");
            let error = ServeError::internal("error message too large to send");
            frame::encode(buf, &Header::Error { stream_id, error }, None::<&()>).ok()
        }
    }
}
