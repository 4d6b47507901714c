//! The server's half of one NATS call: decode the request, call the service, and publish
//! its responses on the call's reply subject, numbered, as far as the stream's credit
//! allows. Frames that are ready together go out in one message, and messages of several
//! calls that are ready together in one batch ([`super::batch`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::batch::Batcher;
use super::wire::{self, ServerFrame, WireError};
use crate::edge::{Message, RequestContext, ResponseStream, Service};
use crate::error::ServeError;

/// Ready responses coalesced into one message, up to this many bytes.
const BATCH_BYTES: usize = 16 * 1024;

/// An endpoint with its types erased, so one server holds endpoints of any types.
pub(super) trait Endpoint: Send + Sync {
    fn open(
        &self,
        payload: &[u8],
        ctx: RequestContext,
        out: Outbox,
    ) -> Result<BoxFuture<'static, ()>, WireError>;
}

pub(super) struct Typed<Req, Resp> {
    pub(super) service: Arc<dyn Service<Req, Resp>>,
}

impl<Req: Message, Resp: Message> Endpoint for Typed<Req, Resp> {
    fn open(
        &self,
        payload: &[u8],
        ctx: RequestContext,
        out: Outbox,
    ) -> Result<BoxFuture<'static, ()>, WireError> {
        let req: Req = wire::decode_payload(payload)?;
        let token = ctx.cancellation_token();
        let stream = self.service.call(req, ctx);
        Ok(Box::pin(pump(stream, token, out)))
    }
}

/// Where one stream's frames go.
pub(super) struct Outbox {
    pub(super) batch: Batcher,
    /// The caller reads batches ([`super::wire::BATCH`]).
    pub(super) batchable: bool,
    pub(super) reply: async_nats::Subject,
    pub(super) instance: u64,
    pub(super) control: Arc<str>,
    pub(super) credits: Arc<Semaphore>,
    /// Set whenever a message goes out; the heartbeat ticker clears it.
    pub(super) sent: Arc<AtomicBool>,
    /// Longest the stream waits for the client to take responses before giving up on it.
    pub(super) stall_timeout: Duration,
}

impl Outbox {
    fn publish(&self, buf: &mut BytesMut) -> bool {
        self.sent.store(true, Ordering::Relaxed);
        let body = buf.split().freeze();
        self.batch.send(&self.reply, body, self.batchable)
    }
}

async fn pump<Resp: Serialize>(
    mut stream: ResponseStream<Resp>,
    cancel: CancellationToken,
    out: Outbox,
) {
    let mut buf = BytesMut::with_capacity(256);
    let mut seq = 0u64;
    let accepted = ServerFrame::Accepted {
        seq,
        instance: out.instance,
        control: &out.control,
    };
    if wire::append(&mut buf, &accepted, None::<&()>).is_err() {
        return;
    }
    seq += 1;
    let mut last = false;
    loop {
        // Everything the service has ready (and credit allows) joins this message.
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
            last = append_item(&mut buf, &mut seq, next);
        }
        if !buf.is_empty() && (cancel.is_cancelled() || !out.publish(&mut buf)) {
            return;
        }
        if last {
            return;
        }
        let next = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            next = stream.next() => next,
        };
        if matches!(next, Some(Ok(_))) {
            // Wait for the client to make room; End and Error need no credit.
            let credit = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                c = tokio::time::timeout(out.stall_timeout, out.credits.acquire()) => c,
            };
            match credit {
                Ok(Ok(permit)) => permit.forget(),
                Ok(Err(_)) => return,
                Err(_) => {
                    let error = ServeError::unavailable(format!(
                        "the caller took no response for {:?}; stream abandoned",
                        out.stall_timeout
                    ));
                    append_end(&mut buf, &mut seq, error);
                    let _ = out.publish(&mut buf);
                    return;
                }
            }
        }
        last = append_item(&mut buf, &mut seq, next);
    }
}

/// Appends the frame for one item of the service's stream; returns whether it ends it.
fn append_item<Resp: Serialize>(
    buf: &mut BytesMut,
    seq: &mut u64,
    next: Option<Result<Resp, ServeError>>,
) -> bool {
    match next {
        Some(Ok(item)) => match wire::append(buf, &ServerFrame::Item { seq: *seq }, Some(&item)) {
            Ok(()) => {
                *seq += 1;
                false
            }
            Err(e) => {
                append_end(
                    buf,
                    seq,
                    ServeError::internal(format!("cannot encode response: {e}")),
                );
                true
            }
        },
        Some(Err(error)) => {
            append_end(buf, seq, error);
            true
        }
        None => {
            let _ = wire::append(buf, &ServerFrame::End { seq: *seq }, None::<&()>);
            *seq += 1;
            true
        }
    }
}

fn append_end(buf: &mut BytesMut, seq: &mut u64, error: ServeError) {
    let frame = ServerFrame::Error { seq: *seq, error };
    if let Err(e) = wire::append(buf, &frame, None::<&()>) {
        tracing::warn!(error = %e, "cannot encode error frame");
        let error = ServeError::internal("error message too large to send");
        let _ = wire::append(buf, &ServerFrame::Error { seq: *seq, error }, None::<&()>);
    }
    *seq += 1;
}

/// A message with one error frame (`seq` 0), for a call refused before it started.
pub(super) fn refusal(error: ServeError) -> bytes::Bytes {
    let mut buf = BytesMut::new();
    append_end(&mut buf, &mut 0, error);
    buf.freeze()
}
