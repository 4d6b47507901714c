//! The response stream of one request: deltas from the step loop, ended early by the
//! request's cancellation, and an abort sent to the loop when it is cancelled or dropped.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use dynamo_protocol::{FinishReason, TokenDelta};
use dynamo_runtime::ServeError;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::sequence::SeqId;

pub(crate) type DeltaResult = Result<TokenDelta, ServeError>;

/// A message to the step loop.
#[derive(Debug)]
pub(crate) enum Control {
    Submit {
        seq: crate::sequence::NewSequence,
        tx: mpsc::UnboundedSender<DeltaResult>,
        cancel: CancellationToken,
    },
    Abort(SeqId),
    ClearCache,
    Snapshot(tokio::sync::oneshot::Sender<crate::block_manager::KvSnapshot>),
    /// The bytes of the cached blocks `hashes` (a real backend's pool), for a hand-off.
    Export {
        hashes: Vec<dynamo_protocol::BlockHash>,
        /// Blocks per returned buffer.
        chunk_blocks: usize,
        reply: tokio::sync::oneshot::Sender<Result<Vec<Vec<u8>>, String>>,
    },
    /// Take a reference to each cached block of `hashes` (all or none), so none is
    /// evicted or rewritten while a hand-off reads it; answers their ids. With `share`,
    /// the shared pool is brought up to date first, for a peer that reads it there.
    Pin {
        hashes: Vec<dynamo_protocol::BlockHash>,
        share: bool,
        reply: tokio::sync::oneshot::Sender<Result<Vec<crate::block_manager::BlockId>, String>>,
    },
    /// Drop the references a `Pin` took.
    Unpin(Vec<crate::block_manager::BlockId>),
    /// Cache a chain of blocks handed over by a prefill worker (bytes already verified).
    Import {
        parent: Option<dynamo_protocol::BlockHash>,
        hashes: Vec<dynamo_protocol::BlockHash>,
        /// The blocks' bytes, written into the pool by a real backend (none for the mocker).
        payload: ImportBytes,
        reply: tokio::sync::oneshot::Sender<
            Result<crate::block_manager::Imported, crate::block_manager::ImportError>,
        >,
    },
}

/// Where the bytes of imported blocks are.
#[derive(Debug)]
pub(crate) enum ImportBytes {
    /// The mocker keeps no bytes.
    None,
    /// In a message: `block_bytes` per block, back to back.
    Inline(Vec<u8>),
    /// In a peer's shared pool, mapped here.
    Shared {
        peer: std::sync::Arc<dynamo_runtime::kv_transfer::ShmPeer>,
        blocks: Vec<u32>,
    },
    /// In a peer's pool on a GPU of this machine, exported as `pool` (CUDA IPC).
    Gpu { pool: String, blocks: Vec<u32> },
}

pub(crate) struct DeltaStream {
    pub id: SeqId,
    pub rx: mpsc::UnboundedReceiver<DeltaResult>,
    pub cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    pub control: mpsc::UnboundedSender<Control>,
    /// The last item was handed out; nothing is left to abort.
    pub done: bool,
}

impl DeltaStream {
    fn abort(&mut self) {
        self.done = true;
        // The loop may be gone already (shutdown): then there is nothing to free.
        let _ = self.control.send(Control::Abort(self.id));
        self.rx.close();
    }
}

impl Stream for DeltaStream {
    type Item = DeltaResult;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<DeltaResult>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.cancelled.as_mut().poll(cx).is_ready() {
            this.abort();
            return Poll::Ready(Some(Ok(TokenDelta {
                token_ids: Vec::new(),
                finish_reason: Some(FinishReason::Cancelled),
                ..TokenDelta::default()
            })));
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                if !matches!(&item, Ok(delta) if delta.finish_reason.is_none()) {
                    this.done = true;
                }
                Poll::Ready(Some(item))
            }
            Poll::Ready(None) => {
                this.done = true;
                Poll::Ready(Some(Err(ServeError::unavailable(
                    "the mocker engine stopped before the request finished",
                ))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for DeltaStream {
    fn drop(&mut self) {
        if !self.done {
            self.abort();
        }
    }
}
