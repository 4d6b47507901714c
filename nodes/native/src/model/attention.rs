//! Attention over the f16 KV pool: the scores of one query head against a block's keys,
//! and the probability-weighted sum of a block's values. One call covers a whole block of
//! positions (not one 64-wide dot per call), keys and values are widened from f16 in
//! registers (F16C), and the sums stay in registers across the block's rows.

/// `out[r] = scale · q · key_r` for `r < n`, where `key_r` is `rows[r·stride + off ..][..q.len()]`.
pub fn scores(
    q: &[f32],
    rows: &[u16],
    stride: usize,
    off: usize,
    n: usize,
    scale: f32,
    out: &mut [f32],
) {
    let hd = q.len();
    assert!(
        n == 0 || (n - 1) * stride + off + hd <= rows.len(),
        "rows too short"
    );
    assert!(out.len() >= n);
    #[cfg(target_arch = "x86_64")]
    if hd % 8 == 0 && has_f16c() {
        // SAFETY: AVX2, FMA and F16C were detected; the bounds were checked above.
        return unsafe { x86::scores(q, rows, stride, off, n, scale, out) };
    }
    for (r, o) in out.iter_mut().enumerate().take(n) {
        let key = &rows[r * stride + off..r * stride + off + hd];
        let dot: f32 = q
            .iter()
            .zip(key)
            .map(|(a, &b)| a * half::f16::from_bits(b).to_f32())
            .sum();
        *o = dot * scale;
    }
}

/// The scores of the `heads` query heads of one KV group against the same rows:
/// `out[h·out_stride + r] = scale · q_h · key_r`, with `q = [q_0 | q_1 | …]` (`heads·hd`).
/// Each key row is widened once for all the group's heads.
#[allow(clippy::too_many_arguments)]
pub fn scores_group(
    q: &[f32],
    heads: usize,
    rows: &[u16],
    stride: usize,
    off: usize,
    n: usize,
    scale: f32,
    out: &mut [f32],
    out_stride: usize,
) {
    let hd = q.len() / heads.max(1);
    assert!(heads >= 1 && q.len() == heads * hd);
    assert!(
        n == 0 || (n - 1) * stride + off + hd <= rows.len(),
        "rows too short"
    );
    assert!(
        n == 0 || (heads - 1) * out_stride + n <= out.len(),
        "out too short"
    );
    #[cfg(target_arch = "x86_64")]
    if hd % 8 == 0 && has_f16c() && heads <= 3 {
        // SAFETY: AVX2, FMA and F16C were detected; the bounds were checked above.
        unsafe {
            match heads {
                1 => x86::scores_g::<1>(q, hd, rows, stride, off, n, scale, out, out_stride),
                2 => x86::scores_g::<2>(q, hd, rows, stride, off, n, scale, out, out_stride),
                _ => x86::scores_g::<3>(q, hd, rows, stride, off, n, scale, out, out_stride),
            }
        }
        return;
    }
    for h in 0..heads {
        scores(
            &q[h * hd..(h + 1) * hd],
            rows,
            stride,
            off,
            n,
            scale,
            &mut out[h * out_stride..],
        );
    }
}

/// `out += Σ_r w[r] · value_r` for `r < n`, `value_r` as in [`scores`].
pub fn accumulate(out: &mut [f32], w: &[f32], rows: &[u16], stride: usize, off: usize, n: usize) {
    let hd = out.len();
    assert!(
        n == 0 || (n - 1) * stride + off + hd <= rows.len(),
        "rows too short"
    );
    assert!(w.len() >= n);
    #[cfg(target_arch = "x86_64")]
    if hd % 64 == 0 && has_f16c() {
        // SAFETY: as in `scores`.
        return unsafe { x86::accumulate(out, w, rows, stride, off, n) };
    }
    for (r, &wr) in w.iter().enumerate().take(n) {
        let value = &rows[r * stride + off..r * stride + off + hd];
        for (o, &v) in out.iter_mut().zip(value) {
            *o += wr * half::f16::from_bits(v).to_f32();
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *YES.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// AVX2, FMA and F16C; `q.len() % 8 == 0`; rows and out long enough (checked by caller).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores(
        q: &[f32],
        rows: &[u16],
        stride: usize,
        off: usize,
        n: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let hd = q.len();
        let base = rows.as_ptr().add(off);
        let qp = q.as_ptr();
        for r in 0..n {
            let row = base.add(r * stride);
            let (mut a, mut b) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut d = 0;
            while d + 16 <= hd {
                a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(d)), load8(row.add(d)), a);
                b = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(d + 8)), load8(row.add(d + 8)), b);
                d += 16;
            }
            if d < hd {
                a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(d)), load8(row.add(d)), a);
            }
            *out.get_unchecked_mut(r) = hsum(_mm256_add_ps(a, b)) * scale;
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C; `hd % 8 == 0`; `q.len() == G·hd`; rows and out long enough.
    // Index loops over fixed-size register tiles: the compiler keeps `acc` in registers.
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores_g<const G: usize>(
        q: &[f32],
        hd: usize,
        rows: &[u16],
        stride: usize,
        off: usize,
        n: usize,
        scale: f32,
        out: &mut [f32],
        out_stride: usize,
    ) {
        let base = rows.as_ptr().add(off);
        let qp = q.as_ptr();
        let op = out.as_mut_ptr();
        let sc = _mm_set1_ps(scale);
        let mut r0 = 0;
        while r0 + 4 <= n {
            let mut acc = [[_mm256_setzero_ps(); 4]; G];
            let mut d = 0;
            while d < hd {
                let mut qv = [_mm256_setzero_ps(); G];
                for (h, v) in qv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(qp.add(h * hd + d));
                }
                for r in 0..4 {
                    let k = load8(base.add((r0 + r) * stride + d));
                    for h in 0..G {
                        acc[h][r] = _mm256_fmadd_ps(qv[h], k, acc[h][r]);
                    }
                }
                d += 8;
            }
            for (h, a) in acc.iter().enumerate() {
                let t0 = _mm256_hadd_ps(a[0], a[1]);
                let t1 = _mm256_hadd_ps(a[2], a[3]);
                let t = _mm256_hadd_ps(t0, t1);
                let s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
                _mm_storeu_ps(op.add(h * out_stride + r0), _mm_mul_ps(s, sc));
            }
            r0 += 4;
        }
        for r in r0..n {
            let row = base.add(r * stride);
            for h in 0..G {
                let mut a = _mm256_setzero_ps();
                let mut d = 0;
                while d < hd {
                    a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(h * hd + d)), load8(row.add(d)), a);
                    d += 8;
                }
                *op.add(h * out_stride + r) = hsum(a) * scale;
            }
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C; `out.len() % 64 == 0`; rows and w long enough (checked by caller).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn accumulate(
        out: &mut [f32],
        w: &[f32],
        rows: &[u16],
        stride: usize,
        off: usize,
        n: usize,
    ) {
        let hd = out.len();
        for d0 in (0..hd).step_by(64) {
            let op = out.as_mut_ptr().add(d0);
            let mut acc = [_mm256_setzero_ps(); 8];
            for (c, a) in acc.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(op.add(c * 8));
            }
            let base = rows.as_ptr().add(off + d0);
            for r in 0..n {
                let wr = _mm256_set1_ps(*w.get_unchecked(r));
                let row = base.add(r * stride);
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(wr, load8(row.add(c * 8)), *a);
                }
            }
            for (c, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(op.add(c * 8), *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16s(v: &[f32]) -> Vec<u16> {
        v.iter()
            .map(|&x| half::f16::from_f32(x).to_bits())
            .collect()
    }

    #[test]
    fn kernels_match_plain_loops() {
        for hd in [8usize, 64, 128] {
            let stride = hd * 3 + 5;
            let n = 13;
            let rows: Vec<f32> = (0..n * stride + hd)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
                .collect();
            let bits = f16s(&rows);
            let q: Vec<f32> = (0..hd).map(|i| (i as f32 * 0.7).sin()).collect();
            let off = hd + 3;
            let widened =
                |r: usize, d: usize| half::f16::from_bits(bits[r * stride + off + d]).to_f32();
            let mut got = vec![0.0; n];
            scores(&q, &bits, stride, off, n, 0.125, &mut got);
            for (r, g) in got.iter().enumerate() {
                let want: f32 = (0..hd).map(|d| q[d] * widened(r, d)).sum::<f32>() * 0.125;
                assert!((g - want).abs() < 1e-3, "hd {hd} row {r}: {g} vs {want}");
            }
            for heads in 1..=4 {
                let qg: Vec<f32> = (0..heads * hd).map(|i| (i as f32 * 0.37).cos()).collect();
                let mut grouped = vec![0.0; heads * 20];
                scores_group(&qg, heads, &bits, stride, off, n, 0.5, &mut grouped, 20);
                for h in 0..heads {
                    let mut one = vec![0.0; n];
                    scores(
                        &qg[h * hd..(h + 1) * hd],
                        &bits,
                        stride,
                        off,
                        n,
                        0.5,
                        &mut one,
                    );
                    for r in 0..n {
                        let (g, o) = (grouped[h * 20 + r], one[r]);
                        assert!(
                            (g - o).abs() < 1e-4,
                            "hd {hd} heads {heads} h {h} r {r}: {g} vs {o}"
                        );
                    }
                }
            }
            let w: Vec<f32> = (0..n).map(|r| 1.0 / (r + 1) as f32).collect();
            let mut out = vec![0.5; hd];
            accumulate(&mut out, &w, &bits, stride, off, n);
            for (d, o) in out.iter().enumerate() {
                let want = 0.5 + (0..n).map(|r| w[r] * widened(r, d)).sum::<f32>();
                assert!((o - want).abs() < 1e-3, "hd {hd} dim {d}: {o} vs {want}");
            }
        }
    }
}
