use super::*;

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
        })
        .collect()
}

#[test]
fn dot_axpy_scale_match_plain_loops() {
    for n in [0, 1, 7, 8, 15, 16, 17, 64, 100] {
        let (a, b) = (data(n, 1), data(n, 2));
        let want: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        assert!((f64::from(dot(&a, &b)) - want).abs() < 1e-4, "dot n={n}");
        assert!(
            (f64::from(dot_scalar(&a, &b)) - want).abs() < 1e-4,
            "dot_scalar n={n}"
        );

        let mut y = b.clone();
        axpy(&mut y, 0.5, &a);
        for i in 0..n {
            assert!(
                (y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6,
                "axpy n={n} i={i}"
            );
        }
        scale(&mut y, 2.0);
        for i in 0..n {
            assert!(
                (y[i] - 2.0 * (b[i] + 0.5 * a[i])).abs() < 1e-5,
                "scale n={n} i={i}"
            );
        }
    }
}
