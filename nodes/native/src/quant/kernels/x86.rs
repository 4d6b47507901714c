//! x86_64 kernels. Both paths share one body (the `panel_kernels!` macro) and differ only
//! in how a 32-byte vector of u8 weights times i8 activations is accumulated:
//! AVX2 `vpmaddubsw` into i16 lanes (widened to i32 once per block), or AVX-512 VNNI
//! `vpdpbusd` straight into i32 lanes.
//!
//! Register blocking: a block's weight vectors are loaded and unpacked once and used for
//! all `R` activation rows; the lanes of each accumulator are the panel's eight rows.

use super::{Isa, PanelOut};
use crate::quant::activation::QuantizedActs;
use crate::quant::format::Q4Kind;

pub fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

pub fn has_avx512vnni() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Generates `q4_panel` and `q8_0_panel` for one feature set.
macro_rules! panel_kernels {
    ($features:literal, $q4_acc:ident, $q4_finish:ident, $q8_acc:ident) => {
        use crate::quant::activation::QuantizedActs;
        use crate::quant::format::{Q4Kind, PANEL, Q8_0_PANEL_BLOCK, QK};
        use crate::quant::kernels::PanelOut;

        /// Asks for the block `PREFETCH_BYTES` ahead of `blk` (a later block of this panel
        /// or the next panel, which follows in memory). A single core's DRAM bandwidth is
        /// bound by outstanding misses; this keeps more in flight than the hardware
        /// prefetcher alone. Prefetching past the end of the matrix is harmless.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn prefetch_ahead(blk: *const u8, pb: usize) {
            let ahead = blk.wrapping_add(crate::quant::kernels::PREFETCH_BYTES);
            let mut off = 0;
            while off < pb {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off) as *const i8);
                off += 64;
            }
        }

        /// # Safety
        /// The CPU must support the module's features, and the caller checked the bounds
        /// (`kernels::check`): `panel` holds `nb` blocks, rows `j0..j0 + R` exist.
        #[target_feature(enable = $features)]
        pub unsafe fn q4<const R: usize, const Q41: bool>(
            panel: &[u8],
            acts: &QuantizedActs,
            j0: usize,
            out: &mut PanelOut,
        ) {
            let kind = if Q41 { Q4Kind::Q4_1 } else { Q4Kind::Q4_0 };
            let (nb, cols) = (acts.nb(), acts.cols);
            let (pb, qoff) = (kind.panel_block(), kind.qs_offset());
            let m0f = _mm256_set1_epi8(0x0F);
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                let blk = panel.as_ptr().add(b * pb);
                prefetch_ahead(blk, pb);
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
                let mut isum = [_mm256_setzero_si256(); R];
                for k in 0..QK / 8 {
                    let raw = _mm256_loadu_si256(blk.add(qoff + 32 * k) as *const __m256i);
                    let lo = _mm256_and_si256(raw, m0f);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m0f);
                    for (jj, s) in isum.iter_mut().enumerate() {
                        let a = acts.qs.as_ptr().add((j0 + jj) * cols + b * QK);
                        let alo = _mm256_set1_epi32((a.add(4 * k) as *const i32).read_unaligned());
                        let ahi =
                            _mm256_set1_epi32((a.add(16 + 4 * k) as *const i32).read_unaligned());
                        *s = $q4_acc(*s, lo, alo);
                        *s = $q4_acc(*s, hi, ahi);
                    }
                }
                for (jj, (acc, s)) in acc.iter_mut().zip(isum).enumerate() {
                    let ab = (j0 + jj) * nb + b;
                    let mut si = $q4_finish(s);
                    if !Q41 {
                        si = _mm256_sub_epi32(
                            si,
                            _mm256_set1_epi32(8 * *acts.isum.get_unchecked(ab)),
                        );
                    }
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*acts.d.get_unchecked(ab)));
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), scale, *acc);
                    if Q41 {
                        let mw =
                            _mm256_cvtph_ps(_mm_loadu_si128(blk.add(2 * PANEL) as *const __m128i));
                        *acc = _mm256_fmadd_ps(mw, _mm256_set1_ps(*acts.s.get_unchecked(ab)), *acc);
                    }
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                _mm256_storeu_ps(o.as_mut_ptr(), a);
            }
        }

        /// # Safety
        /// As for [`q4`].
        #[target_feature(enable = $features)]
        pub unsafe fn q8_0<const R: usize>(
            panel: &[u8],
            acts: &QuantizedActs,
            j0: usize,
            out: &mut PanelOut,
        ) {
            let (nb, cols, pb) = (acts.nb(), acts.cols, Q8_0_PANEL_BLOCK);
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                let blk = panel.as_ptr().add(b * pb);
                prefetch_ahead(blk, pb);
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
                // Rows outside, chunks inside: re-reading the 256 weight bytes from L1 per
                // row is cheaper than the spills of keeping 16 weight vectors live.
                let mut isum = [_mm256_setzero_si256(); R];
                for (jj, s) in isum.iter_mut().enumerate() {
                    let a = acts.qs.as_ptr().add((j0 + jj) * cols + b * QK);
                    for k in 0..QK / 4 {
                        let w = _mm256_loadu_si256(blk.add(2 * PANEL + 32 * k) as *const __m256i);
                        let av = _mm256_set1_epi32((a.add(4 * k) as *const i32).read_unaligned());
                        *s = $q8_acc(*s, _mm256_abs_epi8(w), _mm256_sign_epi8(av, w));
                    }
                }
                for (jj, (acc, s)) in acc.iter_mut().zip(isum).enumerate() {
                    let ab = (j0 + jj) * nb + b;
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*acts.d.get_unchecked(ab)));
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, *acc);
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                _mm256_storeu_ps(o.as_mut_ptr(), a);
            }
        }
    };
}

mod avx2 {
    use core::arch::x86_64::*;

    /// i16 accumulation is exact for Q4: a lane gathers 8 `vpmaddubsw` pairs per block,
    /// each at most 2·15·127, so |sum| <= 30480 < 32767.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn q4_acc(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
        _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, a))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn q4_finish(acc: __m256i) -> __m256i {
        _mm256_madd_epi16(acc, _mm256_set1_epi16(1))
    }

    /// Q8_0 pairs reach 2·128·127, so each is widened to i32 at once.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn q8_acc(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
        let p = _mm256_maddubs_epi16(w, a);
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }

    panel_kernels!("avx2,fma,f16c", q4_acc, q4_finish, q8_acc);
}

// The AVX-512 intrinsics and target features are stable since Rust 1.89; the workspace
// still declares rust-version 1.85, which this module (and so the crate) does not build
// with. Raising the workspace MSRV to 1.89 would let this `allow` go.
#[allow(clippy::incompatible_msrv)]
mod avx512vnni {
    use core::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512vnni,avx512vl")]
    fn dpbusd(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, w, a)
    }

    #[inline]
    fn identity(acc: __m256i) -> __m256i {
        acc
    }

    panel_kernels!(
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        dpbusd,
        identity,
        dpbusd
    );
}

/// Picks the monomorphized kernel for `(isa, kind, r)`. `isa` came from `Isa::available`,
/// so its features are present; bounds were checked by the caller.
pub fn q4_panel(
    isa: Isa,
    kind: Q4Kind,
    panel: &[u8],
    acts: &QuantizedActs,
    j0: usize,
    r: usize,
    out: &mut PanelOut,
) {
    macro_rules! go {
        ($m:ident) => {
            // SAFETY: features detected (see above); bounds checked by `kernels::check`.
            unsafe {
                match (kind, r) {
                    (Q4Kind::Q4_1, 1) => $m::q4::<1, true>(panel, acts, j0, out),
                    (Q4Kind::Q4_1, 2) => $m::q4::<2, true>(panel, acts, j0, out),
                    (Q4Kind::Q4_1, 3) => $m::q4::<3, true>(panel, acts, j0, out),
                    (Q4Kind::Q4_1, _) => $m::q4::<4, true>(panel, acts, j0, out),
                    (Q4Kind::Q4_0, 1) => $m::q4::<1, false>(panel, acts, j0, out),
                    (Q4Kind::Q4_0, 2) => $m::q4::<2, false>(panel, acts, j0, out),
                    (Q4Kind::Q4_0, 3) => $m::q4::<3, false>(panel, acts, j0, out),
                    (Q4Kind::Q4_0, _) => $m::q4::<4, false>(panel, acts, j0, out),
                }
            }
        };
    }
    match isa {
        Isa::Avx512Vnni => go!(avx512vnni),
        _ => go!(avx2),
    }
}

pub fn q8_0_panel(
    isa: Isa,
    panel: &[u8],
    acts: &QuantizedActs,
    j0: usize,
    r: usize,
    out: &mut PanelOut,
) {
    macro_rules! go {
        ($m:ident) => {
            // SAFETY: as in `q4_panel`.
            unsafe {
                match r {
                    1 => $m::q8_0::<1>(panel, acts, j0, out),
                    2 => $m::q8_0::<2>(panel, acts, j0, out),
                    3 => $m::q8_0::<3>(panel, acts, j0, out),
                    _ => $m::q8_0::<4>(panel, acts, j0, out),
                }
            }
        };
    }
    match isa {
        Isa::Avx512Vnni => go!(avx512vnni),
        _ => go!(avx2),
    }
}
