//! The prefill side of a hand-off through shared memory: the decode worker maps this
//! worker's KV pool once and copies the blocks out itself, so a chunk carries block ids,
//! not bytes. The same hand-off over a `tcp` link (`Via::InPlace`): each chunk carries
//! slices of this worker's own mapped pool, which the bulk call writes to the connection
//! from where they are, with no export copy.
//!
//! The blocks are pinned in the pool for the whole hand-off. A cancelled prefill sends no
//! further chunk, but the chunks in flight (up to the window) are always answered first
//! (their calls have a context of their own that the prefill's cancellation does not
//! reach), and only then are the blocks released, so the decode worker never reads a
//! block being reused.

use std::sync::Arc;

use bytes::Bytes;
use dynamo_protocol::{BlockHash, KvTransfer, KvTransferAck, SharedBlocks};
use dynamo_runtime::kv_transfer::ShmPeer;
use dynamo_runtime::{InstanceSet, RequestContext, ServeError};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{chunk_span, ChunkSender};
use crate::engine::{MockerEngine, PinnedBlocks};

/// How the decode worker gets the pinned blocks' bytes.
pub(super) enum Via {
    /// It maps the pool `pool` itself: chunks carry block ids.
    Ids { pool: String },
    /// It is on another machine: chunks carry slices of this mapping of the own pool.
    InPlace(Arc<ShmPeer>),
}

/// A pinned block of the own pool's mapping, for `Bytes::from_owner`.
struct PoolBlock {
    pool: Arc<ShmPeer>,
    id: u32,
    len: usize,
}

impl AsRef<[u8]> for PoolBlock {
    fn as_ref(&self) -> &[u8] {
        // Checked when the chunk was made.
        self.pool.block(self.id, self.len).unwrap_or_default()
    }
}

/// Slices of `pool`'s blocks `ids`, each `len` bytes.
fn in_place(pool: &Arc<ShmPeer>, ids: &[u32], len: usize) -> Result<Vec<Bytes>, ServeError> {
    ids.iter()
        .map(|&id| {
            pool.block(id, len)
                .map_err(|e| ServeError::internal(e.to_string()))?;
            Ok(Bytes::from_owner(PoolBlock {
                pool: pool.clone(),
                id,
                len,
            }))
        })
        .collect()
}

/// One hand-off of pinned blocks.
pub(super) struct SharedHandoff {
    pub engine: Arc<MockerEngine>,
    pub kv: Arc<InstanceSet<KvTransfer, KvTransferAck>>,
    pub via: Via,
    pub chunk_blocks: usize,
    pub window: usize,
    pub handoff_id: String,
    pub decode_instance: u64,
}

impl SharedHandoff {
    /// Pins `hashes`, hands them over chunk by chunk and returns the bytes the decode
    /// worker copied. Dropping the future stops the hand-off at a chunk boundary.
    pub async fn run(self, hashes: &[BlockHash], ctx: &RequestContext) -> Result<u64, ServeError> {
        let pins = self.engine.pin_blocks(hashes).await?;
        tracing::debug!(
            blocks = hashes.len(),
            in_place = matches!(self.via, Via::InPlace(_)),
            "mocker: handing off pinned KV blocks"
        );
        let stop = CancellationToken::new();
        // Fires when this future is dropped (the prefill was cancelled) or returns.
        let _stop = stop.clone().drop_guard();
        let hashes = hashes.to_vec();
        let ctx = RequestContext::with_token(
            ctx.request_id.clone(),
            ctx.traceparent.clone(),
            CancellationToken::new(),
        );
        let span = tracing::Span::current();
        let task =
            tokio::spawn(async move { self.send(hashes, pins, ctx, stop).await }.instrument(span));
        task.await
            .map_err(|e| ServeError::internal(format!("the KV hand-off task failed: {e}")))?
    }

    async fn send(
        self,
        hashes: Vec<BlockHash>,
        pins: PinnedBlocks,
        ctx: RequestContext,
        stop: CancellationToken,
    ) -> Result<u64, ServeError> {
        let block_bytes = self.engine.block_bytes() as u64;
        let layout = self.engine.kv_layout();
        let chunks = hashes.len().div_ceil(self.chunk_blocks);
        tracing::Span::current().record("chunks", chunks);
        let per_chunk = self.chunk_blocks;
        let ids = pins.ids();
        // By index, not by `chunks()`: a closure over borrowed chunks is not `Send` here.
        let transfers = (0..chunks).map(|i| {
            let (range, parent) = chunk_span(&hashes, i, per_chunk);
            let chunk = hashes.get(range.clone()).unwrap_or_default();
            let blocks = ids.get(range).unwrap_or_default();
            let mut transfer = KvTransfer {
                handoff_id: self.handoff_id.clone(),
                hashes: chunk.to_vec(),
                parent,
                payload: Vec::new(),
                layout,
                last: i + 1 == chunks,
                shared: None,
                in_place: Vec::new(),
            };
            let made = match &self.via {
                Via::Ids { pool } => {
                    transfer.shared = Some(SharedBlocks {
                        pool: pool.clone(),
                        blocks: blocks.to_vec(),
                    });
                    Ok(())
                }
                Via::InPlace(pool) => in_place(pool, blocks, block_bytes as usize)
                    .map(|parts| transfer.in_place = parts),
            };
            futures::future::ready(made.map(|()| (transfer, chunk.len() as u64 * block_bytes)))
        });
        let sender = ChunkSender {
            kv: &self.kv,
            decode: self.decode_instance,
            ctx: &ctx,
            what: match self.via {
                Via::Ids { .. } => "shared KV blocks",
                Via::InPlace(_) => "KV blocks",
            },
            window: self.window,
            stop: Some(&stop),
        };
        let bytes = sender
            .send(transfers, |blocks, bytes| {
                self.engine.record_sent(blocks, bytes)
            })
            .await?;
        drop(pins);
        Ok(bytes)
    }
}
