//! KV blocks across machines: a direct TCP connection per peer pair, its own so a large
//! hand-off never queues behind control traffic.
//!
//! One hand-off on the wire: a 20-byte header (magic, hand-off id, block count, block
//! bytes), then the blocks back to back; the receiver answers with the 8-byte count of
//! bytes it took. The sender does not wait between blocks: the socket buffers pipeline
//! them, and TCP's flow control stops the sender when the receiver falls behind (the
//! backpressure). A cancelled sender stops at a block boundary and closes the
//! connection; the receiver sees a short stream and reports it.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::KvTransferError;

const MAGIC: u32 = 0x4b56_5431; // "KVT1"

/// The most bytes one block may have (a guard against a garbled header).
pub const MAX_BLOCK_BYTES: usize = 256 << 20;

/// What a hand-off's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStreamHeader {
    pub handoff: u64,
    pub blocks: u32,
    pub block_bytes: u32,
}

fn io(peer: &str) -> impl Fn(std::io::Error) -> KvTransferError + '_ {
    move |source| KvTransferError::Io {
        peer: peer.to_string(),
        source,
    }
}

/// Streams `blocks` (each `block_bytes` long) as hand-off `handoff`; returns the bytes
/// the receiver acknowledged. Stops with [`KvTransferError::Cancelled`] at the next block
/// boundary once `cancel` fires (the caller must then drop the connection).
pub async fn send_blocks(
    stream: &mut TcpStream,
    handoff: u64,
    blocks: &[&[u8]],
    cancel: &CancellationToken,
) -> Result<u64, KvTransferError> {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "a peer".into());
    let block_bytes = blocks.first().map_or(0, |b| b.len());
    let bad = |message: String| KvTransferError::Protocol {
        peer: peer.clone(),
        message,
    };
    if blocks.iter().any(|b| b.len() != block_bytes) || block_bytes > MAX_BLOCK_BYTES {
        return Err(bad("blocks of unequal or excessive size".into()));
    }
    let count = u32::try_from(blocks.len()).map_err(|_| bad("too many blocks".into()))?;
    let mut header = Vec::with_capacity(20);
    header.extend_from_slice(&MAGIC.to_le_bytes());
    header.extend_from_slice(&handoff.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(block_bytes as u32).to_le_bytes());
    stream.write_all(&header).await.map_err(io(&peer))?;
    for block in blocks {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(KvTransferError::Cancelled),
            written = stream.write_all(block) => written.map_err(io(&peer))?,
        }
    }
    stream.flush().await.map_err(io(&peer))?;
    let mut ack = [0u8; 8];
    tokio::select! {
        biased;
        _ = cancel.cancelled() => return Err(KvTransferError::Cancelled),
        read = stream.read_exact(&mut ack) => { read.map_err(io(&peer))?; }
    }
    Ok(u64::from_le_bytes(ack))
}

/// Reads one hand-off from `stream`, handing each block to `on_block(index, bytes)` as it
/// arrives (the buffer is reused: copy what you keep), then acknowledges the bytes.
/// Returns the header. A stream that ends early is an error naming how far it got.
/// [`read_header`], [`read_block`] and [`acknowledge`] do the same with each block read
/// straight into its destination (no copy after the socket's).
pub async fn recv_blocks(
    stream: &mut TcpStream,
    mut on_block: impl FnMut(u32, &[u8]),
) -> Result<BlockStreamHeader, KvTransferError> {
    let header = read_header(stream).await?;
    let mut buf = vec![0u8; header.block_bytes as usize];
    for i in 0..header.blocks {
        read_block(stream, &header, i, &mut buf).await?;
        on_block(i, &buf);
    }
    acknowledge(stream, &header).await?;
    Ok(header)
}

fn peer_of(stream: &TcpStream) -> String {
    stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "a peer".into())
}

/// Reads block `index` of the hand-off `header` into `dst` (`header.block_bytes` long).
pub async fn read_block(
    stream: &mut TcpStream,
    header: &BlockStreamHeader,
    index: u32,
    dst: &mut [u8],
) -> Result<(), KvTransferError> {
    stream
        .read_exact(dst)
        .await
        .map_err(|e| KvTransferError::Protocol {
            peer: peer_of(stream),
            message: format!(
                "hand-off {} ended after {index} of {} blocks: {e}",
                header.handoff, header.blocks
            ),
        })?;
    Ok(())
}

/// Tells the sender every block of `header` arrived.
pub async fn acknowledge(
    stream: &mut TcpStream,
    header: &BlockStreamHeader,
) -> Result<(), KvTransferError> {
    let total = u64::from(header.blocks) * u64::from(header.block_bytes);
    let peer = peer_of(stream);
    stream
        .write_all(&total.to_le_bytes())
        .await
        .map_err(io(&peer))
}

/// Reads the header of the next hand-off.
pub async fn read_header(stream: &mut TcpStream) -> Result<BlockStreamHeader, KvTransferError> {
    let peer = peer_of(stream);
    let bad = |message: String| KvTransferError::Protocol {
        peer: peer.clone(),
        message,
    };
    let mut raw = [0u8; 20];
    stream.read_exact(&mut raw).await.map_err(io(&peer))?;
    let word = |i: usize| u32::from_le_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
    if word(0) != MAGIC {
        return Err(bad(format!(
            "not a KV block stream (magic {:#010x})",
            word(0)
        )));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&raw[4..12]);
    let header = BlockStreamHeader {
        handoff: u64::from_le_bytes(id),
        blocks: word(12),
        block_bytes: word(16),
    };
    let block_bytes = header.block_bytes as usize;
    if block_bytes > MAX_BLOCK_BYTES {
        return Err(bad(format!("a block of {block_bytes} bytes")));
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn blocks_arrive_intact_and_a_cancelled_sender_is_reported() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut got = Vec::new();
                let r = recv_blocks(&mut s, |_, b| got.extend_from_slice(b)).await;
                results.push((r.map(|h| h.blocks), got));
            }
            results
        });
        let blocks: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; 64 << 10]).collect();
        let refs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
        let mut s = TcpStream::connect(addr).await.unwrap();
        let acked = send_blocks(&mut s, 1, &refs, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(acked, 64 * (64 << 10));
        let cancel = CancellationToken::new();
        cancel.cancel();
        let mut s = TcpStream::connect(addr).await.unwrap();
        let r = send_blocks(&mut s, 2, &refs, &cancel).await;
        assert!(matches!(r, Err(KvTransferError::Cancelled)), "{r:?}");
        drop(s);
        let results = server.await.unwrap();
        assert_eq!(results[0].0.as_ref().unwrap(), &64);
        assert_eq!(results[0].1, blocks.concat());
        assert!(results[1].0.is_err(), "a cut stream was accepted");
    }
}
