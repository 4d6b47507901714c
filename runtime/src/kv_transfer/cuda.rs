//! GPU-resident KV pools on one machine: CUDA IPC.
//!
//! The owner (a prefill worker) allocates its pool with plain `cuMemAlloc`
//! ([`CudaPool::alloc`]): memory from cudarc's default stream-ordered pool cannot be
//! exported (cudarc issue #521). [`CudaPool::export`] takes the pool's IPC handle once and
//! tells it to every peer that connects to an abstract unix socket, as [`super::shm`] does
//! with a memfd. A peer (a decode worker) opens the handle once per export name
//! ([`CudaPeers::get`], `cuIpcOpenMemHandle` with lazy peer access, so the two may sit on
//! different GPUs of the machine) and copies the blocks of each hand-off device to device
//! into its own pool on a stream of its own ([`CudaPool::copy_from_peer`]); the handle is
//! closed when the peer drops it, which it does when the owner's socket closes.
//!
//! Blocks that are neighbours in both pools go in one copy: a hand-off of a fresh
//! sequence into a fresh pool is usually one or a few copies, not one per block.
//!
//! Nothing here links against CUDA: cudarc loads `libcuda.so` when first asked
//! ([`device_count`] says whether it can), so the crate builds and runs without a GPU or
//! the CUDA toolkit, and only a process that asks for a GPU pool needs a driver.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaStream, DriverError};

use super::announce::{self, Announcer, PeerPool, Peers};
use super::KvTransferError;

/// What an export tells a peer: `MAGIC`, the pool's length (u64 LE), its IPC handle.
const MAGIC: &[u8; 8] = b"DYNCUDA1";
const HANDLE_BYTES: usize = 64;
const HELLO_BYTES: usize = 8 + 8 + HANDLE_BYTES;

fn driver(what: &str) -> impl Fn(DriverError) -> KvTransferError + '_ {
    move |e| KvTransferError::Cuda(format!("{what}: {e}"))
}

/// How many GPUs this process can use; an error says why there are none to use (no
/// driver library, a driver that fails to start).
pub fn device_count() -> Result<usize, KvTransferError> {
    // SAFETY: only tries to load the library; cudarc would panic on a missing one.
    if !unsafe { sys::is_culib_present() } {
        return Err(KvTransferError::Cuda(
            "the CUDA driver library (libcuda.so) is not installed on this machine".into(),
        ));
    }
    result::init().map_err(driver("starting the CUDA driver"))?;
    let count = result::device::get_count().map_err(driver("counting GPUs"))?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// One GPU of this process, with the stream its KV copies run on.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl Gpu {
    /// GPU `ordinal` as this process sees it (after `CUDA_VISIBLE_DEVICES`).
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>, KvTransferError> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(KvTransferError::Cuda(format!(
                "GPU {ordinal} was asked for, but this process sees {count}"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("opening the GPU"))?;
        let stream = ctx.new_stream().map_err(driver("creating a copy stream"))?;
        Ok(Arc::new(Gpu { ctx, stream }))
    }

    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// Makes this GPU's context current on the calling thread (CUDA's is per thread).
    fn bind(&self) -> Result<(), KvTransferError> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("binding the GPU to this thread"))
    }

    /// Waits for all work on this GPU's context, the legacy default stream's included:
    /// the synchronous `cuMemset`/`cuMemcpyHtoD` calls may return before the bytes are in
    /// device memory, and the copy stream (non-blocking) is not ordered after them. A peer
    /// in another process may read the bytes as soon as this returns.
    fn settle(&self) -> Result<(), KvTransferError> {
        self.ctx
            .synchronize()
            .map_err(driver("waiting for the GPU"))
    }

    fn sync(&self) -> Result<(), KvTransferError> {
        self.stream
            .synchronize()
            .map_err(driver("waiting for the KV copy"))
    }
}

/// A pool of device memory another process on this machine can open.
pub struct CudaPool {
    gpu: Arc<Gpu>,
    ptr: sys::CUdeviceptr,
    len: usize,
}

impl CudaPool {
    /// A zeroed pool of `len` bytes on `gpu`, allocated with `cuMemAlloc` so that it can be
    /// exported.
    pub fn alloc(gpu: &Arc<Gpu>, len: usize) -> Result<CudaPool, KvTransferError> {
        let len = len.max(1);
        gpu.bind()?;
        let what = format!("allocating a KV pool of {len} bytes");
        // SAFETY: a fresh allocation, zeroed before anyone reads it.
        let ptr = unsafe { result::malloc_sync(len) }.map_err(driver(&what))?;
        let pool = CudaPool {
            gpu: gpu.clone(),
            ptr,
            len,
        };
        // SAFETY: `ptr` holds `len` bytes.
        unsafe { result::memset_d8_sync(ptr, 0, len) }.map_err(driver("zeroing the KV pool"))?;
        gpu.settle()?;
        Ok(pool)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn range(&self, offset: usize, bytes: usize) -> Result<sys::CUdeviceptr, KvTransferError> {
        match offset.checked_add(bytes) {
            Some(end) if end <= self.len => Ok(self.ptr + offset as u64),
            _ => Err(KvTransferError::Cuda(format!(
                "{bytes} bytes at {offset} lie outside a pool of {} bytes",
                self.len
            ))),
        }
    }

    /// Copies `src` from host memory to `offset` in the pool.
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<(), KvTransferError> {
        self.write_parts(&[(offset, src)])
    }

    /// Copies each `(offset, bytes)` from host memory into the pool, then waits once for
    /// all of them to land. All or nothing: every range is checked first.
    pub fn write_parts(&self, parts: &[(usize, &[u8])]) -> Result<(), KvTransferError> {
        let dsts = parts
            .iter()
            .map(|(offset, src)| self.range(*offset, src.len()))
            .collect::<Result<Vec<_>, _>>()?;
        self.gpu.bind()?;
        for (dst, (_, src)) in dsts.into_iter().zip(parts) {
            // SAFETY: `dst` holds `src.len()` bytes (checked); a synchronous copy.
            unsafe { result::memcpy_htod_sync(dst, src) }.map_err(driver("writing the KV pool"))?;
        }
        self.gpu.settle()
    }

    /// Copies `dst.len()` bytes at `offset` in the pool to host memory.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), KvTransferError> {
        let src = self.range(offset, dst.len())?;
        self.gpu.bind()?;
        // The copy stream may still be writing this range.
        self.gpu.sync()?;
        // SAFETY: `src` holds `dst.len()` bytes (checked); a synchronous copy.
        unsafe { result::memcpy_dtoh_sync(dst, src) }.map_err(driver("reading the KV pool"))
    }

    /// Serves this pool's IPC handle to peers on this machine under a fresh name, until
    /// the answer is dropped.
    pub fn export(&self) -> Result<CudaExport, KvTransferError> {
        self.gpu.bind()?;
        let mut handle = std::mem::MaybeUninit::<sys::CUipcMemHandle>::uninit();
        // SAFETY: `ptr` is the base of a `cuMemAlloc` allocation; the handle is written.
        let handle = unsafe {
            sys::cuIpcGetMemHandle(handle.as_mut_ptr(), self.ptr)
                .result()
                .map_err(driver("taking the KV pool's IPC handle"))?;
            handle.assume_init()
        };
        let mut hello = [0u8; HELLO_BYTES];
        hello[..8].copy_from_slice(MAGIC);
        hello[8..16].copy_from_slice(&(self.len as u64).to_le_bytes());
        for (out, byte) in hello[16..].iter_mut().zip(handle.reserved) {
            *out = byte as u8;
        }
        let announcer = Announcer::start("dynamo-kv-cuda", move |mut conn: &UnixStream| {
            conn.write_all(&hello)
        })?;
        Ok(CudaExport { announcer })
    }

    /// Copies blocks of `block_bytes` from `peer`'s pool into this one: `moves` lists
    /// (peer block, own block) pairs. Returns once the bytes are in place, after as many
    /// device-to-device copies as there are runs of neighbouring blocks.
    pub fn copy_from_peer(
        &self,
        peer: &CudaPeer,
        moves: &[(u32, u32)],
        block_bytes: usize,
    ) -> Result<usize, KvTransferError> {
        let src = Span {
            name: &peer.name,
            ptr: peer.ptr,
            len: peer.len,
        };
        self.copy_blocks(src, moves, block_bytes)
    }

    /// [`CudaPool::copy_from_peer`] from another pool of this process: the plain
    /// device-to-device copy a hand-off is measured against.
    pub fn copy_from_pool(
        &self,
        other: &CudaPool,
        moves: &[(u32, u32)],
        block_bytes: usize,
    ) -> Result<usize, KvTransferError> {
        let src = Span {
            name: "local pool",
            ptr: other.ptr,
            len: other.len,
        };
        self.copy_blocks(src, moves, block_bytes)
    }

    fn copy_blocks(
        &self,
        src: Span<'_>,
        moves: &[(u32, u32)],
        block_bytes: usize,
    ) -> Result<usize, KvTransferError> {
        let dst = Span {
            name: "own pool",
            ptr: self.ptr,
            len: self.len,
        };
        let runs = runs(moves);
        // All or nothing: every range is checked before the first copy.
        let mut copies = Vec::with_capacity(runs.len());
        for run in &runs {
            let from = src.block_range(run.src, run.blocks, block_bytes)?;
            let to = dst.block_range(run.dst, run.blocks, block_bytes)?;
            copies.push((to, from, run.blocks as usize * block_bytes));
        }
        self.gpu.bind()?;
        let stream = self.gpu.stream.cu_stream();
        for (to, from, bytes) in copies {
            // SAFETY: both ranges were checked against their allocations above; the
            // owner keeps the source blocks pinned until this call returns.
            unsafe { result::memcpy_dtod_async(to, from, bytes, stream) }
                .map_err(driver("copying KV blocks"))?;
        }
        self.gpu.sync()?;
        Ok(runs.len())
    }
}

impl Drop for CudaPool {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            let _ = self.gpu.sync();
            // SAFETY: allocated by `cuMemAlloc` in `alloc`, freed once, copies finished.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Device memory a copy reads or writes, named for errors.
struct Span<'a> {
    name: &'a str,
    ptr: sys::CUdeviceptr,
    len: usize,
}

impl Span<'_> {
    fn block_range(
        &self,
        first: u32,
        blocks: u32,
        block_bytes: usize,
    ) -> Result<sys::CUdeviceptr, KvTransferError> {
        let start = (first as usize).checked_mul(block_bytes);
        let end = (first as usize + blocks as usize).checked_mul(block_bytes);
        match (start, end) {
            (Some(start), Some(end)) if end <= self.len => Ok(self.ptr + start as u64),
            _ => Err(KvTransferError::OutOfRange {
                name: self.name.to_string(),
                block: first.saturating_add(blocks.saturating_sub(1)),
                bytes: block_bytes,
                len: self.len,
            }),
        }
    }
}

/// Neighbouring blocks in both pools, copied at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    src: u32,
    dst: u32,
    blocks: u32,
}

fn runs(moves: &[(u32, u32)]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for &(src, dst) in moves {
        match runs.last_mut() {
            Some(run)
                if run.src.checked_add(run.blocks) == Some(src)
                    && run.dst.checked_add(run.blocks) == Some(dst) =>
            {
                run.blocks += 1
            }
            _ => runs.push(Run {
                src,
                dst,
                blocks: 1,
            }),
        }
    }
    runs
}

/// Tells a pool's IPC handle to every peer that connects, until dropped.
pub struct CudaExport {
    announcer: Announcer,
}

impl CudaExport {
    /// The handle a peer passes to [`CudaPeers::get`].
    pub fn name(&self) -> &str {
        self.announcer.name()
    }
}

/// A peer's pool opened in this process.
pub struct CudaPeer {
    name: String,
    gpu: Arc<Gpu>,
    ptr: sys::CUdeviceptr,
    len: usize,
    /// Open while the export lives.
    conn: UnixStream,
}

impl CudaPeer {
    /// Connects to the export `name` and opens its pool on `gpu`.
    pub fn connect(gpu: &Arc<Gpu>, name: &str) -> Result<CudaPeer, KvTransferError> {
        let fail = |message: String| KvTransferError::Map {
            name: name.to_string(),
            message,
        };
        let mut conn = announce::connect(name)?;
        let mut hello = [0u8; HELLO_BYTES];
        conn.read_exact(&mut hello)
            .map_err(|e| fail(format!("reading the IPC handle: {e}")))?;
        if &hello[..8] != MAGIC {
            return Err(fail("the export is not a CUDA pool".into()));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&hello[8..16]);
        let len = usize::try_from(u64::from_le_bytes(len)).map_err(|e| fail(e.to_string()))?;
        let mut handle = sys::CUipcMemHandle {
            reserved: [0; HANDLE_BYTES],
        };
        for (out, byte) in handle.reserved.iter_mut().zip(&hello[16..]) {
            *out = *byte as std::ffi::c_char;
        }
        gpu.bind()?;
        let mut ptr = 0;
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: `handle` came from `cuIpcGetMemHandle` in the exporting process; the
        // pointer is written on success and closed (never freed) in `drop`.
        unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, handle, flags) }
            .result()
            .map_err(|e| fail(format!("opening the IPC handle: {e}")))?;
        Ok(CudaPeer {
            name: name.to_string(),
            gpu: gpu.clone(),
            ptr,
            len,
            conn,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the export still lives (its connection is open).
    pub fn is_alive(&self) -> bool {
        announce::is_alive(&self.conn)
    }
}

impl Drop for CudaPeer {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            let _ = self.gpu.sync();
            // SAFETY: opened by `cuIpcOpenMemHandle` in `connect`, closed once.
            let _ = unsafe { sys::cuIpcCloseMemHandle(self.ptr) };
        }
    }
}

impl PeerPool for CudaPeer {
    fn is_alive(&self) -> bool {
        CudaPeer::is_alive(self)
    }
}

/// The peers' pools this process opened on one GPU, one per export name.
pub struct CudaPeers {
    gpu: Arc<Gpu>,
    peers: Peers<CudaPeer>,
}

impl CudaPeers {
    pub fn new(gpu: Arc<Gpu>) -> CudaPeers {
        CudaPeers {
            gpu,
            peers: Peers::default(),
        }
    }

    /// The pool of export `name`, opened on first use. Pools of exports that went away
    /// are closed here.
    pub fn get(&self, name: &str) -> Result<Arc<CudaPeer>, KvTransferError> {
        self.peers
            .get_or_open(name, || CudaPeer::connect(&self.gpu, name))
    }

    /// Closes `name` (its owner went away); the next [`CudaPeers::get`] opens it afresh.
    pub fn forget(&self, name: &str) {
        self.peers.forget(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbouring_blocks_are_copied_at_once() {
        let r = |src, dst, blocks| Run { src, dst, blocks };
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(
            runs(&[
                (4, 10),
                (5, 11),
                (6, 12),
                (9, 13),
                (10, 14),
                (3, 20),
                (4, 22)
            ]),
            vec![r(4, 10, 3), r(9, 13, 2), r(3, 20, 1), r(4, 22, 1)]
        );
        // A run never wraps around.
        assert_eq!(
            runs(&[(u32::MAX, 0), (0, 1)]),
            vec![r(u32::MAX, 0, 1), r(0, 1, 1)]
        );
    }

    #[test]
    fn ranges_outside_a_pool_are_refused() {
        let span = Span {
            name: "p",
            ptr: 1 << 20,
            len: 4 * 100,
        };
        assert_eq!(span.block_range(1, 3, 100).ok(), Some((1 << 20) + 100));
        assert!(span.block_range(2, 3, 100).is_err());
        assert!(span.block_range(u32::MAX, 2, usize::MAX / 2).is_err());
    }

    #[test]
    fn a_machine_without_a_driver_says_so() {
        // Either there is a GPU (then it is counted), or the error names the reason.
        match device_count() {
            Ok(_) => {}
            Err(e) => assert!(e.to_string().contains("CUDA"), "{e}"),
        }
    }
}
