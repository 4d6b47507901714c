//! The decode worker's `kv` input port: caches the blocks a prefill worker hands over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dynamo_protocol::{BlockHash, KvTransfer, KvTransferAck};
use dynamo_runtime::kv_transfer::ShmPeers;
use dynamo_runtime::{telemetry, RequestContext, ResponseStream, ServeError, Service};
use tracing::Instrument;

use crate::engine::MockerEngine;

/// A hand-off whose last chunk has not arrived is forgotten after this long (its prefill
/// was cancelled or its sender died): its blocks stay cached, only the chain link goes.
const HANDOFF_TTL: Duration = Duration::from_secs(300);

/// At most this many unfinished hand-offs are remembered; the oldest goes first.
const MAX_OPEN_HANDOFFS: usize = 4_096;

/// Where an unfinished hand-off stands: the next chunk's first block is a child of
/// `last`.
#[derive(Debug, Clone, Copy)]
struct Open {
    last: BlockHash,
    blocks: u32,
    touched: Instant,
}

#[derive(Debug, Default)]
struct OpenHandoffs {
    open: HashMap<String, Open>,
}

impl OpenHandoffs {
    fn prune(&mut self, now: Instant) {
        self.open
            .retain(|_, h| now.saturating_duration_since(h.touched) < HANDOFF_TTL);
        while self.open.len() >= MAX_OPEN_HANDOFFS {
            let oldest = self
                .open
                .iter()
                .min_by_key(|(_, h)| h.touched)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(id) => {
                    self.open.remove(&id);
                }
                None => break,
            }
        }
    }
}

/// `Service<KvTransfer, KvTransferAck>` over a decode worker's engine. Chunks of one
/// hand-off must arrive in chain order, one at a time (the prefill side waits for each
/// ack); the ack counts the hand-off's blocks cached so far.
pub struct KvImportService {
    engine: Arc<MockerEngine>,
    handoffs: Arc<Mutex<OpenHandoffs>>,
    /// The shared pools of prefill workers on this machine, each mapped once.
    peers: Arc<ShmPeers>,
}

impl KvImportService {
    pub fn new(engine: Arc<MockerEngine>) -> Self {
        KvImportService {
            engine,
            handoffs: Arc::new(Mutex::new(OpenHandoffs::default())),
            peers: Arc::new(ShmPeers::new()),
        }
    }
}

fn lock(handoffs: &Mutex<OpenHandoffs>) -> MutexGuard<'_, OpenHandoffs> {
    // The map stays consistent whatever a panicking holder did: every write is one call.
    handoffs
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn import(
    engine: Arc<MockerEngine>,
    handoffs: Arc<Mutex<OpenHandoffs>>,
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
        payload,
        layout,
        last,
        shared,
    } = transfer;
    let previous = {
        let mut open = lock(&handoffs);
        open.prune(Instant::now());
        open.open.get(&handoff_id).copied()
    };
    let parent = previous.map(|p| p.last);
    let result = match shared {
        None => {
            engine
                .import_blocks(parent, &hashes, &payload, &layout)
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
    let mut open = lock(&handoffs);
    match result {
        Ok(count) => {
            let blocks = previous.map_or(0, |p| p.blocks).saturating_add(count);
            match (last, hashes.last()) {
                (true, _) => {
                    open.open.remove(&handoff_id);
                }
                (false, Some(&tail)) => {
                    let now = Instant::now();
                    open.open.insert(
                        handoff_id.clone(),
                        Open {
                            last: tail,
                            blocks,
                            touched: now,
                        },
                    );
                }
                (false, None) => {}
            }
            tracing::debug!(
                request_id = %ctx.request_id,
                handoff_id,
                blocks = count,
                last,
                "mocker: KV blocks imported"
            );
            Ok(KvTransferAck { blocks })
        }
        Err(err) => {
            open.open.remove(&handoff_id);
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
        let fut = import(
            self.engine.clone(),
            self.handoffs.clone(),
            self.peers.clone(),
            req,
            ctx,
        );
        Box::pin(futures::stream::once(fut.instrument(span)))
    }
}
