//! llama.cpp's serialised KV state of one sequence (`llama_state_seq_get_data`) and the
//! engine's pool blocks, converted both ways.
//!
//! The state of one sequence in a one-stream cache is (llama.cpp `llama_kv_cache::
//! state_write`, the version vendored by llama-cpp-sys-2 0.1.161):
//!
//! ```text
//! u32 magic (0xaf143cd8)  i32 seq_id                      (llama_context::state_seq_get_data)
//! u32 n_stream (1)  u32 cell_count (N)
//! N × { i32 pos, u32 n_seq_id (1), i32 seq_id }          cells in cache order
//! u32 v_trans  u32 n_layer  u32 n_rot_k  u32 n_rot_v
//! n_layer × { i32 k_type, u64 k_row, N × k_row bytes }
//! v_trans = 0: n_layer × { i32 v_type, u64 v_row, N × v_row bytes }
//! v_trans = 1: n_layer × { i32 v_type, u32 v_elem, u32 n_embd_v, n_embd_v × N × v_elem }
//! ```
//!
//! A pool block holds `block_size` positions of every layer, layer after layer: the
//! keys of its positions (`k_row` bytes each), then their values (`v_row` bytes each,
//! never transposed). That is the layout a [`dynamo_protocol::KvLayout`] describes, so
//! blocks go to a decode worker as they are.

/// llama.cpp's mark at the start of a sequence state.
pub const MAGIC: u32 = 0xaf14_3cd8;

/// How one context serialises its KV cache: read once from a probe sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateFormat {
    pub layers: usize,
    pub v_trans: bool,
    pub n_rot_k: u32,
    pub n_rot_v: u32,
    pub k_type: i32,
    pub v_type: i32,
    /// Bytes of one position's keys in one layer.
    pub k_row: usize,
    /// Bytes of one position's values in one layer.
    pub v_row: usize,
    /// Bytes of one value element (for the transposed layout).
    pub v_elem: usize,
}

impl StateFormat {
    /// Bytes of one pool block of `block_size` positions.
    pub fn block_bytes(&self, block_size: usize) -> usize {
        self.layers * block_size * (self.k_row + self.v_row)
    }
}

/// Why a state could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the KV state ends at byte {0}, before its end")]
    Truncated(usize),
    #[error("the KV state starts with {0:#010x}, not llama.cpp's sequence-state mark")]
    Magic(u32),
    #[error("the KV state has {0} streams; one (a unified cache) is supported")]
    Streams(u32),
    #[error("a KV cell belongs to {0} sequences; a sequence's state has one per cell")]
    SharedCell(u32),
    #[error("KV layers differ in {0}: per-layer KV shapes are not supported")]
    MixedLayers(&'static str),
    #[error("the KV state's format changed: {0}")]
    Changed(String),
    #[error("the KV state has no position {0}")]
    MissingPosition(usize),
    #[error("{bytes} bytes are not {blocks} blocks of {block_bytes} bytes")]
    BlockSize {
        bytes: usize,
        blocks: usize,
        block_bytes: usize,
    },
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(StateError::Truncated(self.at))?;
        let out = self
            .bytes
            .get(self.at..end)
            .ok_or(StateError::Truncated(self.bytes.len()))?;
        self.at = end;
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32, StateError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32(&mut self) -> Result<i32, StateError> {
        Ok(self.u32()? as i32)
    }
    fn u64(&mut self) -> Result<u64, StateError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn usize64(&mut self) -> Result<usize, StateError> {
        usize::try_from(self.u64()?).map_err(|_| StateError::Truncated(self.at))
    }
}

/// A parsed sequence state: where each position's rows are in the bytes.
pub struct SeqState<'a> {
    bytes: &'a [u8],
    pub format: StateFormat,
    /// Cells in the state's order.
    cells: usize,
    /// The cell holding each position (`usize::MAX` where none does).
    cell_of: Vec<usize>,
    /// Per layer: where its key rows start.
    k_at: Vec<usize>,
    /// Per layer: where its value rows (or transposed elements) start.
    v_at: Vec<usize>,
}

impl<'a> SeqState<'a> {
    /// Reads `bytes`, the state of one sequence.
    pub fn parse(bytes: &'a [u8]) -> Result<SeqState<'a>, StateError> {
        let mut r = Reader { bytes, at: 0 };
        let magic = r.u32()?;
        if magic != MAGIC {
            return Err(StateError::Magic(magic));
        }
        r.take(4)?; // the sequence it was read from
        let streams = r.u32()?;
        if streams != 1 {
            return Err(StateError::Streams(streams));
        }
        let cells = r.u32()? as usize;
        let mut cell_of = Vec::new();
        for cell in 0..cells {
            let pos = r.i32()?;
            let n_seq = r.u32()?;
            if n_seq != 1 {
                return Err(StateError::SharedCell(n_seq));
            }
            r.take(4)?; // the sequence id
            let Ok(pos) = usize::try_from(pos) else {
                continue;
            };
            if cell_of.len() <= pos {
                cell_of.resize(pos + 1, usize::MAX);
            }
            cell_of[pos] = cell;
        }
        let empty = StateFormat {
            layers: 0,
            v_trans: false,
            n_rot_k: 0,
            n_rot_v: 0,
            k_type: 0,
            v_type: 0,
            k_row: 0,
            v_row: 0,
            v_elem: 0,
        };
        if cells == 0 {
            return Ok(SeqState {
                bytes,
                format: empty,
                cells,
                cell_of,
                k_at: Vec::new(),
                v_at: Vec::new(),
            });
        }
        let v_trans = r.u32()? != 0;
        let layers = r.u32()? as usize;
        let n_rot_k = r.u32()?;
        let n_rot_v = r.u32()?;
        let mut f = StateFormat {
            layers,
            v_trans,
            n_rot_k,
            n_rot_v,
            ..empty
        };
        let mut k_at = Vec::with_capacity(layers);
        for l in 0..layers {
            let (ty, row) = (r.i32()?, r.usize64()?);
            if l == 0 {
                (f.k_type, f.k_row) = (ty, row);
            } else if (ty, row) != (f.k_type, f.k_row) {
                return Err(StateError::MixedLayers("keys"));
            }
            k_at.push(r.at);
            r.take(cells * row)?;
        }
        let mut v_at = Vec::with_capacity(layers);
        for l in 0..layers {
            let ty = r.i32()?;
            let (row, elem) = if v_trans {
                let elem = r.u32()? as usize;
                let embd = r.u32()? as usize;
                (elem * embd, elem)
            } else {
                (r.usize64()?, 0)
            };
            if l == 0 {
                (f.v_type, f.v_row, f.v_elem) = (ty, row, elem);
            } else if (ty, row, elem) != (f.v_type, f.v_row, f.v_elem) {
                return Err(StateError::MixedLayers("values"));
            }
            v_at.push(r.at);
            r.take(cells * row)?;
        }
        if r.at != bytes.len() {
            return Err(StateError::Changed(format!(
                "{} bytes follow the last layer",
                bytes.len() - r.at
            )));
        }
        Ok(SeqState {
            bytes,
            format: f,
            cells,
            cell_of,
            k_at,
            v_at,
        })
    }

    /// Positions `0..n` that the state holds, counted from 0 (stops at the first gap).
    pub fn positions(&self) -> usize {
        self.cell_of
            .iter()
            .position(|&c| c == usize::MAX)
            .unwrap_or(self.cell_of.len())
    }

    /// Writes positions `first..first + block_size` into `block` in pool layout.
    pub fn copy_block(
        &self,
        first: usize,
        block_size: usize,
        block: &mut [u8],
    ) -> Result<(), StateError> {
        let f = &self.format;
        let per_layer = block_size * (f.k_row + f.v_row);
        if block.len() != f.layers * per_layer {
            return Err(StateError::BlockSize {
                bytes: block.len(),
                blocks: 1,
                block_bytes: f.layers * per_layer,
            });
        }
        for i in 0..block_size {
            let pos = first + i;
            let cell = match self.cell_of.get(pos) {
                Some(&c) if c != usize::MAX => c,
                _ => return Err(StateError::MissingPosition(pos)),
            };
            for l in 0..f.layers {
                let dst = &mut block[l * per_layer..(l + 1) * per_layer];
                let k = self.k_at[l] + cell * f.k_row;
                dst[i * f.k_row..(i + 1) * f.k_row].copy_from_slice(&self.bytes[k..k + f.k_row]);
                let v_dst = &mut dst[block_size * f.k_row + i * f.v_row..][..f.v_row];
                if f.v_trans {
                    let e = f.v_elem;
                    for (j, out) in v_dst.chunks_exact_mut(e).enumerate() {
                        let at = self.v_at[l] + (j * self.cells + cell) * e;
                        out.copy_from_slice(&self.bytes[at..at + e]);
                    }
                } else {
                    let v = self.v_at[l] + cell * f.v_row;
                    v_dst.copy_from_slice(&self.bytes[v..v + f.v_row]);
                }
            }
        }
        Ok(())
    }
}

/// The state of a sequence holding positions `0..positions`, read from the pool blocks
/// that hold them (`ceil(positions / block_size)` blocks, in order).
pub fn build(
    f: &StateFormat,
    block_size: usize,
    positions: usize,
    blocks: &[&[u8]],
) -> Result<Vec<u8>, StateError> {
    let per_layer = block_size * (f.k_row + f.v_row);
    let needed = positions.div_ceil(block_size);
    if blocks.len() < needed || blocks.iter().any(|b| b.len() != f.layers * per_layer) {
        return Err(StateError::BlockSize {
            bytes: blocks.iter().map(|b| b.len()).sum(),
            blocks: needed,
            block_bytes: f.layers * per_layer,
        });
    }
    let n = positions;
    let size = 16 + 12 * n + 16 + f.layers * (12 + n * f.k_row) + f.layers * (12 + n * f.v_row);
    let mut out = Vec::with_capacity(size);
    let put32 = |out: &mut Vec<u8>, v: u32| out.extend_from_slice(&v.to_le_bytes());
    let count = u32::try_from(n).map_err(|_| StateError::Changed("too many positions".into()))?;
    put32(&mut out, MAGIC);
    put32(&mut out, 0);
    put32(&mut out, 1);
    put32(&mut out, count);
    for pos in 0..count {
        put32(&mut out, pos);
        put32(&mut out, 1);
        put32(&mut out, 0);
    }
    put32(&mut out, u32::from(f.v_trans));
    put32(&mut out, f.layers as u32);
    put32(&mut out, f.n_rot_k);
    put32(&mut out, f.n_rot_v);
    let row = |pos: usize, l: usize| -> (&[u8], &[u8]) {
        let block = &blocks[pos / block_size][l * per_layer..(l + 1) * per_layer];
        let i = pos % block_size;
        let k = &block[i * f.k_row..(i + 1) * f.k_row];
        let v = &block[block_size * f.k_row + i * f.v_row..][..f.v_row];
        (k, v)
    };
    for l in 0..f.layers {
        put32(&mut out, f.k_type as u32);
        out.extend_from_slice(&(f.k_row as u64).to_le_bytes());
        for pos in 0..n {
            out.extend_from_slice(row(pos, l).0);
        }
    }
    for l in 0..f.layers {
        put32(&mut out, f.v_type as u32);
        if f.v_trans {
            let e = f.v_elem.max(1);
            put32(&mut out, e as u32);
            put32(&mut out, (f.v_row / e) as u32);
            for j in 0..f.v_row / e {
                for pos in 0..n {
                    out.extend_from_slice(&row(pos, l).1[j * e..(j + 1) * e]);
                }
            }
        } else {
            out.extend_from_slice(&(f.v_row as u64).to_le_bytes());
            for pos in 0..n {
                out.extend_from_slice(row(pos, l).1);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
