//! The paged KV cache: a pool of fixed-size blocks, each holding the keys and values of
//! `block_size` consecutive positions for every layer, in f16 (as llama.cpp keeps its
//! cache: half the memory and hand-off bytes of f32, widened in registers by attention).
//! A sequence's block table (the scheduler's) says which block holds which positions.
//!
//! A block is one contiguous run: `[layer][key|value][position][kv_head·head_dim]`, so
//! handing a block to another worker is one copy, and within a layer the keys of a
//! block's positions are adjacent rows. The pool is a shared-memory segment (a memfd,
//! [`ShmSegment`]): pages cost memory only once a block is written, so a large pool is
//! cheap until it fills, and a decode worker on this machine can map it
//! ([`KvPool::share`]) and copy a prefill's blocks straight out of it.

use dynamo_mocker::BlockId;
use dynamo_runtime::kv_transfer::{copy_blocks, ShmExport, ShmSegment};

pub struct KvPool {
    layers: usize,
    block_size: usize,
    kv_dim: usize,
    num_blocks: usize,
    /// `num_blocks` blocks of `block_elems()` f16 values (as bits).
    map: ShmSegment,
}

/// Bytes of one pool element.
pub const ELEM_BYTES: usize = 2;

impl KvPool {
    /// Reserves the pool; fails only when the address space cannot be had.
    pub fn new(
        layers: usize,
        kv_dim: usize,
        block_size: usize,
        num_blocks: usize,
    ) -> std::io::Result<KvPool> {
        let elems = layers * 2 * block_size * kv_dim * num_blocks;
        // A zero-length mapping is an error; the segment keeps one page for an empty pool.
        let map = ShmSegment::create("dynamo-kv-pool", elems * ELEM_BYTES)
            .map_err(std::io::Error::other)?;
        Ok(KvPool {
            layers,
            block_size,
            kv_dim,
            num_blocks,
            map,
        })
    }

    /// Serves the pool to peers on this machine (see [`ShmExport`]).
    pub fn share(&self) -> std::io::Result<ShmExport> {
        self.map.export().map_err(std::io::Error::other)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn block_elems(&self) -> usize {
        self.layers * 2 * self.block_size * self.kv_dim
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.block_elems() * ELEM_BYTES
    }

    fn elems(&self) -> &[u16] {
        // Page-aligned and a multiple of 2 bytes long: the cast cannot fail.
        bytemuck::cast_slice(self.map.as_slice())
    }

    fn elems_mut(&mut self) -> &mut [u16] {
        bytemuck::cast_slice_mut(self.map.as_mut_slice())
    }

    /// Index of the first element of `(block, layer, key|value)`.
    fn base(&self, block: BlockId, layer: usize, value: bool) -> usize {
        block as usize * self.block_elems()
            + (layer * 2 + usize::from(value)) * self.block_size * self.kv_dim
    }

    /// The key (or value) rows of `layer` in `block`: `block_size` rows of `kv_dim` f16.
    pub fn rows(&self, block: BlockId, layer: usize, value: bool) -> &[u16] {
        let base = self.base(block, layer, value);
        &self.elems()[base..base + self.block_size * self.kv_dim]
    }

    /// Writes the key and value of position `pos` (held by `table`) in `layer`.
    pub fn write(&mut self, table: &[BlockId], pos: usize, layer: usize, k: &[f32], v: &[f32]) {
        let block = table[pos / self.block_size];
        let row = (pos % self.block_size) * self.kv_dim;
        let kb = self.base(block, layer, false) + row;
        let vb = self.base(block, layer, true) + row;
        let kv_dim = self.kv_dim;
        let elems = self.elems_mut();
        for (dst, &x) in elems[kb..kb + kv_dim].iter_mut().zip(k) {
            *dst = half::f16::from_f32(x).to_bits();
        }
        for (dst, &x) in elems[vb..vb + kv_dim].iter_mut().zip(v) {
            *dst = half::f16::from_f32(x).to_bits();
        }
    }

    /// Appends the bytes of `blocks` to `out` (f16 in native byte order; every target this
    /// engine builds for is little-endian, as the KV layout assumes).
    pub fn export(&self, blocks: &[BlockId], out: &mut Vec<u8>) {
        let n = self.block_bytes();
        out.reserve(blocks.len() * n);
        for &b in blocks {
            let start = b as usize * n;
            out.extend_from_slice(&self.map.as_slice()[start..start + n]);
        }
    }

    /// Overwrites each of `blocks` with its slice of `src` (on several cores when the
    /// hand-off is large: [`copy_blocks`]); false, with nothing written, when a slice's
    /// length or a block id is wrong or a block repeats.
    pub fn import(&mut self, blocks: &[BlockId], src: &[&[u8]]) -> bool {
        let n = self.block_bytes();
        let pool_bytes = self.num_blocks * n;
        match self.map.as_mut_slice().get_mut(..pool_bytes) {
            Some(pool) => copy_blocks(pool, n, blocks, src).is_ok(),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_land_in_their_blocks_and_survive_export_import() {
        let mut pool = KvPool::new(2, 3, 4, 8).unwrap();
        let table = [5, 2];
        for pos in 0..8 {
            let k = [pos as f32; 3];
            let v = [-(pos as f32); 3];
            pool.write(&table, pos, 1, &k, &v);
        }
        let widen = |r: &[u16]| {
            r.iter()
                .map(|&b| half::f16::from_bits(b).to_f32())
                .collect::<Vec<_>>()
        };
        assert_eq!(widen(&pool.rows(2, 1, false)[3..6]), [5.0; 3]);
        assert_eq!(widen(&pool.rows(5, 1, true)[9..12]), [-3.0; 3]);
        let mut bytes = Vec::new();
        pool.export(&table, &mut bytes);
        assert_eq!(bytes.len(), 2 * pool.block_bytes());
        let mut other = KvPool::new(2, 3, 4, 8).unwrap();
        let halves: Vec<&[u8]> = bytes.chunks(pool.block_bytes()).collect();
        assert!(other.import(&[0, 7], &halves));
        assert_eq!(other.rows(7, 1, false), pool.rows(2, 1, false));
        assert_eq!(other.rows(0, 1, true), pool.rows(5, 1, true));
        assert!(!other.import(&[0], &halves), "count mismatch accepted");
        assert!(!other.import(&[0], &[&bytes]), "length mismatch accepted");
        assert!(
            !other.import(&[0, 8], &halves),
            "block out of range accepted"
        );
    }
}
