//! The mocker's GPU-resident KV pool (`device = "cuda"`): the bytes of its blocks live in
//! device memory, so a hand-off to a decode worker on the same machine goes by CUDA IPC,
//! without a CUDA model.
//!
//! The timing model computes nothing, so a prefill worker writes the fabricated bytes of
//! the blocks it hands over ([`crate::payload`]) into its pool when it pins them, as if
//! its forward pass had just left them there. The decode worker opens the prefill
//! worker's pool once by its IPC handle, copies the blocks device to device into the
//! pool blocks its block manager gave the chain, then reads them back and checks every
//! byte against the hashes: a hand-off that moved the wrong bytes fails instead of
//! caching them.

use dynamo_protocol::BlockHash;
use dynamo_runtime::kv_transfer::{CudaExport, CudaPeers, CudaPool, Gpu, KvTransferError};

use crate::payload::{fabricate, verify_block};

/// A pool of `num_blocks` blocks on this process's GPU 0, exported to peers.
pub(crate) struct GpuKv {
    // Dropped in this order: peers stop being told the handle, opened peers close, then
    // the pool is freed.
    export: CudaExport,
    peers: CudaPeers,
    pool: CudaPool,
    block_bytes: usize,
}

impl GpuKv {
    pub(crate) fn open(num_blocks: usize, block_bytes: usize) -> Result<GpuKv, KvTransferError> {
        let gpu = Gpu::open(0)?;
        let bytes = num_blocks.checked_mul(block_bytes).ok_or_else(|| {
            KvTransferError::Cuda(format!(
                "{num_blocks} blocks of {block_bytes} bytes overflow"
            ))
        })?;
        let pool = CudaPool::alloc(&gpu, bytes)?;
        let export = pool.export()?;
        Ok(GpuKv {
            export,
            peers: CudaPeers::new(gpu),
            pool,
            block_bytes,
        })
    }

    /// The name peers open the pool by.
    pub(crate) fn name(&self) -> &str {
        self.export.name()
    }

    /// Writes the fabricated bytes of `hashes` into pool blocks `ids`.
    pub(crate) fn fill(&self, ids: &[u32], hashes: &[BlockHash]) -> Result<(), String> {
        let n = ids.len().min(hashes.len());
        self.write_blocks(&ids[..n], &fabricate(&hashes[..n], self.block_bytes))
    }

    /// Writes `bytes` (one block per id, back to back) into pool blocks `ids`.
    pub(crate) fn write_blocks(&self, ids: &[u32], bytes: &[u8]) -> Result<(), String> {
        if bytes.len() != ids.len() * self.block_bytes {
            return Err(format!(
                "{} bytes do not fill {} blocks of {} bytes",
                bytes.len(),
                ids.len(),
                self.block_bytes
            ));
        }
        let parts: Vec<(usize, &[u8])> = (ids.iter())
            .map(|&id| id as usize * self.block_bytes)
            .zip(bytes.chunks_exact(self.block_bytes.max(1)))
            .collect();
        self.pool.write_parts(&parts).map_err(|e| e.to_string())
    }

    /// Copies the peer `pool`'s blocks `from` into own blocks `to` (one per hash, in
    /// order) and checks each against its hash.
    pub(crate) fn import(
        &self,
        pool: &str,
        from: &[u32],
        to: &[u32],
        hashes: &[BlockHash],
    ) -> Result<(), String> {
        if from.len() != to.len() || to.len() != hashes.len() {
            return Err(format!(
                "{} peer blocks, {} own blocks and {} hashes",
                from.len(),
                to.len(),
                hashes.len()
            ));
        }
        let peer = self.peers.get(pool).map_err(|e| e.to_string())?;
        let moves: Vec<(u32, u32)> = from.iter().copied().zip(to.iter().copied()).collect();
        if let Err(e) = self.pool.copy_from_peer(&peer, &moves, self.block_bytes) {
            // The peer may have gone (a restarted prefill worker): open it afresh next time.
            self.peers.forget(pool);
            return Err(e.to_string());
        }
        let mut block = vec![0u8; self.block_bytes];
        for (i, (&id, &hash)) in to.iter().zip(hashes).enumerate() {
            self.pool
                .read(id as usize * self.block_bytes, &mut block)
                .map_err(|e| e.to_string())?;
            verify_block(hash, &block).map_err(|m| {
                format!(
                    "block {i} ({hash:#018x}) copied from `{pool}` differs at byte {}",
                    m.offset
                )
            })?;
        }
        Ok(())
    }
}
