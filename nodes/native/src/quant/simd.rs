//! Runtime-dispatched f32 helpers for attention (scores, weighted sums of values).
//! AVX2+FMA where the CPU has it, plain loops otherwise. Lengths are the shorter of the
//! two slices.

/// `Σ a[i]·b[i]`.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    #[cfg(target_arch = "x86_64")]
    if super::kernels::Isa::detect() != super::kernels::Isa::Scalar {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { x86::dot(a, b) };
    }
    dot_scalar(a, b)
}

/// `y[i] += a·x[i]`.
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    let (y, x) = (&mut y[..n], &x[..n]);
    #[cfg(target_arch = "x86_64")]
    if super::kernels::Isa::detect() != super::kernels::Isa::Scalar {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { x86::axpy(y, a, x) };
    }
    for (y, x) in y.iter_mut().zip(x) {
        *y = x.mul_add(a, *y);
    }
}

/// `y[i] *= a`.
pub fn scale(y: &mut [f32], a: f32) {
    #[cfg(target_arch = "x86_64")]
    if super::kernels::Isa::detect() != super::kernels::Isa::Scalar {
        // SAFETY: AVX2 was detected.
        return unsafe { x86::scale(y, a) };
    }
    for y in y.iter_mut() {
        *y *= a;
    }
}

pub(crate) fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums, like the SIMD path, so long dots keep their precision.
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    /// # Safety
    /// AVX2 and FMA must be present; `a.len() == b.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                s1,
            );
            i += 16;
        }
        if i + 8 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            i += 8;
        }
        let s = _mm256_add_ps(s0, s1);
        let h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_shuffle_ps::<1>(h, h));
        let mut r = _mm_cvtss_f32(h);
        while i < n {
            r = a[i].mul_add(b[i], r);
            i += 1;
        }
        r
    }

    /// # Safety
    /// AVX2 and FMA must be present; `y.len() == x.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        let n = y.len();
        let (py, px) = (y.as_mut_ptr(), x.as_ptr());
        let av = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(i)), av, _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), v);
            i += 8;
        }
        while i < n {
            y[i] = x[i].mul_add(a, y[i]);
            i += 1;
        }
    }

    /// # Safety
    /// AVX2 must be present.
    #[target_feature(enable = "avx2")]
    pub unsafe fn scale(y: &mut [f32], a: f32) {
        let n = y.len();
        let py = y.as_mut_ptr();
        let av = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(py.add(i), _mm256_mul_ps(_mm256_loadu_ps(py.add(i)), av));
            i += 8;
        }
        while i < n {
            y[i] *= a;
            i += 1;
        }
    }
}

#[cfg(test)]
#[path = "simd_tests.rs"]
mod tests;
