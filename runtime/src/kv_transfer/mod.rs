//! The KV data plane: moving KV-cache blocks between a prefill pool and a decode pool
//! faster than serialising them as messages.
//!
//! A pool is registered with a peer once; afterwards a per-request message carries only
//! block ids and the pool's handle (a short name), and the bytes move by the fastest path
//! the placement allows:
//!
//! - [`shm`]: same machine, host memory. The pool lives in a memfd segment; the peer
//!   receives its file descriptor once (SCM_RIGHTS over an abstract unix socket), maps it
//!   read-only and copies the listed blocks straight into its own pool: one copy.
//!   Neither the memfd nor the abstract socket has a name in a file system, so nothing is
//!   left in `/dev/shm` or on disk when either side exits, even on a crash.
//! - [`cuda`]: same machine, GPU memory. The pool is one `cuMemAlloc` allocation whose
//!   IPC handle the peer receives once over the same kind of abstract socket, opens with
//!   `cuIpcOpenMemHandle` and copies the listed blocks from, device to device: one copy.
//! - [`tcp`]: across machines. Blocks stream over a direct connection of their own, so a
//!   large hand-off never queues behind control traffic; the kernel's flow control is the
//!   backpressure.
//!
//! Copies into a pool go through [`copy_blocks`], which splits a large one over several
//! cores (one core's memcpy is well below the machine's memory bandwidth).
//!
//! This module knows bytes and block ids, not models: the layout of a block is the
//! caller's (`nodes/protocol`'s `KvLayout`); here a block is `block_bytes` contiguous
//! bytes at `id * block_bytes` in its pool.

mod announce;
pub mod copy;
pub mod cuda;
pub mod shm;
pub mod tcp;

pub use copy::{copy_blocks, CopyError};
pub use cuda::{CudaExport, CudaPeer, CudaPeers, CudaPool, Gpu};
pub use shm::{ShmExport, ShmPeer, ShmPeers, ShmSegment};

/// What can go wrong moving KV blocks.
#[derive(Debug, thiserror::Error)]
pub enum KvTransferError {
    #[error("creating a shared KV segment of {bytes} bytes: {source}")]
    Create {
        bytes: usize,
        source: std::io::Error,
    },
    #[error("exporting the KV pool `{name}`: {source}")]
    Export {
        name: String,
        source: std::io::Error,
    },
    #[error("mapping the peer's KV pool `{name}`: {message}")]
    Map { name: String, message: String },
    #[error(
        "block {block} ({bytes} bytes each) lies outside the peer's pool `{name}` of {len} bytes"
    )]
    OutOfRange {
        name: String,
        block: u32,
        bytes: usize,
        len: usize,
    },
    #[error("the KV connection to {peer} failed: {source}")]
    Io {
        peer: String,
        source: std::io::Error,
    },
    #[error("the KV stream from {peer} is malformed: {message}")]
    Protocol { peer: String, message: String },
    #[error("the KV transfer was cancelled")]
    Cancelled,
    #[error("CUDA: {0}")]
    Cuda(String),
}
