//! The prefill side of a hand-off through shared memory: the decode worker maps this
//! worker's KV pool once and copies the blocks out itself, so a chunk carries block ids,
//! not bytes.
//!
//! The blocks are pinned in the pool for the whole hand-off. A cancelled prefill stops at
//! the next chunk boundary: the chunk in flight is always answered first (its call has a
//! context of its own that the prefill's cancellation does not reach), and only then are
//! the blocks released, so the decode worker never reads a block being reused.

use std::sync::Arc;

use dynamo_protocol::{BlockHash, KvTransfer, KvTransferAck, SharedBlocks};
use dynamo_runtime::{InstanceSet, RequestContext, ServeError};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::engine::{MockerEngine, PinnedBlocks};

/// One shared-memory hand-off.
pub(super) struct SharedHandoff {
    pub engine: Arc<MockerEngine>,
    pub kv: Arc<InstanceSet<KvTransfer, KvTransferAck>>,
    pub pool: String,
    pub chunk_blocks: usize,
    pub handoff_id: String,
    pub decode_instance: u64,
}

impl SharedHandoff {
    /// Pins `hashes`, hands them over chunk by chunk and returns the bytes the decode
    /// worker copied. Dropping the future stops the hand-off at a chunk boundary.
    pub async fn run(self, hashes: &[BlockHash], ctx: &RequestContext) -> Result<u64, ServeError> {
        let pins = self.engine.pin_blocks(hashes).await?;
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
        let mut bytes = 0;
        let pairs = hashes
            .chunks(self.chunk_blocks)
            .zip(pins.ids().chunks(self.chunk_blocks));
        for (i, (chunk, ids)) in pairs.enumerate() {
            if stop.is_cancelled() {
                return Err(ServeError::cancelled());
            }
            let transfer = KvTransfer {
                handoff_id: self.handoff_id.clone(),
                hashes: chunk.to_vec(),
                payload: Vec::new(),
                layout,
                last: i + 1 == chunks,
                shared: Some(SharedBlocks {
                    pool: self.pool.clone(),
                    blocks: ids.to_vec(),
                }),
            };
            super::send_chunk(
                &self.kv,
                self.decode_instance,
                transfer,
                &ctx,
                "shared KV blocks",
            )
            .await?;
            let size = chunk.len() as u64 * block_bytes;
            self.engine.record_sent(chunk.len() as u64, size);
            bytes += size;
        }
        drop(pins);
        Ok(bytes)
    }
}
