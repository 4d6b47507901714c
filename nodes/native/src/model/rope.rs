//! Rotary position embedding, with llama.cpp's angle recurrence (so the angles, and the
//! greedy outputs that depend on them, match it).

use super::config::RopeStyle;

pub struct Rope {
    style: RopeStyle,
    dims: usize,
    theta_scale: f32,
    /// `(cos, sin)` per position and pair, grown on demand.
    table: Vec<(f32, f32)>,
    positions: usize,
}

impl Rope {
    pub fn new(style: RopeStyle, dims: usize, base: f32) -> Rope {
        Rope {
            style,
            dims,
            theta_scale: base.powf(-2.0 / dims as f32),
            table: Vec::new(),
            positions: 0,
        }
    }

    /// Makes positions `0..=pos` available.
    pub fn ensure(&mut self, pos: usize) {
        let pairs = self.dims / 2;
        while self.positions <= pos {
            let mut theta = self.positions as f32;
            for _ in 0..pairs {
                self.table.push((theta.cos(), theta.sin()));
                theta *= self.theta_scale;
            }
            self.positions += 1;
        }
    }

    /// Rotates every head of `x` (heads × head_dim) for position `pos` (`ensure`d).
    pub fn apply(&self, x: &mut [f32], head_dim: usize, pos: usize) {
        let pairs = self.dims / 2;
        let angles = &self.table[pos * pairs..(pos + 1) * pairs];
        for head in x.chunks_exact_mut(head_dim) {
            match self.style {
                RopeStyle::Interleaved => {
                    for (pair, &(c, s)) in head.chunks_exact_mut(2).zip(angles) {
                        let (x0, x1) = (pair[0], pair[1]);
                        pair[0] = x0 * c - x1 * s;
                        pair[1] = x0 * s + x1 * c;
                    }
                }
                RopeStyle::Halves => {
                    for (i, &(c, s)) in angles.iter().enumerate() {
                        let (x0, x1) = (head[i], head[i + pairs]);
                        head[i] = x0 * c - x1 * s;
                        head[i + pairs] = x0 * s + x1 * c;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_the_identity_and_rotation_keeps_the_norm() {
        let mut rope = Rope::new(RopeStyle::Interleaved, 8, 10_000.0);
        rope.ensure(7);
        let x0: Vec<f32> = (0..16).map(|i| i as f32 * 0.3 - 2.0).collect();
        let mut x = x0.clone();
        rope.apply(&mut x, 8, 0);
        assert_eq!(x, x0);
        rope.apply(&mut x, 8, 7);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&x) - norm(&x0)).abs() < 1e-3);
        assert_ne!(x, x0);
        // The first pair turns by exactly `pos` radians.
        let (c, s) = (7f32.cos(), 7f32.sin());
        assert!((x[0] - (x0[0] * c - x0[1] * s)).abs() < 1e-5);
    }

    #[test]
    fn halves_pair_i_with_i_plus_half() {
        let mut rope = Rope::new(RopeStyle::Halves, 4, 10_000.0);
        rope.ensure(1);
        let mut x = vec![1.0, 0.0, 0.0, 0.0];
        rope.apply(&mut x, 4, 1);
        assert!((x[0] - 1f32.cos()).abs() < 1e-6);
        assert!((x[2] - 1f32.sin()).abs() < 1e-6);
        assert_eq!(x[1], 0.0);
    }
}
