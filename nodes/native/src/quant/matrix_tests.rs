use super::*;
use crate::quant::activation::{quantize_block, QuantizedActs};

/// xorshift64*: deterministic test data without a dependency.
struct Rng(u64);

impl Rng {
    fn u32(&mut self) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32
    }
    fn unit(&mut self) -> f32 {
        self.u32() as f32 / u32::MAX as f32
    }
    /// Roughly normal (sum of four uniforms), like hidden states.
    fn normal(&mut self) -> f32 {
        (0..4).map(|_| self.unit() - 0.5).sum::<f32>() * 1.7
    }
}

const BLOCK_TYPES: [GgmlType; 3] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0];
const ALL_TYPES: [GgmlType; 5] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::F16,
    GgmlType::F32,
];

fn f16b(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

/// Random GGML bytes of `rows × cols` for `ty`, in the file's own layout.
fn random_ggml(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let mut v = Vec::new();
    let blocks = rows * cols / QK;
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
            for _ in 0..blocks {
                let d = 0.002 + 0.05 * rng.unit();
                v.extend(f16b(d));
                if ty == GgmlType::Q4_1 {
                    v.extend(f16b(-8.0 * d + 0.02 * rng.normal()));
                }
                let nq = if ty == GgmlType::Q8_0 { QK } else { QK / 2 };
                for _ in 0..nq {
                    v.push(rng.u32() as u8);
                }
            }
        }
        GgmlType::F16 => (0..rows * cols).for_each(|_| v.extend(f16b(rng.normal() * 0.1))),
        _ => (0..rows * cols).for_each(|_| v.extend((rng.normal() * 0.1).to_le_bytes())),
    }
    v
}

/// Dequantizes GGML bytes straight from the format definitions (not via the panels).
fn reference_dequant(ty: GgmlType, rows: usize, cols: usize, bytes: &[u8]) -> Vec<f32> {
    let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    let mut out = vec![0.0f32; rows * cols];
    match ty {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = h(c);
            }
        }
        _ => {
            let bs = match ty {
                GgmlType::Q4_0 => 18,
                GgmlType::Q4_1 => 20,
                _ => 34,
            };
            for (o, blk) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(bs)) {
                let d = h(&blk[0..2]);
                for j in 0..16 {
                    match ty {
                        GgmlType::Q4_0 => {
                            o[j] = (f32::from(blk[2 + j] & 15) - 8.0) * d;
                            o[j + 16] = (f32::from(blk[2 + j] >> 4) - 8.0) * d;
                        }
                        GgmlType::Q4_1 => {
                            let m = h(&blk[2..4]);
                            o[j] = f32::from(blk[4 + j] & 15) * d + m;
                            o[j + 16] = f32::from(blk[4 + j] >> 4) * d + m;
                        }
                        _ => {
                            o[j] = f32::from(blk[2 + j] as i8) * d;
                            o[j + 16] = f32::from(blk[18 + j] as i8) * d;
                        }
                    }
                }
            }
        }
    }
    out
}

fn random_x(n: usize, cols: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n * cols).map(|_| rng.normal()).collect()
}

fn run(m: &QMatrix, isa: Isa, x: &[f32], n: usize, threads: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n * m.rows()];
    let pool = ComputePool::new(threads);
    m.matmul_with(isa, x, n, &mut out, &mut Workspace::default(), &pool);
    out
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (f64::from(*g) - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den).sqrt()
}

#[test]
fn dequantize_row_matches_the_ggml_formulas() {
    let mut rng = Rng(7);
    for ty in ALL_TYPES {
        for rows in [1, 13, 16] {
            let cols = 96;
            let bytes = random_ggml(ty, rows, cols, &mut rng);
            let want = reference_dequant(ty, rows, cols, &bytes);
            let m = QMatrix::from_ggml(ty, rows, cols, &bytes).expect("valid matrix");
            let mut row = vec![0.0f32; cols];
            for r in 0..rows {
                m.dequantize_row(r, &mut row);
                assert_eq!(row, want[r * cols..][..cols], "{ty:?} row {r}");
            }
        }
    }
}

/// Every type and path against f32 math on the dequantized weights. The error bound is
/// the activation quantization: per 32-block the rounding error is at most d/2 = amax/254,
/// about 0.5 % of the activations' RMS for normal data, and the dot products inherit
/// that relative size; 1.5 % leaves 3× headroom and still fails on any wrong block,
/// scale or offset (those give errors of order 100 %). F32/F16 weights are exact math.
#[test]
fn matmul_matches_f32_reference_on_every_path() {
    let mut rng = Rng(11);
    for ty in ALL_TYPES {
        for (rows, cols) in [(13, 64), (37, 96), (64, 576)] {
            let bytes = random_ggml(ty, rows, cols, &mut rng);
            let w = reference_dequant(ty, rows, cols, &bytes);
            let m = QMatrix::from_ggml(ty, rows, cols, &bytes).expect("valid matrix");
            for n in [1, 3, 8, 37] {
                let x = random_x(n, cols, &mut rng);
                let want: Vec<f64> = (0..n * rows)
                    .map(|i| {
                        let (j, r) = (i / rows, i % rows);
                        (0..cols)
                            .map(|c| f64::from(x[j * cols + c]) * f64::from(w[r * cols + c]))
                            .sum()
                    })
                    .collect();
                let bound = if BLOCK_TYPES.contains(&ty) {
                    1.5e-2
                } else {
                    1e-5
                };
                for isa in Isa::available() {
                    let got = run(&m, isa, &x, n, 1);
                    let err = rel_l2(&got, &want);
                    assert!(
                        err < bound,
                        "{ty:?} {rows}x{cols} n={n} {}: rel L2 {err}",
                        isa.name()
                    );
                }
            }
        }
    }
}

/// llama.cpp's block dot, written from its definition on the GGML bytes and our quantized
/// activations: Q4_1·Q8_1 = Σ dw·da·Σ(q·a) + m·s, Q4_0·Q8_0 = Σ dw·da·Σ((q-8)·a),
/// Q8_0·Q8_0 = Σ dw·da·Σ(q·a). Only float summation order may differ from ours.
#[test]
fn matmul_is_llama_cpp_block_formula() {
    let mut rng = Rng(5);
    let (rows, cols, n) = (24, 192, 5);
    for ty in BLOCK_TYPES {
        let bytes = random_ggml(ty, rows, cols, &mut rng);
        let m = QMatrix::from_ggml(ty, rows, cols, &bytes).expect("valid matrix");
        let x = random_x(n, cols, &mut rng);
        let mut acts = QuantizedActs::default();
        acts.quantize(&x, n, cols);
        let (nb, h) = (cols / QK, |b: &[u8]| {
            f64::from(f16::from_le_bytes([b[0], b[1]]).to_f32())
        });
        let bs = bytes.len() / (rows * nb);
        let mut want = vec![0.0f64; n * rows];
        for j in 0..n {
            for r in 0..rows {
                let mut s = 0.0f64;
                for b in 0..nb {
                    let blk = &bytes[(r * nb + b) * bs..][..bs];
                    let a = &acts.qs[j * cols + b * QK..][..QK];
                    let (da, sa) = (f64::from(acts.d[j * nb + b]), f64::from(acts.s[j * nb + b]));
                    let mut isum = 0i64;
                    for t in 0..16 {
                        let (q0, q1) = match ty {
                            GgmlType::Q4_0 => (
                                i64::from(blk[2 + t] & 15) - 8,
                                i64::from(blk[2 + t] >> 4) - 8,
                            ),
                            GgmlType::Q4_1 => {
                                (i64::from(blk[4 + t] & 15), i64::from(blk[4 + t] >> 4))
                            }
                            _ => (i64::from(blk[2 + t] as i8), i64::from(blk[18 + t] as i8)),
                        };
                        isum += q0 * i64::from(a[t]) + q1 * i64::from(a[t + 16]);
                    }
                    s += h(&blk[0..2]) * da * isum as f64;
                    if ty == GgmlType::Q4_1 {
                        s += h(&blk[2..4]) * sa;
                    }
                }
                want[j * rows + r] = s;
            }
        }
        for isa in Isa::available() {
            let got = run(&m, isa, &x, n, 1);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(*g) - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{ty:?} {} [{i}]: {g} vs {w}",
                    isa.name()
                );
            }
        }
    }
}

/// The SIMD paths compute the same exact integer block dots and the same fma sequence as
/// the scalar kernel, so with the same quantized activations they agree bit for bit.
#[test]
fn simd_paths_are_bit_identical_to_scalar() {
    let mut rng = Rng(3);
    for ty in BLOCK_TYPES {
        for rows in [7, 13, 40] {
            let cols = 160;
            let m = QMatrix::from_ggml(ty, rows, cols, &random_ggml(ty, rows, cols, &mut rng))
                .expect("valid matrix");
            for n in [1, 2, 3, 4, 5, 8, 37] {
                let x = random_x(n, cols, &mut rng);
                let want = run(&m, Isa::Scalar, &x, n, 1);
                for isa in Isa::available() {
                    let got = run(&m, isa, &x, n, 1);
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{ty:?} rows={rows} n={n} {} differs from scalar",
                        isa.name()
                    );
                }
            }
        }
    }
}

#[test]
fn extreme_values_stay_exact() {
    // Weights at the ends of their ranges (nibbles 0/15, Q8 ±127 and -128) against
    // activations at ±127: the i16 accumulation of the AVX2 path must not saturate.
    for ty in BLOCK_TYPES {
        let (rows, cols, n) = (8, 64, 2);
        let mut bytes = Vec::new();
        for blk in 0..rows * cols / QK {
            bytes.extend(f16b(1.0));
            if ty == GgmlType::Q4_1 {
                bytes.extend(f16b(0.0));
            }
            let (nq, fill) = match ty {
                GgmlType::Q8_0 => (QK, if blk % 2 == 0 { 0x80u8 } else { 0x7F }),
                _ => (QK / 2, if blk % 2 == 0 { 0xFFu8 } else { 0x00 }),
            };
            bytes.extend(std::iter::repeat_n(fill, nq));
        }
        let m = QMatrix::from_ggml(ty, rows, cols, &bytes).expect("valid matrix");
        let x: Vec<f32> = (0..n * cols)
            .map(|i| if i < cols { 1.0 } else { -1.0 })
            .collect();
        let want = run(&m, Isa::Scalar, &x, n, 1);
        let per_block = match ty {
            GgmlType::Q4_0 => [7.0 * 32.0, -8.0 * 32.0],
            GgmlType::Q4_1 => [15.0 * 32.0, 0.0],
            _ => [-128.0 * 32.0, 127.0 * 32.0],
        };
        let row_sum = per_block[0] + per_block[1];
        for r in 0..rows {
            assert!(
                (want[r] - row_sum).abs() < 1e-3 * row_sum.abs().max(1.0),
                "{ty:?}"
            );
            assert!(
                (want[rows + r] + row_sum).abs() < 1e-3 * row_sum.abs().max(1.0),
                "{ty:?}"
            );
        }
        for isa in Isa::available() {
            assert_eq!(run(&m, isa, &x, n, 1), want, "{ty:?} {}", isa.name());
        }
    }
}

#[test]
fn thread_counts_give_identical_results() {
    let mut rng = Rng(9);
    // 5 rows: one panel, so some parts get no rows at all.
    for (ty, rows) in ALL_TYPES.iter().flat_map(|t| [(*t, 53), (*t, 5)]) {
        let cols = 128;
        let m = QMatrix::from_ggml(ty, rows, cols, &random_ggml(ty, rows, cols, &mut rng))
            .expect("valid matrix");
        for n in [1, 6, 37] {
            let x = random_x(n, cols, &mut rng);
            let one = run(&m, Isa::detect(), &x, n, 1);
            assert!(
                one.iter().all(|v| v.is_finite()),
                "{ty:?}: every output written"
            );
            for threads in [2, 3] {
                assert_eq!(run(&m, Isa::detect(), &x, n, threads), one, "{ty:?} n={n}");
            }
        }
    }
}

#[test]
fn activation_blocks_quantize_like_llama_cpp() {
    let mut x: Vec<f32> = (0..QK).map(|i| i as f32 - 10.0).collect();
    x[3] = 2.5 * 21.0 / 127.0 * 1.0; // lands near a .5 tie after scaling
    let mut q = [0i8; QK];
    let (d, s, sum) = quantize_block(&x, &mut q);
    let amax = 21.0f32;
    assert_eq!(d, f16::from_f32(amax / 127.0).to_f32());
    for (qi, xi) in q.iter().zip(&x) {
        assert_eq!(
            i32::from(*qi),
            (xi * (127.0 / amax)).round_ties_even() as i32
        );
    }
    assert_eq!(q[31], 127);
    assert_eq!(sum, q.iter().map(|v| i32::from(*v)).sum::<i32>());
    assert_eq!(s, f16::from_f32(amax / 127.0 * sum as f32).to_f32());
    let (d0, s0, sum0) = quantize_block(&[0.0; QK], &mut q);
    assert_eq!((d0, s0, sum0), (0.0, 0.0, 0));
    assert!(q.iter().all(|v| *v == 0));
}

#[test]
fn from_ggml_rejects_bad_input() {
    let e = QMatrix::from_ggml(GgmlType::Q4K, 4, 256, &[0; 4 * 144]).unwrap_err();
    assert!(e.to_string().contains("Q4K"), "{e}");
    let e = QMatrix::from_ggml(GgmlType::Q4_1, 4, 48, &[0; 4 * 30]).unwrap_err();
    assert_eq!(
        e,
        QuantError::ColsNotBlockMultiple {
            ty: "Q4_1",
            cols: 48
        }
    );
    let e = QMatrix::from_ggml(GgmlType::Q8_0, 2, 64, &[0; 2 * 2 * 34 - 1]).unwrap_err();
    assert!(
        matches!(
            e,
            QuantError::WrongByteLength {
                expected: 136,
                got: 135,
                ..
            }
        ),
        "{e}"
    );
    let e = QMatrix::from_ggml(GgmlType::F32, 0, 4, &[]).unwrap_err();
    assert_eq!(e, QuantError::EmptyShape { rows: 0, cols: 4 });
    // F32 needs no block multiple.
    let m = QMatrix::from_ggml(GgmlType::F32, 2, 3, &[0; 24]).expect("valid");
    assert_eq!(
        (m.rows(), m.cols(), m.type_name(), m.memory_bytes()),
        (2, 3, "F32", 24)
    );
}

#[test]
fn memory_is_the_ggml_bytes_plus_panel_padding() {
    let mut rng = Rng(1);
    for (ty, per_block) in [
        (GgmlType::Q4_0, 18),
        (GgmlType::Q4_1, 20),
        (GgmlType::Q8_0, 34),
    ] {
        let m = QMatrix::from_ggml(ty, 16, 64, &random_ggml(ty, 16, 64, &mut rng)).expect("ok");
        assert_eq!(m.memory_bytes(), 16 * 2 * per_block);
        let m = QMatrix::from_ggml(ty, 9, 64, &random_ggml(ty, 9, 64, &mut rng)).expect("ok");
        assert_eq!(m.memory_bytes(), 16 * 2 * per_block, "9 rows pad to 16");
    }
}
