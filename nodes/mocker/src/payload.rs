//! The bytes of a mocked KV block: fabricated from the block's hash alone, so the prefill
//! worker that sends a block and the decode worker that receives it agree on every byte
//! without sharing anything but the hash, and a receiver can check a transfer end to end.
//!
//! The generator is SplitMix64 keyed by the hash: one multiply-xorshift round per 8 bytes,
//! a few hundred microseconds for a SmolLM2 block (368 KiB) in a release build.

use dynamo_protocol::{BlockHash, KvLayout};

/// Offset between the states of consecutive words (SplitMix64's golden-ratio increment).
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// Keeps a block's stream apart from the hash's own bits (hash 0 still gives noise).
const KEY: u64 = 0x6b76_2d62_6c6f_636b; // "kv-block"

#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The little-endian words of block `hash`'s bytes, in order.
fn words(hash: BlockHash) -> impl Iterator<Item = [u8; 8]> {
    let mut state = hash ^ KEY;
    std::iter::repeat_with(move || {
        state = state.wrapping_add(GAMMA);
        mix(state).to_le_bytes()
    })
}

/// Fills `out` with the bytes of block `hash`.
pub fn fill_block(hash: BlockHash, out: &mut [u8]) {
    let mut chunks = out.chunks_exact_mut(8);
    let mut stream = words(hash);
    for (chunk, word) in (&mut chunks).zip(&mut stream) {
        chunk.copy_from_slice(&word);
    }
    let tail = chunks.into_remainder();
    if let Some(word) = stream.next() {
        let n = tail.len();
        tail.copy_from_slice(&word[..n]);
    }
}

/// The payload of `hashes`, `block_bytes` per block back to back.
pub fn fabricate(hashes: &[BlockHash], block_bytes: usize) -> Vec<u8> {
    let mut payload = vec![0u8; hashes.len() * block_bytes];
    if block_bytes > 0 {
        for (hash, block) in hashes.iter().zip(payload.chunks_exact_mut(block_bytes)) {
            fill_block(*hash, block);
        }
    }
    payload
}

/// Where a block's bytes first differ from what its hash fabricates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Offset of the first differing byte inside the block.
    pub offset: usize,
}

/// Checks every byte of `bytes` against block `hash`'s fabrication.
pub fn verify_block(hash: BlockHash, bytes: &[u8]) -> Result<(), Mismatch> {
    let mut chunks = bytes.chunks_exact(8);
    let mut stream = words(hash);
    for (i, (chunk, word)) in (&mut chunks).zip(&mut stream).enumerate() {
        if chunk != word {
            let within = chunk.iter().zip(word).position(|(a, b)| *a != b);
            return Err(Mismatch {
                offset: i * 8 + within.unwrap_or(0),
            });
        }
    }
    let tail = chunks.remainder();
    if let Some(word) = stream.next() {
        if let Some(within) = tail.iter().zip(word).position(|(a, b)| *a != b) {
            return Err(Mismatch {
                offset: bytes.len() - tail.len() + within,
            });
        }
    }
    Ok(())
}

/// Why a received chunk of blocks is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("KV layout {got:?} does not match this worker's {expected:?}")]
    Layout { expected: KvLayout, got: KvLayout },
    #[error("{blocks} blocks of {block_bytes} bytes need {expected} payload bytes, got {got}")]
    Length {
        blocks: usize,
        block_bytes: usize,
        expected: usize,
        got: usize,
    },
    #[error("block {index} ({hash:#018x}) is corrupted at byte {offset}")]
    Corrupted {
        index: usize,
        hash: BlockHash,
        offset: usize,
    },
}

/// Checks a received chunk: the sender's layout is `expected` (whose blocks take
/// `block_bytes`), the payload holds exactly one block per hash, and every byte is the
/// fabrication of its block's hash.
pub fn verify_transfer(
    expected: &KvLayout,
    block_bytes: usize,
    got: &KvLayout,
    hashes: &[BlockHash],
    payload: &[u8],
) -> Result<(), TransferError> {
    // Compared before any size is computed from `got`, which came off the network.
    if got != expected {
        return Err(TransferError::Layout {
            expected: *expected,
            got: *got,
        });
    }
    let length_error = || TransferError::Length {
        blocks: hashes.len(),
        block_bytes,
        expected: hashes.len().saturating_mul(block_bytes),
        got: payload.len(),
    };
    if hashes.len().checked_mul(block_bytes) != Some(payload.len()) {
        return Err(length_error());
    }
    if block_bytes == 0 {
        return Ok(());
    }
    for (index, (hash, bytes)) in hashes
        .iter()
        .zip(payload.chunks_exact(block_bytes))
        .enumerate()
    {
        verify_block(*hash, bytes).map_err(|m| TransferError::Corrupted {
            index,
            hash: *hash,
            offset: m.offset,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_hash_same_bytes_other_hash_other_bytes() {
        let a = fabricate(&[7, 8], 100);
        assert_eq!(a.len(), 200);
        assert_eq!(a, fabricate(&[7, 8], 100));
        assert_ne!(a[..100], a[100..], "blocks of other hashes differ");
        assert!(verify_block(7, &a[..100]).is_ok());
        assert!(verify_block(8, &a[100..]).is_ok());
        assert!(verify_block(8, &a[..100]).is_err());
        // Not all zeros, even for hash 0.
        assert!(fabricate(&[0], 64).iter().any(|&b| b != 0));
    }

    #[test]
    fn every_byte_is_checked_tail_included() {
        let block = fabricate(&[42], 21);
        for offset in 0..block.len() {
            let mut bad = block.clone();
            bad[offset] ^= 0x01;
            assert_eq!(verify_block(42, &bad), Err(Mismatch { offset }));
        }
    }

    #[test]
    fn transfers_are_checked_for_layout_length_and_bytes() {
        let layout = KvLayout {
            layers: 2,
            kv_heads: 1,
            head_dim: 4,
            dtype_bytes: 2,
            block_size: 4,
        };
        let block_bytes = layout.bytes_per_block() as usize;
        let hashes = [11, 12, 13];
        let mut payload = fabricate(&hashes, block_bytes);
        assert_eq!(
            verify_transfer(&layout, block_bytes, &layout, &hashes, &payload),
            Ok(())
        );
        let other = KvLayout {
            head_dim: 8,
            ..layout
        };
        assert!(matches!(
            verify_transfer(&layout, block_bytes, &other, &hashes, &payload),
            Err(TransferError::Layout { .. })
        ));
        assert!(matches!(
            verify_transfer(&layout, block_bytes, &layout, &hashes[..2], &payload),
            Err(TransferError::Length { .. })
        ));
        payload[block_bytes * 2 + 5] ^= 0x80;
        assert_eq!(
            verify_transfer(&layout, block_bytes, &layout, &hashes, &payload),
            Err(TransferError::Corrupted {
                index: 2,
                hash: 13,
                offset: 5
            })
        );
    }

    #[test]
    fn a_short_block_is_a_prefix_of_a_long_one() {
        // The stream does not depend on the length, so layouts only change the cut.
        let long = fabricate(&[5], 64);
        let short = fabricate(&[5], 13);
        assert_eq!(short[..], long[..13]);
    }
}
