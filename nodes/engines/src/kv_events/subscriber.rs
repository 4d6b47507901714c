//! The ZeroMQ SUB side: connects to the engine's publisher (retrying while the engine
//! starts), reads `(topic, seq, payload)` messages and feeds them to the hub.
//!
//! PUB/SUB drops messages when a subscriber falls behind (the high-water mark), so a
//! sequence gap is expected under load. With a replay endpoint (vLLM's
//! `replay_endpoint`, a ROUTER socket) the missed batches are asked for and applied in
//! order before the one that showed the gap; without one, or when the replay does not
//! bring them within [`REPLAY_TIMEOUT`], the gap clears the worker's blocks in the
//! router (what follows rebuilds them).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::bytes::Bytes;
use tokio_util::sync::CancellationToken;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use super::hub::KvEventHub;
use super::wire::{decode_batch, sequence, WireError};

/// How long one replay may take before the gap is given up on.
pub const REPLAY_TIMEOUT: Duration = Duration::from_secs(1);

/// The sequence number vLLM ends a replay with.
const END_OF_REPLAY: i64 = -1;

/// One message's payload, decoded and applied.
fn apply(hub: &KvEventHub, seq: i64, payload: &[u8]) -> Result<usize, WireError> {
    let batch = decode_batch(payload)?;
    Ok(hub.apply(seq, &batch))
}

/// Asks `endpoint` for the batches from `from` on and applies those before `until`;
/// returns how many were applied.
async fn replay(endpoint: &str, hub: &KvEventHub, from: i64, until: i64) -> Result<usize, String> {
    let mut sock = DealerSocket::new();
    sock.connect(endpoint).await.map_err(|e| e.to_string())?;
    // vLLM's ROUTER reads [identity, empty, start seq]: the empty delimiter is a REQ
    // socket's, which a DEALER sends itself.
    let ask = ZmqMessage::try_from(vec![
        Bytes::new(),
        Bytes::copy_from_slice(&from.to_be_bytes()),
    ])
    .map_err(|e| format!("{e:?}"))?;
    sock.send(ask).await.map_err(|e| e.to_string())?;
    let mut applied = 0;
    loop {
        let msg = sock.recv().await.map_err(|e| e.to_string())?;
        let frames = msg.into_vec();
        // [empty, seq, payload]; tolerate a peer that leaves out the delimiter.
        let [.., seq, payload] = frames.as_slice() else {
            return Err(format!("a replay message of {} frames", frames.len()));
        };
        let seq = sequence(seq).map_err(|e| e.to_string())?;
        if seq == END_OF_REPLAY || seq >= until {
            return Ok(applied);
        }
        if seq >= from {
            apply(hub, seq, payload).map_err(|e| e.to_string())?;
            applied += 1;
            if seq + 1 >= until {
                return Ok(applied);
            }
        }
    }
}

/// Fills the gap before `seq` from `endpoint`, bounded by [`REPLAY_TIMEOUT`]; a replay
/// that fails leaves the gap to clear the worker's blocks.
async fn fill_gap(endpoint: &str, hub: &KvEventHub, last: i64, seq: i64) {
    match tokio::time::timeout(REPLAY_TIMEOUT, replay(endpoint, hub, last + 1, seq)).await {
        Ok(Ok(n)) => tracing::info!(
            from = last + 1,
            to = seq - 1,
            replayed = n,
            "KV events: gap filled from the replay socket"
        ),
        Ok(Err(e)) => tracing::warn!(
            %endpoint,
            error = %e,
            "KV events: replay failed; the gap clears the worker's blocks"
        ),
        Err(_) => tracing::warn!(
            %endpoint,
            "KV events: no replay within {REPLAY_TIMEOUT:?}; the gap clears the worker's blocks"
        ),
    }
}

/// Follows `endpoint` (`tcp://host:port`) until `cancel`, filling gaps from
/// `replay_endpoint` when there is one.
pub async fn follow(
    endpoint: String,
    replay_endpoint: Option<String>,
    hub: Arc<KvEventHub>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    while !cancel.is_cancelled() {
        let mut sock = SubSocket::new();
        let connected = tokio::select! {
            _ = cancel.cancelled() => return,
            r = sock.connect(&endpoint) => r,
        };
        if let Err(e) = connected {
            tracing::debug!(%endpoint, error = %e, "KV events: publisher not reachable yet");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
            continue;
        }
        if let Err(e) = sock.subscribe("").await {
            tracing::warn!(%endpoint, error = %e, "KV events: subscribe failed");
            continue;
        }
        tracing::info!(%endpoint, "KV events: subscribed");
        backoff = Duration::from_millis(100);
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => return,
                m = sock.recv() => m,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(%endpoint, error = %e, "KV events: connection lost; reconnecting");
                    break;
                }
            };
            let frames = msg.into_vec();
            let [_topic, seq, payload] = frames.as_slice() else {
                let e = WireError::Frames(frames.len());
                tracing::warn!(%endpoint, error = %e, "KV events: message skipped");
                continue;
            };
            let seq = match sequence(seq) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%endpoint, error = %e, "KV events: message skipped");
                    continue;
                }
            };
            if let (Some(replay_ep), Some(last)) = (&replay_endpoint, hub.last_seq()) {
                if seq > last + 1 {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = fill_gap(replay_ep, &hub, last, seq) => {}
                    }
                }
            }
            match apply(&hub, seq, payload) {
                Ok(n) => tracing::trace!(events = n, "KV events: batch applied"),
                Err(e) => tracing::warn!(%endpoint, error = %e, "KV events: message skipped"),
            }
        }
    }
}
