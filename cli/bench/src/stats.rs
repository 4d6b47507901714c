//! Latency summaries: mean and percentiles by sorting the samples (exact; a run holds at
//! most a few million samples, so sorting is cheap next to the run itself).

use serde::Serialize;

/// Mean and percentiles of one latency, in milliseconds. All zero when `count` is 0.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct LatencySummary {
    pub count: usize,
    pub mean: f64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl LatencySummary {
    /// Summarises samples in milliseconds; NaN samples are dropped.
    pub fn from_ms(mut samples: Vec<f64>) -> Self {
        samples.retain(|s| !s.is_nan());
        if samples.is_empty() {
            return LatencySummary::default();
        }
        samples.sort_by(f64::total_cmp);
        let count = samples.len();
        let mean = samples.iter().sum::<f64>() / count as f64;
        LatencySummary {
            count,
            mean,
            min: samples.first().copied().unwrap_or(0.0),
            p50: percentile_sorted(&samples, 50.0),
            p90: percentile_sorted(&samples, 90.0),
            p99: percentile_sorted(&samples, 99.0),
            max: samples.last().copied().unwrap_or(0.0),
        }
    }
}

/// The p-th percentile (0–100) of ascending samples, interpolating linearly between the
/// two nearest ranks (numpy's default): rank = p/100 · (n−1). 0 for no samples.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return 0.0;
    }
    let rank = (p.clamp(0.0, 100.0) / 100.0) * (n - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let (Some(&a), Some(&b)) = (sorted.get(lo), sorted.get(hi)) else {
        return sorted.last().copied().unwrap_or(0.0);
    };
    a + (b - a) * (rank - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn percentiles_match_numpy() {
        // numpy.percentile(range(1, 11), [50, 90, 99]) == [5.5, 9.1, 9.91]
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert!(close(percentile_sorted(&v, 50.0), 5.5));
        assert!(close(percentile_sorted(&v, 90.0), 9.1));
        assert!(close(percentile_sorted(&v, 99.0), 9.91));
        assert!(close(percentile_sorted(&v, 0.0), 1.0));
        assert!(close(percentile_sorted(&v, 100.0), 10.0));
        // 1..=101: p-th percentile is p + 1 exactly.
        let v: Vec<f64> = (1..=101).map(f64::from).collect();
        for p in [1.0, 50.0, 90.0, 99.0] {
            assert!(close(percentile_sorted(&v, p), p + 1.0), "p{p}");
        }
    }

    #[test]
    fn edge_cases() {
        assert_eq!(percentile_sorted(&[], 50.0), 0.0);
        assert_eq!(percentile_sorted(&[7.0], 99.0), 7.0);
        assert_eq!(LatencySummary::from_ms(vec![]), LatencySummary::default());
        assert_eq!(LatencySummary::from_ms(vec![f64::NAN]).count, 0);
    }

    #[test]
    fn summary_sorts_unsorted_samples() {
        let s = LatencySummary::from_ms(vec![40.0, 10.0, 30.0, 20.0]);
        assert_eq!(s.count, 4);
        assert!(close(s.mean, 25.0));
        assert!(close(s.min, 10.0));
        assert!(close(s.max, 40.0));
        assert!(close(s.p50, 25.0));
        assert!(close(s.p90, 37.0));
        assert!(close(s.p99, 39.7));
    }
}
