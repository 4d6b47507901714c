//! Vectorised exponentials for softmax and SiLU: ggml's `ggml_v_expf` polynomial (the same
//! approximation llama.cpp's softmax uses, about 1 ulp), with inputs clamped to
//! [-87, 88] so the fast path is always right (e^-87 ≈ 1.6e-38 is 0 for a softmax).

/// `x[i] = e^(x[i] - max)`; returns the sum.
pub fn exp_shifted_sum(x: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { x86::exp_shifted_sum(x, max) };
    }
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).max(-87.0).exp();
        sum += *v;
    }
    sum
}

/// `gate[i] = silu(gate[i]) · up[i]`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { x86::silu_mul(gate, up) };
    }
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).clamp(-87.0, 88.0).exp()) * u;
    }
}

/// The largest element (−∞ for none).
pub fn max(x: &[f32]) -> f32 {
    x.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *YES.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// e^x for x in [-87, 88] (ggml_v_expf's fast path).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(88.0),
        );
        let r = _mm256_set1_ps(f32::from_bits(0x4B40_0000)); // 0x1.8p23
        let z = _mm256_fmadd_ps(x, _mm256_set1_ps(f32::from_bits(0x3FB8_AA3B)), r); // log2(e)
        let n = _mm256_sub_ps(z, r);
        let b = _mm256_fnmadd_ps(
            n,
            _mm256_set1_ps(f32::from_bits(0x35BF_BE8E)), // 0x1.7f7d1cp-20
            _mm256_fnmadd_ps(n, _mm256_set1_ps(f32::from_bits(0x3F31_7200)), x), // 0x1.62e4p-1
        );
        let e = _mm256_slli_epi32(_mm256_castps_si256(z), 23);
        let k = _mm256_castsi256_ps(_mm256_add_epi32(
            e,
            _mm256_castps_si256(_mm256_set1_ps(1.0)),
        ));
        let u = _mm256_mul_ps(b, b);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(
                _mm256_fmadd_ps(
                    _mm256_set1_ps(f32::from_bits(0x3C07_2010)), // 0x1.0e4020p-7
                    b,
                    _mm256_set1_ps(f32::from_bits(0x3D2B_9F17)), // 0x1.573e2ep-5
                ),
                u,
                _mm256_fmadd_ps(
                    _mm256_set1_ps(f32::from_bits(0x3E2A_AF33)), // 0x1.555e66p-3
                    b,
                    _mm256_set1_ps(f32::from_bits(0x3EFF_FEDB)), // 0x1.fffdb6p-2
                ),
            ),
            u,
            _mm256_mul_ps(_mm256_set1_ps(f32::from_bits(0x3F7F_FFF6)), b), // 0x1.ffffecp-1
        );
        _mm256_fmadd_ps(j, k, k)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted_sum(x: &mut [f32], max: f32) -> f32 {
        let m = _mm256_set1_ps(max);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            let v = exp(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
            _mm256_storeu_ps(c.as_mut_ptr(), v);
            acc = _mm256_add_ps(acc, v);
        }
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut sum: f32 = lanes.iter().sum();
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut buf = [0.0f32; 8];
            buf[..rest.len()].copy_from_slice(rest);
            let v = exp(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), m));
            _mm256_storeu_ps(buf.as_mut_ptr(), v);
            rest.copy_from_slice(&buf[..rest.len()]);
            sum += rest.iter().sum::<f32>();
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        let n = gate.len().min(up.len());
        let one = _mm256_set1_ps(1.0);
        let zero = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let u = _mm256_loadu_ps(up.as_ptr().add(i));
            let s = _mm256_div_ps(g, _mm256_add_ps(one, exp(_mm256_sub_ps(zero, g))));
            _mm256_storeu_ps(gate.as_mut_ptr().add(i), _mm256_mul_ps(s, u));
            i += 8;
        }
        for k in i..n {
            let g = gate[k];
            gate[k] = g / (1.0 + (-g).clamp(-87.0, 88.0).exp()) * up[k];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponentials_match_libm_closely() {
        let mut x: Vec<f32> = (0..203).map(|i| -90.0 + i as f32 * 0.45).collect();
        let want: Vec<f32> = x.iter().map(|v| (v - 1.5f32).max(-87.0).exp()).collect();
        let sum = exp_shifted_sum(&mut x, 1.5);
        for (g, w) in x.iter().zip(&want) {
            assert!((g - w).abs() <= w * 2e-6 + 1e-37, "{g} vs {w}");
        }
        let total: f32 = want.iter().sum();
        assert!((sum - total).abs() <= total * 1e-5);

        let mut gate: Vec<f32> = (0..37).map(|i| i as f32 * 3.0 - 60.0).collect();
        let up: Vec<f32> = (0..37).map(|i| 1.0 + i as f32 * 0.1).collect();
        let want: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        silu_mul(&mut gate, &up);
        for (g, w) in gate.iter().zip(&want) {
            assert!((g - w).abs() <= w.abs() * 2e-6 + 1e-30, "{g} vs {w}");
        }
    }
}
