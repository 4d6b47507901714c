//! GGML block formats as they sit in a GGUF file, and the panel layout we repack them into.
//!
//! GGML stores a quantized row as `cols / 32` blocks, each a scale (and for Q4_1 a minimum)
//! followed by the quants. The kernels want eight rows side by side instead, so at load each
//! group of [`PANEL`] rows is repacked into a *panel*: for every block index `b`, the eight
//! rows' scales sit next to each other (one 16-byte f16 vector), then their quants are
//! interleaved in 4-byte groups, so one 32-byte load holds four consecutive elements of each
//! of the eight rows. A SIMD lane then *is* an output row, and a block's eight results need no
//! horizontal sum. The repacking moves bytes only (scales stay f16, nibbles stay packed), so a
//! panel has exactly the bytes of its eight GGML rows; the only memory cost is padding the
//! last panel to eight rows (at most seven zero rows per matrix).

use half::f16;

/// Elements per quantization block (GGML's QK4_0 = QK4_1 = QK8_0 = 32).
pub const QK: usize = 32;
/// Weight rows per panel; one f32 lane of a 256-bit vector each.
pub const PANEL: usize = 8;

/// GGML bytes of one block.
pub const Q4_0_BLOCK: usize = 2 + QK / 2;
pub const Q4_1_BLOCK: usize = 4 + QK / 2;
pub const Q8_0_BLOCK: usize = 2 + QK;

/// Panel layout of one block index of a Q4_0 panel: `d[8]` f16, then `qs` (4 × 32 bytes).
pub const Q4_0_PANEL_BLOCK: usize = 2 * PANEL + PANEL * QK / 2;
/// Q4_1: `d[8]` f16, `m[8]` f16, then `qs` (4 × 32 bytes).
pub const Q4_1_PANEL_BLOCK: usize = 4 * PANEL + PANEL * QK / 2;
/// Q8_0: `d[8]` f16, then `qs` (8 × 32 bytes).
pub const Q8_0_PANEL_BLOCK: usize = 2 * PANEL + PANEL * QK;

/// Reads a little-endian f16 at `off` as f32. Callers index inside buffers they sized.
#[inline]
pub fn f16_at(bytes: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([bytes[off], bytes[off + 1]]).to_f32()
}

/// Rounds an f32 to the nearest f16 and back, as GGML does when it stores a scale.
#[inline]
pub fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// The 4-bit kinds share one kernel; they differ in the offset they subtract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Q4Kind {
    /// `x = (q - 8) * d`
    Q4_0,
    /// `x = q * d + m`
    Q4_1,
}

impl Q4Kind {
    pub fn ggml_block(self) -> usize {
        match self {
            Q4Kind::Q4_0 => Q4_0_BLOCK,
            Q4Kind::Q4_1 => Q4_1_BLOCK,
        }
    }
    pub fn panel_block(self) -> usize {
        match self {
            Q4Kind::Q4_0 => Q4_0_PANEL_BLOCK,
            Q4Kind::Q4_1 => Q4_1_PANEL_BLOCK,
        }
    }
    /// Offset of the quants inside a panel block.
    pub fn qs_offset(self) -> usize {
        match self {
            Q4Kind::Q4_0 => 2 * PANEL,
            Q4Kind::Q4_1 => 4 * PANEL,
        }
    }
}

/// Repacks `rows` GGML Q4 rows (`nb` blocks each) into panels; returns the panel bytes.
/// `src` must hold exactly `rows * nb` GGML blocks (the caller checked the length).
pub fn repack_q4(kind: Q4Kind, rows: usize, nb: usize, src: &[u8]) -> Vec<u8> {
    let (gb, pb, qoff) = (kind.ggml_block(), kind.panel_block(), kind.qs_offset());
    let panels = rows.div_ceil(PANEL);
    let mut dst = vec![0u8; panels * nb * pb];
    for r in 0..rows {
        let (p, i) = (r / PANEL, r % PANEL);
        for b in 0..nb {
            let s = &src[(r * nb + b) * gb..][..gb];
            let d = &mut dst[(p * nb + b) * pb..][..pb];
            d[2 * i..2 * i + 2].copy_from_slice(&s[0..2]);
            let qs = match kind {
                Q4Kind::Q4_0 => &s[2..],
                Q4Kind::Q4_1 => {
                    d[2 * PANEL + 2 * i..2 * PANEL + 2 * i + 2].copy_from_slice(&s[2..4]);
                    &s[4..]
                }
            };
            for k in 0..QK / 8 {
                let o = qoff + 32 * k + 4 * i;
                d[o..o + 4].copy_from_slice(&qs[4 * k..4 * k + 4]);
            }
        }
    }
    dst
}

/// Repacks `rows` GGML Q8_0 rows into panels.
pub fn repack_q8_0(rows: usize, nb: usize, src: &[u8]) -> Vec<u8> {
    let pb = Q8_0_PANEL_BLOCK;
    let panels = rows.div_ceil(PANEL);
    let mut dst = vec![0u8; panels * nb * pb];
    for r in 0..rows {
        let (p, i) = (r / PANEL, r % PANEL);
        for b in 0..nb {
            let s = &src[(r * nb + b) * Q8_0_BLOCK..][..Q8_0_BLOCK];
            let d = &mut dst[(p * nb + b) * pb..][..pb];
            d[2 * i..2 * i + 2].copy_from_slice(&s[0..2]);
            for k in 0..QK / 4 {
                let o = 2 * PANEL + 32 * k + 4 * i;
                d[o..o + 4].copy_from_slice(&s[2 + 4 * k..2 + 4 * k + 4]);
            }
        }
    }
    dst
}

/// Dequantizes row `r` of a Q4 panel matrix into `out` (`nb * 32` values).
pub fn dequantize_q4_row(kind: Q4Kind, data: &[u8], nb: usize, r: usize, out: &mut [f32]) {
    let (pb, qoff) = (kind.panel_block(), kind.qs_offset());
    let (p, i) = (r / PANEL, r % PANEL);
    for b in 0..nb {
        let blk = &data[(p * nb + b) * pb..][..pb];
        let d = f16_at(blk, 2 * i);
        let o = &mut out[b * QK..][..QK];
        for k in 0..QK / 8 {
            for t in 0..4 {
                let q = blk[qoff + 32 * k + 4 * i + t];
                let (lo, hi) = (f32::from(q & 0x0F), f32::from(q >> 4));
                let (xl, xh) = match kind {
                    Q4Kind::Q4_0 => ((lo - 8.0) * d, (hi - 8.0) * d),
                    Q4Kind::Q4_1 => {
                        let m = f16_at(blk, 2 * PANEL + 2 * i);
                        (lo * d + m, hi * d + m)
                    }
                };
                o[4 * k + t] = xl;
                o[16 + 4 * k + t] = xh;
            }
        }
    }
}

/// Dequantizes row `r` of a Q8_0 panel matrix into `out`.
pub fn dequantize_q8_0_row(data: &[u8], nb: usize, r: usize, out: &mut [f32]) {
    let pb = Q8_0_PANEL_BLOCK;
    let (p, i) = (r / PANEL, r % PANEL);
    for b in 0..nb {
        let blk = &data[(p * nb + b) * pb..][..pb];
        let d = f16_at(blk, 2 * i);
        for k in 0..QK / 4 {
            for t in 0..4 {
                let q = blk[2 * PANEL + 32 * k + 4 * i + t] as i8;
                out[b * QK + 4 * k + t] = f32::from(q) * d;
            }
        }
    }
}
