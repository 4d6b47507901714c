//! The single task that owns a connection's write half. Frames arrive already encoded;
//! the task coalesces whatever is queued into one buffer so a burst of frames costs one
//! `write` syscall, and writes a lone frame straight from its own buffer (no copy).

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Coalesce queued frames up to this many bytes per write.
const BATCH_BYTES: usize = 64 * 1024;

/// Writes frames until the queue closes, `closed` is cancelled or a write fails; on a
/// write failure it cancels `closed` so the rest of the connection shuts down too.
pub(crate) async fn write_frames<W: AsyncWrite + Unpin>(
    mut out: W,
    mut queue: mpsc::Receiver<Bytes>,
    closed: CancellationToken,
) {
    let mut batch = BytesMut::new();
    loop {
        let first = tokio::select! {
            biased;
            _ = closed.cancelled() => break,
            next = queue.recv() => match next {
                Some(frame) => frame,
                None => break,
            },
        };
        let result = if queue.is_empty() {
            out.write_all(&first).await
        } else {
            batch.extend_from_slice(&first);
            while batch.len() < BATCH_BYTES {
                match queue.try_recv() {
                    Ok(frame) => batch.extend_from_slice(&frame),
                    Err(_) => break,
                }
            }
            let r = out.write_all(&batch).await;
            batch.clear();
            r
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "socket write failed; closing connection");
            closed.cancel();
            break;
        }
    }
    let _ = out.shutdown().await;
}
