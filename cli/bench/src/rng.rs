//! SplitMix64: a tiny seeded generator whose output never changes between releases, so a
//! `--seed` reproduces the same prompts and arrival times forever.

#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    #[cfg(test)]
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// A generator for one stream of a run (a prefix group, a request), independent of
    /// the others for the same seed.
    pub fn derived(seed: u64, stream: u64, index: u64) -> Self {
        let mut g = SplitMix64(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        let mixed = g.next_u64() ^ index.wrapping_mul(0xE703_7ED1_A0B4_28DB);
        SplitMix64(mixed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n); 0 when n is 0.
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }

    /// An exponential variate with the given rate (mean 1/rate): the gap between Poisson
    /// arrivals.
    pub fn exponential(&mut self, rate: f64) -> f64 {
        // 1 - U is in (0, 1], so the logarithm is finite.
        -(1.0 - self.next_f64()).ln() / rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_streams_differ() {
        let a: Vec<u64> = (0..4).map(|_| SplitMix64::new(7).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let x = SplitMix64::derived(1, 0, 0).next_u64();
        let y = SplitMix64::derived(1, 0, 1).next_u64();
        let z = SplitMix64::derived(1, 1, 0).next_u64();
        assert!(x != y && x != z && y != z);
    }

    #[test]
    fn exponential_mean_is_about_one_over_rate() {
        let mut g = SplitMix64::new(42);
        let n = 20_000;
        let mean = (0..n).map(|_| g.exponential(4.0)).sum::<f64>() / n as f64;
        assert!((mean - 0.25).abs() < 0.02, "mean {mean}");
        let mut g = SplitMix64::new(3);
        assert!((0..1000).all(|_| {
            let f = g.next_f64();
            (0.0..1.0).contains(&f)
        }));
    }
}
