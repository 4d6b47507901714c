//! Activation quantization: f32 rows to 8-bit blocks, the way llama.cpp's x86 path does it.
//!
//! Per 32-element block: `d = amax / 127` (stored as f16), `q = round_ties_even(x * 127 / amax)`
//! (what `_mm256_round_ps(_MM_ROUND_NEAREST)` does in `quantize_row_q8_0/q8_1`), and for
//! Q8_1 `s = f16(d * Σq)` with the unrounded `d`. One layout serves both: Q8_0 ignores `s`.
//! We also keep `Σq` as an integer, so Q4_0's `-8` offset can be taken out exactly.

use super::format::{round_f16, QK};

/// Reusable scratch for one matmul: the quantized activations. Grows to the largest
/// `n × cols` seen and is never shrunk, so a steady decode loop does not allocate.
#[derive(Debug, Default)]
pub struct Workspace {
    pub(crate) acts: QuantizedActs,
}

/// `n` rows of `cols` activations, quantized per block. Row `j`'s quants are
/// `qs[j * cols..][..cols]`, its block scales `d[j * nb..][..nb]`.
#[derive(Debug, Default)]
pub struct QuantizedActs {
    pub qs: Vec<i8>,
    /// Block scale, rounded through f16 as GGML stores it.
    pub d: Vec<f32>,
    /// Q8_1's `f16(d * Σq)`.
    pub s: Vec<f32>,
    /// `Σq` of the block, exact.
    pub isum: Vec<i32>,
    pub n: usize,
    pub cols: usize,
}

impl QuantizedActs {
    pub fn nb(&self) -> usize {
        self.cols / QK
    }

    /// Quantizes `x` (`n × cols`, row-major; `cols % 32 == 0`) into `self`.
    pub fn quantize(&mut self, x: &[f32], n: usize, cols: usize) {
        let nb = cols / QK;
        self.n = n;
        self.cols = cols;
        self.qs.resize(n * cols, 0);
        self.d.resize(n * nb, 0.0);
        self.s.resize(n * nb, 0.0);
        self.isum.resize(n * nb, 0);
        for ((q, x), ((d, s), isum)) in self.qs.chunks_exact_mut(QK).zip(x.chunks_exact(QK)).zip(
            self.d
                .iter_mut()
                .zip(self.s.iter_mut())
                .zip(self.isum.iter_mut()),
        ) {
            let (bd, bs, bsum) = quantize_block(x, q);
            *d = bd;
            *s = bs;
            *isum = bsum;
        }
    }
}

/// `x.round_ties_even()` for `|x| < 2^22`, without a call: the x86-64 baseline has no
/// rounding instruction (SSE4.1), so `round_ties_even` becomes a libm `rintf` call per
/// element (15% of a prefill's time). Adding and subtracting 1.5·2^23 rounds to the
/// nearest integer, ties to even, in the default rounding mode, and vectorises.
#[inline(always)]
fn round_ties_even_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// Quantizes one block; returns `(f16-rounded d, f16-rounded d·Σq, Σq)`.
#[inline]
pub fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, f32, i32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in q.iter_mut().zip(x) {
        // |v * id| <= 127 up to rounding, so the cast never saturates past ±127.
        let r = round_ties_even_small(v * id) as i8;
        *q = r;
        sum += i32::from(r);
    }
    (round_f16(d), round_f16(d * sum as f32), sum)
}

#[cfg(test)]
mod round_tests {
    #[test]
    fn the_magic_rounding_is_round_ties_even_in_range() {
        let mut x = -130.0f32;
        while x <= 130.0 {
            assert_eq!(super::round_ties_even_small(x), x.round_ties_even(), "{x}");
            x += 0.001_953_125; // 2^-9: hits every .5 tie exactly
        }
        for x in [0.5f32, 1.5, 2.5, -0.5, -1.5, 126.5, -127.49999, 0.49999997] {
            assert_eq!(super::round_ties_even_small(x), x.round_ties_even(), "{x}");
        }
    }
}
