//! [`QMatrix`]: one weight matrix in a kernel-friendly layout, and the matmul driver.

use super::activation::Workspace;
use super::error::QuantError;
use super::format::{self, Q4Kind, PANEL, Q8_0_PANEL_BLOCK, QK};
use super::kernels::{self, Isa, PanelOut, MAX_R};
use super::pool::ComputePool;
use super::simd;
use dynamo_preprocessor::gguf::GgmlType;
use half::f16;

/// Activation bytes (i8 quants) one tile of the large-`n` loop keeps hot in L2 while every
/// panel of the thread's share streams past it (L2 is 512 KiB per core on Zen 3/4).
const ACT_TILE_BYTES: usize = 128 * 1024;

/// Chunks of panels per pool thread in a multi-threaded matmul.
const CHUNKS_PER_THREAD: usize = 8;

/// One weight matrix: `rows` output features × `cols` input features.
///
/// Memory: Q4_0/Q4_1/Q8_0 keep exactly their GGML bytes, repacked into 8-row panels (see
/// [`format`]), plus zero rows padding the last panel to 8 (≤ 7 rows per matrix; none for
/// SmolLM2, whose row counts are multiples of 8). F32 is kept as is; F16 is widened to f32 at
/// load (2× its file size) since only small tensors use it.
#[derive(Debug, Clone)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    storage: Storage,
}

#[derive(Debug, Clone)]
enum Storage {
    Q4 { kind: Q4Kind, panels: Vec<u8> },
    Q8_0 { panels: Vec<u8> },
    F32 { data: Vec<f32>, from_f16: bool },
}

impl QMatrix {
    /// Copies (and repacks) a GGML tensor of `rows × cols` (GGUF dims `[cols, rows]`).
    pub fn from_ggml(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<QMatrix, QuantError> {
        if rows == 0 || cols == 0 {
            return Err(QuantError::EmptyShape { rows, cols });
        }
        let (name, unit) = match ty {
            GgmlType::F32 => ("F32", 4),
            GgmlType::F16 => ("F16", 2),
            GgmlType::Q4_0 => ("Q4_0", format::Q4_0_BLOCK),
            GgmlType::Q4_1 => ("Q4_1", format::Q4_1_BLOCK),
            GgmlType::Q8_0 => ("Q8_0", format::Q8_0_BLOCK),
            other => return Err(QuantError::UnsupportedType(format!("{other:?}"))),
        };
        let blocked = !matches!(ty, GgmlType::F32 | GgmlType::F16);
        if blocked && cols % QK != 0 {
            return Err(QuantError::ColsNotBlockMultiple { ty: name, cols });
        }
        let per_row = if blocked { cols / QK } else { cols };
        let expected = rows
            .checked_mul(per_row)
            .and_then(|v| v.checked_mul(unit))
            .unwrap_or(usize::MAX);
        if bytes.len() != expected {
            return Err(QuantError::WrongByteLength {
                ty: name,
                rows,
                cols,
                expected,
                got: bytes.len(),
            });
        }
        let nb = cols / QK;
        let storage = match ty {
            GgmlType::Q4_0 => Storage::Q4 {
                kind: Q4Kind::Q4_0,
                panels: format::repack_q4(Q4Kind::Q4_0, rows, nb, bytes),
            },
            GgmlType::Q4_1 => Storage::Q4 {
                kind: Q4Kind::Q4_1,
                panels: format::repack_q4(Q4Kind::Q4_1, rows, nb, bytes),
            },
            GgmlType::Q8_0 => Storage::Q8_0 {
                panels: format::repack_q8_0(rows, nb, bytes),
            },
            GgmlType::F16 => Storage::F32 {
                data: bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                from_f16: true,
            },
            _ => Storage::F32 {
                data: bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                from_f16: false,
            },
        };
        Ok(QMatrix {
            rows,
            cols,
            storage,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The GGML type the matrix was loaded from.
    pub fn type_name(&self) -> &'static str {
        match &self.storage {
            Storage::Q4 {
                kind: Q4Kind::Q4_0, ..
            } => "Q4_0",
            Storage::Q4 {
                kind: Q4Kind::Q4_1, ..
            } => "Q4_1",
            Storage::Q8_0 { .. } => "Q8_0",
            Storage::F32 { from_f16: true, .. } => "F16",
            Storage::F32 { .. } => "F32",
        }
    }

    /// Bytes held for the weights (including panel padding).
    pub fn memory_bytes(&self) -> usize {
        match &self.storage {
            Storage::Q4 { panels, .. } | Storage::Q8_0 { panels } => panels.len(),
            Storage::F32 { data, .. } => data.len() * 4,
        }
    }

    /// Writes row `row` as f32 into `out[..cols]` (the embedding lookup).
    ///
    /// Panics if `row >= rows()` or `out.len() < cols()`: both are the caller's bug (a
    /// token id is checked against the vocabulary before it gets here).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.rows, "row {row} >= {}", self.rows);
        let out = &mut out[..self.cols];
        let nb = self.cols / QK;
        match &self.storage {
            Storage::Q4 { kind, panels } => format::dequantize_q4_row(*kind, panels, nb, row, out),
            Storage::Q8_0 { panels } => format::dequantize_q8_0_row(panels, nb, row, out),
            Storage::F32 { data, .. } => out.copy_from_slice(&data[row * self.cols..][..self.cols]),
        }
    }

    /// `out[n × rows] = x[n × cols] · Wᵀ`, all row-major, with the fastest kernel path.
    ///
    /// Block types quantize `x` per 32-block to 8 bits first (llama.cpp's Q8_1 for Q4_1,
    /// Q8_0 otherwise). Panics if `x` or `out` is shorter than `n` rows.
    pub fn matmul(
        &self,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        ws: &mut Workspace,
        pool: &ComputePool,
    ) {
        self.matmul_with(Isa::detect(), x, n, out, ws, pool);
    }

    /// [`QMatrix::matmul`] on a chosen path (`isa` must come from [`Isa::available`]).
    pub(crate) fn matmul_with(
        &self,
        isa: Isa,
        x: &[f32],
        n: usize,
        out: &mut [f32],
        ws: &mut Workspace,
        pool: &ComputePool,
    ) {
        let (rows, cols) = (self.rows, self.cols);
        assert!(
            x.len() >= n * cols,
            "x has {} values, need {n}x{cols}",
            x.len()
        );
        assert!(
            out.len() >= n * rows,
            "out has {} values, need {n}x{rows}",
            out.len()
        );
        if n == 0 {
            return;
        }
        let out_ptr = OutPtr(out.as_mut_ptr());
        let panels = rows.div_ceil(PANEL);
        // Several chunks per thread, claimed dynamically: a thread the OS delays leaves its
        // share to the others instead of holding up the whole matmul.
        let chunks = if pool.threads() == 1 {
            1
        } else {
            (pool.threads() * CHUNKS_PER_THREAD).min(panels)
        };
        match &self.storage {
            Storage::F32 { data, .. } => pool.run(chunks, &|c| {
                for p in split(panels, c, chunks) {
                    for r in p * PANEL..((p + 1) * PANEL).min(rows) {
                        let w = &data[r * cols..][..cols];
                        for j in 0..n {
                            let v = simd::dot(&x[j * cols..][..cols], w);
                            // SAFETY: (j, r) is in bounds and owned by this chunk's rows.
                            unsafe { out_ptr.write(j * rows + r, v) };
                        }
                    }
                }
            }),
            Storage::Q4 { kind, panels: data } => {
                ws.acts.quantize(&x[..n * cols], n, cols);
                let acts = &ws.acts;
                let pb = cols / QK * kind.panel_block();
                pool.run(chunks, &|c| {
                    self.drive(split(panels, c, chunks), n, &out_ptr, |p, j0, r, buf| {
                        kernels::q4_panel(isa, *kind, &data[p * pb..][..pb], acts, j0, r, buf)
                    })
                });
            }
            Storage::Q8_0 { panels: data } => {
                ws.acts.quantize(&x[..n * cols], n, cols);
                let acts = &ws.acts;
                let pb = cols / QK * Q8_0_PANEL_BLOCK;
                pool.run(chunks, &|c| {
                    self.drive(split(panels, c, chunks), n, &out_ptr, |p, j0, r, buf| {
                        kernels::q8_0_panel(isa, &data[p * pb..][..pb], acts, j0, r, buf)
                    })
                });
            }
        }
    }

    /// The tiled loop of one thread: activation tiles that fit in L2 outside, this thread's
    /// panels inside (one panel stays in L1 while up to `MAX_R` activation rows at a time
    /// pass over it), then the `R × 8` results are scattered into `out`.
    fn drive(
        &self,
        panels: std::ops::Range<usize>,
        n: usize,
        out: &OutPtr,
        kernel: impl Fn(usize, usize, usize, &mut PanelOut),
    ) {
        let rows = self.rows;
        let tile = (ACT_TILE_BYTES / self.cols).max(MAX_R) / MAX_R * MAX_R;
        let mut buf: PanelOut = [[0.0; PANEL]; MAX_R];
        for jt in (0..n).step_by(tile) {
            let jend = (jt + tile).min(n);
            for p in panels.clone() {
                let live = PANEL.min(rows - p * PANEL);
                let mut j = jt;
                while j < jend {
                    let r = MAX_R.min(jend - j);
                    kernel(p, j, r, &mut buf);
                    for (jj, res) in buf.iter().enumerate().take(r) {
                        for (i, v) in res.iter().enumerate().take(live) {
                            // SAFETY: row p*8+i < rows, activation row j+jj < n; panel p
                            // belongs to this chunk only.
                            unsafe { out.write((j + jj) * rows + p * PANEL + i, *v) };
                        }
                    }
                    j += r;
                }
            }
        }
    }
}

/// Range `part` of `0..total` split in `parts` nearly equal contiguous ranges.
fn split(total: usize, part: usize, parts: usize) -> std::ops::Range<usize> {
    total * part / parts..total * (part + 1) / parts
}

/// The output buffer shared by the chunks of one matmul; each writes only its rows.
struct OutPtr(*mut f32);
// SAFETY: chunks write disjoint elements, and `ComputePool::run` returns only after all
// of them finished, before the borrow of `out` ends.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `i` is inside the buffer and no other thread writes it.
    unsafe fn write(&self, i: usize, v: f32) {
        *self.0.add(i) = v;
    }
}

#[cfg(test)]
#[path = "matrix_tests.rs"]
mod tests;
