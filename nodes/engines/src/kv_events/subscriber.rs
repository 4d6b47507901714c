//! The ZeroMQ SUB side: connects to the engine's publisher (retrying while the engine
//! starts), reads `(topic, seq, payload)` messages and feeds them to the hub.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketRecv, SubSocket};

use super::hub::KvEventHub;
use super::wire::{decode_batch, sequence, WireError};

/// One message's frames, decoded and applied.
fn apply(hub: &KvEventHub, frames: &[&[u8]]) -> Result<usize, WireError> {
    let [_topic, seq, payload] = frames else {
        return Err(WireError::Frames(frames.len()));
    };
    let seq = sequence(seq)?;
    let batch = decode_batch(payload)?;
    Ok(hub.apply(seq, &batch))
}

/// Follows `endpoint` (`tcp://host:port`) until `cancel`.
pub async fn follow(endpoint: String, hub: Arc<KvEventHub>, cancel: CancellationToken) {
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
            let frames: Vec<&[u8]> = frames.iter().map(|b| b.as_ref()).collect();
            match apply(&hub, &frames) {
                Ok(n) => tracing::trace!(events = n, "KV events: batch applied"),
                Err(e) => tracing::warn!(%endpoint, error = %e, "KV events: message skipped"),
            }
        }
    }
}
