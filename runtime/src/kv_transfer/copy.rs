//! Copying a hand-off's blocks into a pool, on several cores when it is large.
//!
//! One core's `memcpy` does not reach the memory bandwidth a machine has: on the 2-vCPU
//! development machine one thread copies the 23 MB of a 1,000-token SmolLM2 hand-off at
//! 7–9 GB/s and two threads at 12–13 GB/s. So a copy of at least [`PARALLEL_AT`] bytes is
//! split by blocks over up to [`MAX_THREADS`] scoped threads (never more than the cores
//! this process may use); a smaller one stays on the calling thread, where starting
//! threads would cost more than it saves.
//!
//! A block (hundreds of KiB) is also written with non-temporal stores on x86-64: the
//! destination is not read into the cache first only to be overwritten, and the copy
//! does not evict the working set of whatever runs next. (glibc's `memcpy` only does so
//! above a size of several MiB.) Measured in C on this machine, 63 scattered blocks of
//! 360 KiB: `memcpy` 3.5–3.9 ms on one thread, 1.9–3.0 ms on two; streaming stores
//! 2.8–3.2 ms and 1.7 ms.

use std::sync::{Mutex, OnceLock};

/// Copies of at least this many bytes are split over threads.
pub const PARALLEL_AT: usize = 4 << 20;
/// At most this many threads copy one hand-off.
pub const MAX_THREADS: usize = 4;

/// A destination block and its source.
type Pair<'a, 'b> = (&'a mut [u8], &'b [u8]);

/// Why [`copy_blocks`] refused (nothing was written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    #[error("{sources} source slices for {blocks} blocks")]
    Count { sources: usize, blocks: usize },
    #[error("source {index} has {len} bytes, not a block's {block_bytes}")]
    Length {
        index: usize,
        len: usize,
        block_bytes: usize,
    },
    #[error("block {block} is outside a pool of {blocks} blocks")]
    OutOfRange { block: u32, blocks: usize },
    #[error("block {0} is written twice")]
    Repeated(u32),
}

fn threads() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(MAX_THREADS)
    })
}

/// Writes `src[i]` over block `blocks[i]` of `pool` (blocks of `block_bytes` bytes, back
/// to back). All or nothing: every length, id and repetition is checked first.
pub fn copy_blocks(
    pool: &mut [u8],
    block_bytes: usize,
    blocks: &[u32],
    src: &[&[u8]],
) -> Result<(), CopyError> {
    copy_blocks_with(pool, block_bytes, blocks, src, threads())
}

/// [`copy_blocks`] with at most `threads` threads (1: on the calling thread).
pub fn copy_blocks_with(
    pool: &mut [u8],
    block_bytes: usize,
    blocks: &[u32],
    src: &[&[u8]],
    threads: usize,
) -> Result<(), CopyError> {
    if src.len() != blocks.len() {
        return Err(CopyError::Count {
            sources: src.len(),
            blocks: blocks.len(),
        });
    }
    if let Some((index, s)) = src.iter().enumerate().find(|(_, s)| s.len() != block_bytes) {
        return Err(CopyError::Length {
            index,
            len: s.len(),
            block_bytes,
        });
    }
    if block_bytes == 0 || blocks.is_empty() {
        return Ok(());
    }
    // One mutable slice per pool block; each target is taken out once, which both checks
    // for repeats and hands the threads disjoint destinations.
    let mut slots: Vec<Option<&mut [u8]>> = pool.chunks_exact_mut(block_bytes).map(Some).collect();
    let pool_blocks = slots.len();
    let mut pairs: Vec<Pair> = Vec::with_capacity(blocks.len());
    for (&block, &s) in blocks.iter().zip(src) {
        let slot = slots.get_mut(block as usize).ok_or(CopyError::OutOfRange {
            block,
            blocks: pool_blocks,
        })?;
        let dst = slot.take().ok_or(CopyError::Repeated(block))?;
        pairs.push((dst, s));
    }
    let total = blocks.len() * block_bytes;
    let threads = threads.clamp(1, pairs.len());
    if threads == 1 || total < PARALLEL_AT {
        for (dst, s) in pairs {
            copy_block(dst, s);
        }
        return Ok(());
    }
    let per = pairs.len().div_ceil(threads);
    // Each part is claimed once, by its thread or by the calling thread, which copies
    // every part still unclaimed when it gets there: the first, and any whose thread
    // could not be started (no panic when the system refuses a thread).
    let parts: Vec<Mutex<Option<&mut [Pair]>>> =
        pairs.chunks_mut(per).map(|p| Mutex::new(Some(p))).collect();
    let claim_and_copy = |k: usize| {
        let part = parts.get(k).and_then(|m| {
            m.lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take()
        });
        for (dst, s) in part.into_iter().flatten() {
            copy_block(dst, s);
        }
    };
    std::thread::scope(|scope| {
        for k in 1..parts.len() {
            let claim_and_copy = &claim_and_copy;
            let _ = std::thread::Builder::new().spawn_scoped(scope, move || claim_and_copy(k));
        }
        for k in 0..parts.len() {
            claim_and_copy(k);
        }
    });
    Ok(())
}

/// Below this a block is copied with `copy_from_slice`.
const STREAM_AT: usize = 64 << 10;

/// `dst.copy_from_slice(src)` (equal lengths), with streaming stores for a large block.
fn copy_block(dst: &mut [u8], src: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if dst.len() >= STREAM_AT && dst.len() == src.len() {
        stream_copy(dst, src);
        return;
    }
    dst.copy_from_slice(src);
}

/// Copies `src` into `dst` (equal lengths) with SSE2 non-temporal stores for the 16-byte
/// aligned middle, ending with a store fence so the bytes are visible to whoever reads
/// them after this thread is joined.
#[cfg(target_arch = "x86_64")]
fn stream_copy(dst: &mut [u8], src: &[u8]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    let n = dst.len().min(src.len());
    let head = dst.as_ptr().align_offset(16).min(n);
    let body = (n - head) / 64 * 64;
    let (dst_head, rest) = dst.split_at_mut(head);
    let (src_head, src_rest) = src.split_at(head);
    dst_head.copy_from_slice(src_head);
    let (dst_body, dst_tail) = rest.split_at_mut(body);
    let (src_body, src_tail) = src_rest.split_at(body);
    let (d, s) = (dst_body.as_mut_ptr(), src_body.as_ptr());
    // SAFETY: `d` and `s` point to `body` bytes each, in bounds of their slices (split
    // above), which do not overlap (`&mut` and `&`); every access is 16 bytes at an
    // offset below `body`, a multiple of 64. `d` is 16-byte aligned (`align_offset`), as
    // `_mm_stream_si128` requires; loads are unaligned (`loadu`). SSE2 is part of x86-64.
    unsafe {
        let mut i = 0;
        while i < body {
            let a = _mm_loadu_si128(s.add(i).cast::<__m128i>());
            let b = _mm_loadu_si128(s.add(i + 16).cast::<__m128i>());
            let c = _mm_loadu_si128(s.add(i + 32).cast::<__m128i>());
            let e = _mm_loadu_si128(s.add(i + 48).cast::<__m128i>());
            _mm_stream_si128(d.add(i).cast::<__m128i>(), a);
            _mm_stream_si128(d.add(i + 16).cast::<__m128i>(), b);
            _mm_stream_si128(d.add(i + 32).cast::<__m128i>(), c);
            _mm_stream_si128(d.add(i + 48).cast::<__m128i>(), e);
            i += 64;
        }
        _mm_sfence();
    }
    dst_tail.copy_from_slice(src_tail);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_land_where_asked_on_one_thread_and_on_several() {
        let block = 1 << 20; // 8 blocks = 8 MiB: above the parallel threshold
        let src: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i + 1; block]).collect();
        let refs: Vec<&[u8]> = src.iter().map(Vec::as_slice).collect();
        let ids = [9, 3, 0, 15, 7, 12, 1, 4];
        for threads in [1, 2, 3, 4] {
            let mut pool = vec![0u8; 16 * block];
            copy_blocks_with(&mut pool, block, &ids, &refs, threads).unwrap();
            for (b, chunk) in pool.chunks(block).enumerate() {
                let want = ids
                    .iter()
                    .position(|&i| i as usize == b)
                    .map_or(0, |k| k as u8 + 1);
                assert!(
                    chunk.iter().all(|&x| x == want),
                    "threads {threads}, block {b}"
                );
            }
        }
    }

    #[test]
    fn streamed_copies_are_exact_at_any_alignment_and_length() {
        let src: Vec<u8> = (0..(STREAM_AT + 300)).map(|i| (i * 7 + 3) as u8).collect();
        for (offset, len) in [
            (0, STREAM_AT),
            (1, STREAM_AT + 5),
            (13, STREAM_AT + 63),
            (7, 100),
        ] {
            let mut buf = vec![0u8; len + offset + 16];
            let dst = &mut buf[offset..offset + len];
            copy_block(dst, &src[3..3 + len]);
            assert_eq!(dst, &src[3..3 + len], "offset {offset}, len {len}");
            assert!(buf[..offset].iter().all(|&x| x == 0), "nothing before");
            assert!(buf[offset + len..].iter().all(|&x| x == 0), "nothing after");
        }
    }

    #[test]
    fn bad_requests_write_nothing() {
        let mut pool = vec![7u8; 4 * 16];
        let a = [1u8; 16];
        let short = [1u8; 15];
        type Case<'a> = (&'a [u32], Vec<&'a [u8]>, CopyError);
        let cases: [Case; 4] = [
            (
                &[0, 1],
                vec![&a],
                CopyError::Count {
                    sources: 1,
                    blocks: 2,
                },
            ),
            (
                &[0],
                vec![&short],
                CopyError::Length {
                    index: 0,
                    len: 15,
                    block_bytes: 16,
                },
            ),
            (
                &[0, 4],
                vec![&a, &a],
                CopyError::OutOfRange {
                    block: 4,
                    blocks: 4,
                },
            ),
            (&[2, 2], vec![&a, &a], CopyError::Repeated(2)),
        ];
        for (ids, src, want) in cases {
            assert_eq!(copy_blocks(&mut pool, 16, ids, &src), Err(want));
        }
        assert!(pool.iter().all(|&x| x == 7), "nothing written");
    }
}
