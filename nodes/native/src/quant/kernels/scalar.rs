//! The portable kernels, written as the SIMD ones compute: exact integer block dots, then
//! one fused multiply-add per block in the same order, so results match bit for bit.

use super::PanelOut;
use crate::quant::activation::QuantizedActs;
use crate::quant::format::{f16_at, Q4Kind, PANEL, Q8_0_PANEL_BLOCK, QK};

pub fn q4_panel(
    kind: Q4Kind,
    panel: &[u8],
    acts: &QuantizedActs,
    j0: usize,
    r: usize,
    out: &mut PanelOut,
) {
    let (nb, cols) = (acts.nb(), acts.cols);
    let (pb, qoff) = (kind.panel_block(), kind.qs_offset());
    for (jj, out) in out.iter_mut().enumerate().take(r) {
        let j = j0 + jj;
        for (i, o) in out.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for b in 0..nb {
                let blk = &panel[b * pb..][..pb];
                let a = &acts.qs[j * cols + b * QK..][..QK];
                let mut isum = 0i32;
                for k in 0..QK / 8 {
                    for t in 0..4 {
                        let q = blk[qoff + 32 * k + 4 * i + t];
                        isum += i32::from(q & 0x0F) * i32::from(a[4 * k + t]);
                        isum += i32::from(q >> 4) * i32::from(a[16 + 4 * k + t]);
                    }
                }
                let ab = j * nb + b;
                if kind == Q4Kind::Q4_0 {
                    isum -= 8 * acts.isum[ab];
                }
                let scale = f16_at(blk, 2 * i) * acts.d[ab];
                acc = (isum as f32).mul_add(scale, acc);
                if kind == Q4Kind::Q4_1 {
                    acc = f16_at(blk, 2 * PANEL + 2 * i).mul_add(acts.s[ab], acc);
                }
            }
            *o = acc;
        }
    }
}

pub fn q8_0_panel(panel: &[u8], acts: &QuantizedActs, j0: usize, r: usize, out: &mut PanelOut) {
    let (nb, cols, pb) = (acts.nb(), acts.cols, Q8_0_PANEL_BLOCK);
    for (jj, out) in out.iter_mut().enumerate().take(r) {
        let j = j0 + jj;
        for (i, o) in out.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for b in 0..nb {
                let blk = &panel[b * pb..][..pb];
                let a = &acts.qs[j * cols + b * QK..][..QK];
                let mut isum = 0i32;
                for k in 0..QK / 4 {
                    for t in 0..4 {
                        let q = blk[2 * PANEL + 32 * k + 4 * i + t] as i8;
                        isum += i32::from(q) * i32::from(a[4 * k + t]);
                    }
                }
                let scale = f16_at(blk, 2 * i) * acts.d[j * nb + b];
                acc = (isum as f32).mul_add(scale, acc);
            }
            *o = acc;
        }
    }
}
