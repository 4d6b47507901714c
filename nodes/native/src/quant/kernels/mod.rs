//! Panel kernels: one panel of [`PANEL`] weight rows against up to [`MAX_R`] activation
//! rows, returning an `R × 8` tile of dot products. Each ISA implements the same float
//! sequence per (row, activation row): `acc = fma(isum, dw·da, acc)` per block, plus
//! `acc = fma(m, s, acc)` for Q4_1, so every path is bit-identical to [`scalar`] given the
//! same quantized activations.

use super::activation::QuantizedActs;
use super::format::{Q4Kind, PANEL};
use std::sync::OnceLock;

pub mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Activation rows one kernel call handles (register blocking: each unpacked weight
/// vector is used this many times).
pub const MAX_R: usize = 4;

/// How far ahead of the block being computed the x86 kernels prefetch weights.
#[cfg(target_arch = "x86_64")]
pub const PREFETCH_BYTES: usize = 2048;

/// `out[j][i]` = dot of activation row `j0 + j` with panel row `i`.
pub type PanelOut = [[f32; PANEL]; MAX_R];

/// An instruction-set path for the integer kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// Off x86_64 only `Scalar` is ever built.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub enum Isa {
    /// Portable Rust; the reference for the others, and what aarch64 runs.
    Scalar,
    /// AVX2 + FMA + F16C: `vpmaddubsw` (u8 × i8 pairs into i16).
    Avx2,
    /// AVX-512 VNNI with VL on 256-bit vectors: `vpdpbusd` (u8 × i8 quads into i32).
    Avx512Vnni,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
        }
    }

    /// Every path this CPU can run, fastest last.
    pub fn available() -> Vec<Isa> {
        #[cfg(target_arch = "x86_64")]
        {
            let mut v = vec![Isa::Scalar];
            if x86::has_avx2() {
                v.push(Isa::Avx2);
            }
            if x86::has_avx512vnni() {
                v.push(Isa::Avx512Vnni);
            }
            v
        }
        #[cfg(not(target_arch = "x86_64"))]
        vec![Isa::Scalar]
    }

    /// The fastest available path, detected once.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| Isa::available().last().copied().unwrap_or(Isa::Scalar))
    }
}

/// Q4_0 / Q4_1 panel × activation rows `j0..j0 + r` (`1 <= r <= MAX_R`).
/// `panel` is one panel's `nb` blocks. `isa` must come from [`Isa::available`].
pub fn q4_panel(
    isa: Isa,
    kind: Q4Kind,
    panel: &[u8],
    acts: &QuantizedActs,
    j0: usize,
    r: usize,
    out: &mut PanelOut,
) {
    check(panel.len(), acts.nb() * kind.panel_block(), acts, j0, r);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => x86::q4_panel(isa, kind, panel, acts, j0, r, out),
        _ => scalar::q4_panel(kind, panel, acts, j0, r, out),
    }
}

/// Q8_0 panel × activation rows `j0..j0 + r`.
pub fn q8_0_panel(
    isa: Isa,
    panel: &[u8],
    acts: &QuantizedActs,
    j0: usize,
    r: usize,
    out: &mut PanelOut,
) {
    check(
        panel.len(),
        acts.nb() * super::format::Q8_0_PANEL_BLOCK,
        acts,
        j0,
        r,
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => x86::q8_0_panel(isa, panel, acts, j0, r, out),
        _ => scalar::q8_0_panel(panel, acts, j0, r, out),
    }
}

/// The bounds the unsafe kernels rely on; checked once per call (not per block).
fn check(panel_len: usize, need: usize, acts: &QuantizedActs, j0: usize, r: usize) {
    assert!(
        panel_len >= need,
        "panel has {panel_len} bytes, needs {need}"
    );
    assert!((1..=MAX_R).contains(&r), "r = {r} out of 1..={MAX_R}");
    assert!(j0 + r <= acts.n, "activation rows {j0}+{r} > {}", acts.n);
    assert!(acts.qs.len() >= acts.n * acts.cols && acts.d.len() >= acts.n * acts.nb());
}
