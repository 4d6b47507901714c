//! Disaggregated serving on mocker workers: the prefill worker's `in` port
//! ([`PrefillService`]) and the decode worker's `kv` port ([`KvImportService`]).
//!
//! The prefill worker runs the prompt through its own scheduler and timing model, then
//! sends the prompt's full blocks to the decode worker the router chose, in chunks of
//! [`KV_CHUNK_BLOCKS`], with bytes fabricated from each block's hash
//! ([`crate::payload`]). Up to [`KV_WINDOW`] chunks are in flight at once, so encoding,
//! the wire and the decode worker's import overlap instead of taking turns. The decode
//! worker verifies every byte and caches the blocks under their hashes, so the router's
//! ordinary `TokenRequest` finds them as a prefix hit.
//!
//! When the prefill engine's pool is in shared memory and the decode instance is on this
//! machine (the plan chose `shm` for the link), chunks carry block ids instead of bytes
//! and the decode worker copies the blocks out of the mapped pool ([`shared`]).

mod kv_import;
mod prefill;
mod shared;

pub use kv_import::KvImportService;
pub use prefill::PrefillService;

use std::ops::Range;

use dynamo_protocol::{BlockHash, KvTransfer, KvTransferAck};
use dynamo_runtime::{InstanceSet, RequestContext, ServeError};
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// Hands one chunk to decode instance `decode` and waits for its answer; `what` names the
/// blocks in the error ("KV blocks", "shared KV blocks").
fn send_chunk(
    kv: &InstanceSet<KvTransfer, KvTransferAck>,
    decode: u64,
    transfer: KvTransfer,
    ctx: &RequestContext,
    what: &str,
) -> impl std::future::Future<Output = Result<KvTransferAck, ServeError>> + Send + 'static {
    // The call is made (its request encoded) now; it goes out when first polled. The
    // chunks of a window may reach the decode worker in any order: each names its parent.
    let mut answer = kv.call_instance(decode, transfer, ctx.child());
    let what = what.to_string();
    async move {
        match answer.next().await {
            Some(Ok(ack)) => Ok(ack),
            Some(Err(err)) => Err(ServeError::new(
                err.kind,
                format!(
                    "handing {what} to decode instance {decode}: {}",
                    err.message
                ),
            )),
            None => Err(ServeError::unavailable(format!(
                "decode instance {decode} ended a KV transfer without an answer"
            ))),
        }
    }
}

/// Sends a hand-off's `chunks` (bytes inline) to decode instance `decode` as a prefill
/// worker does, up to `window` unanswered at once; returns the payload bytes sent. For
/// `dynamo bench kv-transfer`, which times this path against raw TCP.
pub async fn send_kv_chunks(
    kv: &InstanceSet<KvTransfer, KvTransferAck>,
    decode: u64,
    chunks: impl IntoIterator<Item = KvTransfer>,
    window: usize,
    ctx: &RequestContext,
) -> Result<u64, ServeError> {
    let sender = ChunkSender {
        kv,
        decode,
        ctx,
        what: "KV blocks",
        window,
        stop: None,
    };
    // Each chunk is made when the window has room for it.
    let sized = chunks.into_iter().map(|t| {
        let in_place: usize = t.in_place.iter().map(|b| b.len()).sum();
        let bytes = (t.payload.len() + in_place) as u64;
        futures::future::ready(Ok((t, bytes)))
    });
    sender.send(sized, |_, _| {}).await
}

/// Chunk `i` of a hand-off of `hashes` in chunks of `per` blocks: its blocks' range, and
/// the chain parent of its first block (`None` for the first chunk).
fn chunk_span(hashes: &[BlockHash], i: usize, per: usize) -> (Range<usize>, Option<BlockHash>) {
    let from = (i * per).min(hashes.len());
    let to = (from + per).min(hashes.len());
    let parent = from.checked_sub(1).and_then(|p| hashes.get(p).copied());
    (from..to, parent)
}

/// Where the chunks of one hand-off go, and how many may be in flight.
struct ChunkSender<'a> {
    kv: &'a InstanceSet<KvTransfer, KvTransferAck>,
    decode: u64,
    ctx: &'a RequestContext,
    /// Names the blocks in errors ("KV blocks", "shared KV blocks").
    what: &'a str,
    window: usize,
    /// The shared-memory path's stop: once it fires no further chunk is sent, and after
    /// it or an error the chunks in flight are answered before `send` returns (the decode
    /// worker may still be reading pinned blocks). `None` (the byte path): the first error
    /// returns at once, dropping the chunks in flight, which cancels them.
    stop: Option<&'a CancellationToken>,
}

impl ChunkSender<'_> {
    /// Sends `chunks` (each made by a future that answers it and its byte count, started
    /// only when the window has room: a chunk is read out of the pool just before it is
    /// sent) keeping up to `window` unanswered, and calls `answered(blocks, bytes)` for
    /// each answered chunk, in order. Returns the bytes of all. On the first error
    /// (making a chunk or sending it) no further chunk is sent and the error is returned,
    /// as [`ChunkSender::stop`] says; once `stop` fires, likewise with
    /// [`ServeError::cancelled`]. Dropping the future drops the calls in flight, which
    /// cancels them.
    async fn send<F>(
        &self,
        chunks: impl IntoIterator<Item = F>,
        mut answered: impl FnMut(u64, u64),
    ) -> Result<u64, ServeError>
    where
        F: std::future::Future<Output = Result<(KvTransfer, u64), ServeError>>,
    {
        let mut chunks = chunks.into_iter();
        let mut in_flight = FuturesOrdered::new();
        let mut failed: Option<ServeError> = None;
        let mut total = 0;
        loop {
            while failed.is_none() && in_flight.len() < self.window.max(1) {
                if self.stop.is_some_and(CancellationToken::is_cancelled) {
                    failed = Some(ServeError::cancelled());
                    break;
                }
                let Some(make) = chunks.next() else {
                    break;
                };
                in_flight.push_back(async move {
                    let (transfer, bytes) = match make.await {
                        Ok(made) => made,
                        Err(err) => return (Err(err), 0, 0),
                    };
                    let blocks = transfer.hashes.len() as u64;
                    let call = send_chunk(self.kv, self.decode, transfer, self.ctx, self.what);
                    (call.await, blocks, bytes)
                });
            }
            match in_flight.next().await {
                None => break,
                Some((Ok(_), blocks, bytes)) => {
                    if failed.is_none() {
                        answered(blocks, bytes);
                        total += bytes;
                    }
                }
                Some((Err(err), _, _)) => {
                    if self.stop.is_none() {
                        return Err(err);
                    }
                    failed.get_or_insert(err);
                }
            }
        }
        match failed {
            Some(err) => Err(err),
            None => Ok(total),
        }
    }
}

/// Blocks per `KvTransfer` unless [`PrefillService::with_chunk_blocks`] says otherwise:
/// about 3 MiB per call for SmolLM2-135M.
pub const KV_CHUNK_BLOCKS: usize = 8;

/// Chunks of one hand-off in flight at once unless [`PrefillService::with_window`] says
/// otherwise: 4 × 8 blocks, about 12 MiB for SmolLM2-135M (see the README's TCP figure).
pub const KV_WINDOW: usize = 4;
