//! The paged KV cache: a pool of fixed-size blocks, each holding the keys and values of
//! `block_size` consecutive positions for every layer. A sequence's block table (the
//! scheduler's) says which block holds which positions; attention reads through it.
//!
//! A block is one contiguous run of f32: `[layer][key|value][position][kv_head·head_dim]`,
//! so handing a block to another worker is one copy, and within a layer the keys of a
//! block's positions are adjacent rows.

use dynamo_mocker::BlockId;

pub struct KvPool {
    layers: usize,
    block_size: usize,
    kv_dim: usize,
    num_blocks: usize,
    /// `num_blocks` blocks of `block_floats()`; zeroed lazily by the OS (calloc).
    data: Vec<f32>,
}

impl KvPool {
    pub fn new(layers: usize, kv_dim: usize, block_size: usize, num_blocks: usize) -> KvPool {
        let floats = layers * 2 * block_size * kv_dim * num_blocks;
        KvPool {
            layers,
            block_size,
            kv_dim,
            num_blocks,
            data: vec![0.0; floats],
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn block_floats(&self) -> usize {
        self.layers * 2 * self.block_size * self.kv_dim
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.block_floats() * 4
    }

    /// Index of the first float of `(block, layer, key|value)`.
    fn base(&self, block: BlockId, layer: usize, value: bool) -> usize {
        block as usize * self.block_floats()
            + (layer * 2 + usize::from(value)) * self.block_size * self.kv_dim
    }

    /// The key (or value) rows of `layer` in `block`: `block_size` rows of `kv_dim`.
    pub fn rows(&self, block: BlockId, layer: usize, value: bool) -> &[f32] {
        let base = self.base(block, layer, value);
        &self.data[base..base + self.block_size * self.kv_dim]
    }

    /// Writes the key and value of position `pos` (held by `table`) in `layer`.
    pub fn write(&mut self, table: &[BlockId], pos: usize, layer: usize, k: &[f32], v: &[f32]) {
        let block = table[pos / self.block_size];
        let row = (pos % self.block_size) * self.kv_dim;
        let kb = self.base(block, layer, false) + row;
        self.data[kb..kb + self.kv_dim].copy_from_slice(k);
        let vb = self.base(block, layer, true) + row;
        self.data[vb..vb + self.kv_dim].copy_from_slice(v);
    }

    /// Appends the bytes of `blocks` to `out` (the pool's f32 in native byte order; every
    /// target this engine builds for is little-endian, as the KV layout assumes).
    pub fn export(&self, blocks: &[BlockId], out: &mut Vec<u8>) {
        let n = self.block_floats();
        out.reserve(blocks.len() * n * 4);
        for &b in blocks {
            let start = b as usize * n;
            out.extend_from_slice(bytemuck::cast_slice(&self.data[start..start + n]));
        }
    }

    /// Overwrites `blocks` with `bytes`; false when the length or a block id is wrong.
    pub fn import(&mut self, blocks: &[BlockId], bytes: &[u8]) -> bool {
        let n = self.block_floats();
        if bytes.len() != blocks.len() * n * 4
            || blocks.iter().any(|&b| b as usize >= self.num_blocks)
        {
            return false;
        }
        for (&b, chunk) in blocks.iter().zip(bytes.chunks_exact(n * 4)) {
            let start = b as usize * n;
            let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut self.data[start..start + n]);
            dst.copy_from_slice(chunk);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_land_in_their_blocks_and_survive_export_import() {
        let mut pool = KvPool::new(2, 3, 4, 8);
        let table = [5, 2];
        for pos in 0..8 {
            let k = [pos as f32; 3];
            let v = [-(pos as f32); 3];
            pool.write(&table, pos, 1, &k, &v);
        }
        assert_eq!(pool.rows(2, 1, false)[3..6], [5.0; 3]);
        assert_eq!(pool.rows(5, 1, true)[9..12], [-3.0; 3]);
        let mut bytes = Vec::new();
        pool.export(&table, &mut bytes);
        assert_eq!(bytes.len(), 2 * pool.block_bytes());
        let mut other = KvPool::new(2, 3, 4, 8);
        assert!(other.import(&[0, 7], &bytes));
        assert_eq!(other.rows(7, 1, false), pool.rows(2, 1, false));
        assert_eq!(other.rows(0, 1, true), pool.rows(5, 1, true));
        assert!(!other.import(&[0], &bytes), "length mismatch accepted");
        assert!(
            !other.import(&[0, 8], &bytes),
            "block out of range accepted"
        );
    }
}
