//! The prefill worker's `in` port: prefill a prompt, hand its blocks to a decode worker.

use std::collections::BTreeSet;
use std::sync::Arc;

use dynamo_protocol::{
    block_hashes, FinishReason, KvTransfer, KvTransferAck, PrefillRequest, PrefillResult,
    StopConditions, TokenRequest,
};
use dynamo_runtime::kv_transfer::ShmPeers;
use dynamo_runtime::{telemetry, InstanceSet, RequestContext, ResponseStream, ServeError, Service};
use futures::StreamExt;
use tracing::Instrument;

use super::shared::{SharedHandoff, Via};
use super::{chunk_span, ChunkSender, KV_CHUNK_BLOCKS, KV_WINDOW};
use crate::engine::MockerEngine;

/// `Service<PrefillRequest, PrefillResult>` over a prefill worker's engine and its `kv`
/// output (one instance per decode worker). Answers once the decode worker holds every
/// full block of the prompt. Cancelling the context or dropping the stream stops it at
/// once: the engine frees the prefill's blocks and no further chunk is sent.
pub struct PrefillService {
    engine: Arc<MockerEngine>,
    kv: Arc<InstanceSet<KvTransfer, KvTransferAck>>,
    chunk_blocks: usize,
    window: usize,
    shm_instances: Arc<BTreeSet<u64>>,
    tcp_instances: Arc<BTreeSet<u64>>,
    cuda_instances: Arc<BTreeSet<u64>>,
    /// This worker's own shared pool, mapped once, for chunks sent from it in place.
    own_pool: Arc<ShmPeers>,
}

impl PrefillService {
    pub fn new(engine: Arc<MockerEngine>, kv: Arc<InstanceSet<KvTransfer, KvTransferAck>>) -> Self {
        PrefillService {
            engine,
            kv,
            chunk_blocks: KV_CHUNK_BLOCKS,
            window: KV_WINDOW,
            shm_instances: Arc::default(),
            tcp_instances: Arc::default(),
            cuda_instances: Arc::default(),
            own_pool: Arc::default(),
        }
    }

    /// The decode instances reached by CUDA IPC (same machine, KV on GPUs): when this
    /// worker's pool is on a GPU, they get block ids and copy the blocks device to device
    /// out of it themselves.
    pub fn with_cuda_instances(mut self, instances: BTreeSet<u64>) -> Self {
        self.cuda_instances = Arc::new(instances);
        self
    }

    /// The decode instances reached through shared memory (same machine): when this
    /// worker's pool is shared, they get block ids and copy the bytes themselves.
    pub fn with_shm_instances(mut self, instances: BTreeSet<u64>) -> Self {
        self.shm_instances = Arc::new(instances);
        self
    }

    /// The decode instances reached over a `tcp` link (bulk calls): when this worker's
    /// pool is shared, their chunks are written to the connection straight from the
    /// pool's pinned blocks instead of being exported into a buffer first.
    pub fn with_tcp_instances(mut self, instances: BTreeSet<u64>) -> Self {
        self.tcp_instances = Arc::new(instances);
        self
    }

    /// Blocks per `KvTransfer` (at least 1).
    pub fn with_chunk_blocks(mut self, blocks: usize) -> Self {
        self.chunk_blocks = blocks.max(1);
        self
    }

    /// Chunks of one hand-off in flight at once (at least 1: each chunk waits for the
    /// answer to the one before).
    pub fn with_window(mut self, chunks: usize) -> Self {
        self.window = chunks.max(1);
        self
    }
}

impl Service<PrefillRequest, PrefillResult> for PrefillService {
    fn call(&self, req: PrefillRequest, ctx: RequestContext) -> ResponseStream<PrefillResult> {
        let job = Prefill {
            engine: self.engine.clone(),
            kv: self.kv.clone(),
            chunk_blocks: self.chunk_blocks,
            window: self.window,
            shm_instances: self.shm_instances.clone(),
            tcp_instances: self.tcp_instances.clone(),
            cuda_instances: self.cuda_instances.clone(),
            own_pool: self.own_pool.clone(),
        };
        // The prefill worker's hop: the engine's spans and the KV hand-off under it.
        let span = tracing::info_span!(
            "prefill",
            request_id = %ctx.request_id,
            handoff_id = %req.handoff_id,
            decode_instance = req.decode_instance,
            prompt_tokens = req.request.token_ids.len(),
            cached_tokens = tracing::field::Empty,
        );
        telemetry::follow(&span, &ctx);
        let ctx = telemetry::child_context(&ctx, &span);
        Box::pin(futures::stream::once(
            async move {
                tokio::select! {
                    biased;
                    _ = ctx.cancelled() => Err(ServeError::cancelled()),
                    result = job.run(req, &ctx) => result,
                }
            }
            .instrument(span),
        ))
    }
}

struct Prefill {
    engine: Arc<MockerEngine>,
    kv: Arc<InstanceSet<KvTransfer, KvTransferAck>>,
    chunk_blocks: usize,
    window: usize,
    shm_instances: Arc<BTreeSet<u64>>,
    tcp_instances: Arc<BTreeSet<u64>>,
    cuda_instances: Arc<BTreeSet<u64>>,
    own_pool: Arc<ShmPeers>,
}

impl Prefill {
    async fn run(
        &self,
        req: PrefillRequest,
        ctx: &RequestContext,
    ) -> Result<PrefillResult, ServeError> {
        let PrefillRequest {
            request,
            handoff_id,
            decode_instance,
        } = req;
        let prompt_tokens = u32::try_from(request.token_ids.len())
            .map_err(|_| ServeError::invalid("the prompt is longer than 2^32 tokens"))?;
        let config = self.engine.config();
        let hashes = block_hashes(&request.token_ids, config.block_size, config.hash_seed);
        let cached_tokens = self.compute(request, ctx).await?;
        tracing::Span::current().record("cached_tokens", cached_tokens);
        // The hand-off's span: blocks and bytes sent, its duration the span's own.
        let handoff = tracing::info_span!(
            "kv_handoff",
            decode_instance,
            blocks = hashes.len(),
            chunks = tracing::field::Empty,
            bytes = tracing::field::Empty,
        );
        let ctx = &telemetry::child_context(ctx, &handoff);
        let bytes = self
            .hand_off(&handoff_id, decode_instance, &hashes, ctx)
            .instrument(handoff.clone())
            .await?;
        handoff.record("bytes", bytes);
        drop(handoff);
        let blocks = u32::try_from(hashes.len()).unwrap_or(u32::MAX);
        tracing::debug!(
            request_id = %ctx.request_id,
            handoff_id,
            decode_instance,
            blocks,
            bytes,
            "mocker: prefill handed off"
        );
        Ok(PrefillResult {
            prompt_tokens,
            cached_tokens,
            blocks,
            bytes,
        })
    }

    /// Sends the prompt's blocks to `decode_instance` in chunks; returns the bytes sent.
    async fn hand_off(
        &self,
        handoff_id: &str,
        decode_instance: u64,
        hashes: &[dynamo_protocol::BlockHash],
        ctx: &RequestContext,
    ) -> Result<u64, ServeError> {
        // A pool the decode worker opens by name: on the GPU (CUDA IPC) or in shared memory.
        let by_name = (self.engine.gpu_pool())
            .filter(|_| self.cuda_instances.contains(&decode_instance))
            .or_else(|| {
                (self.engine.shared_pool())
                    .filter(|_| self.shm_instances.contains(&decode_instance))
            });
        let via = match (by_name, self.engine.shared_pool()) {
            (Some(pool), _) => Some(Via::Ids {
                pool: pool.to_string(),
            }),
            (None, Some(pool)) if self.tcp_instances.contains(&decode_instance) => {
                match self.own_pool.get(pool) {
                    Ok(mapped) => Some(Via::InPlace(mapped)),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot map this worker's own KV pool; exporting the blocks instead");
                        None
                    }
                }
            }
            _ => None,
        };
        if let Some(via) = via {
            let shared = SharedHandoff {
                engine: self.engine.clone(),
                kv: self.kv.clone(),
                via,
                chunk_blocks: self.chunk_blocks,
                window: self.window,
                handoff_id: handoff_id.to_string(),
                decode_instance,
            };
            return shared.run(hashes, ctx).await;
        }
        let block_bytes = self.engine.block_bytes();
        let layout = self.engine.kv_layout();
        let chunks = hashes.len().div_ceil(self.chunk_blocks);
        tracing::Span::current().record("chunks", chunks);
        // The blocks are cached now; held, none is evicted before its chunk is read out of
        // the pool, just before it is sent. So the export overlaps the sending, and at
        // most a window of chunks is in memory at once, however long the prompt.
        let held = self.engine.hold_blocks(hashes).await?;
        let per_chunk = self.chunk_blocks;
        let engine = &self.engine;
        let transfers = (0..chunks).map(|i| {
            let (range, parent) = chunk_span(hashes, i, per_chunk);
            let chunk = hashes.get(range).unwrap_or_default();
            async move {
                let payload = engine.export_blocks(chunk).await?;
                if payload.len() != chunk.len() * block_bytes {
                    return Err(ServeError::internal("the engine exported too few KV bytes"));
                }
                let bytes = payload.len() as u64;
                let transfer = KvTransfer {
                    handoff_id: handoff_id.to_string(),
                    hashes: chunk.to_vec(),
                    parent,
                    payload,
                    layout,
                    last: i + 1 == chunks,
                    shared: None,
                    in_place: Vec::new(),
                };
                Ok((transfer, bytes))
            }
        });
        let sender = ChunkSender {
            kv: &self.kv,
            decode: decode_instance,
            ctx,
            what: "KV blocks",
            window: self.window,
            // The prefill's cancellation drops this future, and with it the chunks in flight.
            stop: None,
        };
        let sent = sender
            .send(transfers, |blocks, bytes| {
                self.engine.record_sent(blocks, bytes)
            })
            .await;
        drop(held);
        sent
    }

    /// Runs the prompt through the engine as a one-token request; returns the prompt
    /// tokens found in this worker's cache.
    async fn compute(
        &self,
        request: TokenRequest,
        ctx: &RequestContext,
    ) -> Result<u32, ServeError> {
        let request = TokenRequest {
            stop: StopConditions {
                max_tokens: 1,
                ignore_eos: true,
                ..request.stop
            },
            ..request
        };
        let mut deltas = self.engine.call(request, ctx.child());
        let mut cached_tokens = 0;
        while let Some(delta) = deltas.next().await {
            let delta = delta?;
            if let Some(cached) = delta.cached_tokens {
                cached_tokens = cached;
            }
            match delta.finish_reason {
                None => {}
                Some(FinishReason::Cancelled) => return Err(ServeError::cancelled()),
                Some(_) => return Ok(cached_tokens),
            }
        }
        Err(ServeError::internal(
            "the engine ended the prefill without finishing it",
        ))
    }
}
