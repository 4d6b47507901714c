//! The decode worker's `kv` input port: caches the blocks a prefill worker hands over.

use std::sync::Arc;

use dynamo_protocol::{KvTransfer, KvTransferAck};
use dynamo_runtime::kv_transfer::ShmPeers;
use dynamo_runtime::{telemetry, RequestContext, ResponseStream, ServeError, Service};
use tracing::Instrument;

use crate::engine::MockerEngine;

/// `Service<KvTransfer, KvTransferAck>` over a decode worker's engine. Each chunk names
/// its chain parent, so the chunks of one hand-off are imported as they come, several at
/// once and in any order (the prefill side keeps a window of them in flight); the ack
/// counts the chunk's blocks now cached. Nothing is kept between chunks: a hand-off
/// whose sender stopped halfway leaves only the blocks that arrived, cached like any.
pub struct KvImportService {
    engine: Arc<MockerEngine>,
    /// The shared pools of prefill workers on this machine, each mapped once.
    peers: Arc<ShmPeers>,
}

impl KvImportService {
    pub fn new(engine: Arc<MockerEngine>) -> Self {
        KvImportService {
            engine,
            peers: Arc::new(ShmPeers::new()),
        }
    }
}

async fn import(
    engine: Arc<MockerEngine>,
    peers: Arc<ShmPeers>,
    transfer: KvTransfer,
    ctx: RequestContext,
) -> Result<KvTransferAck, ServeError> {
    if ctx.is_cancelled() {
        return Err(ServeError::cancelled());
    }
    let KvTransfer {
        handoff_id,
        hashes,
        parent,
        payload,
        layout,
        last,
        shared,
        // Only the sender's: a chunk arrives with its bytes in `payload`.
        in_place: _,
    } = transfer;
    let result = match shared {
        None => {
            engine
                .import_blocks(parent, &hashes, payload, &layout)
                .await
        }
        // A worker whose pool is on a GPU opens the sender's GPU pool (CUDA IPC): the plan
        // links only workers whose KV lives in the same memory domain.
        Some(shared) if engine.gpu_pool().is_some() => {
            engine
                .import_gpu(parent, &hashes, shared.pool, shared.blocks, &layout)
                .await
        }
        Some(shared) => match peers.get(&shared.pool) {
            Ok(peer) => {
                engine
                    .import_shared(parent, &hashes, peer, shared.blocks, &layout)
                    .await
            }
            Err(e) => Err(ServeError::unavailable(e.to_string())),
        },
    };
    match result {
        Ok(blocks) => {
            tracing::debug!(
                request_id = %ctx.request_id,
                handoff_id,
                blocks,
                last,
                "mocker: KV blocks imported"
            );
            Ok(KvTransferAck { blocks })
        }
        Err(err) => {
            tracing::warn!(request_id = %ctx.request_id, handoff_id, %err, "mocker: KV transfer refused");
            Err(err)
        }
    }
}

impl Service<KvTransfer, KvTransferAck> for KvImportService {
    fn call(&self, req: KvTransfer, ctx: RequestContext) -> ResponseStream<KvTransferAck> {
        // One span per chunk received, a child of the prefill worker's `kv_handoff`.
        let span = tracing::info_span!(
            "kv_import",
            request_id = %ctx.request_id,
            handoff_id = %req.handoff_id,
            blocks = req.hashes.len(),
            bytes = req.payload.len(),
            last = req.last,
        );
        telemetry::follow(&span, &ctx);
        let fut = import(self.engine.clone(), self.peers.clone(), req, ctx);
        Box::pin(futures::stream::once(fut.instrument(span)))
    }
}
