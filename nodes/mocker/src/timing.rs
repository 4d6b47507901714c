//! How long a step takes: NVIDIA Dynamo's published polynomial fit of a vLLM worker
//! (`lib/mocker/src/common/perf_model.rs`), in milliseconds, divided by the speedup.

use std::time::Duration;

/// Milliseconds to prefill `new_tokens` uncached prompt tokens in one step.
///
/// `t = 4.209989e-7·N² + 1.518344e-2·N + 16.50142`.
pub fn prefill_ms(new_tokens: usize) -> f64 {
    let n = new_tokens as f64;
    4.209989e-7 * n * n + 1.518344e-2 * n + 16.50142
}

/// Milliseconds of one decode step at KV use `u` = active KV tokens / total KV tokens.
///
/// `t = −25.74·u² + 54.01·u + 5.74`, floored at 1 ms; `u` is clamped to `0..=1`.
pub fn decode_ms(kv_usage: f64) -> f64 {
    let u = if kv_usage.is_nan() {
        0.0
    } else {
        kv_usage.clamp(0.0, 1.0)
    };
    (-25.74 * u * u + 54.01 * u + 5.74).max(1.0)
}

/// What one step computed, as far as timing is concerned.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepWork {
    /// Uncached prompt tokens computed in the step (all prefill chunks together).
    pub prefill_tokens: usize,
    /// Sequences that produced a decode token.
    pub decode_seqs: usize,
    /// Active KV blocks over all KV blocks, after the step's allocations.
    pub kv_usage: f64,
}

/// Duration of a step: its prefill part plus its decode part, divided by `speedup`.
/// An infinite `speedup` (instant mode) or an empty step takes no time.
pub fn step_duration(work: &StepWork, speedup: f64) -> Duration {
    if speedup == f64::INFINITY || speedup.is_nan() || speedup <= 0.0 {
        return Duration::ZERO;
    }
    let mut ms = 0.0;
    if work.prefill_tokens > 0 {
        ms += prefill_ms(work.prefill_tokens);
    }
    if work.decode_seqs > 0 {
        ms += decode_ms(work.kv_usage);
    }
    Duration::try_from_secs_f64(ms / speedup / 1_000.0).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn prefill_follows_the_polynomial() {
        assert!(close(prefill_ms(0), 16.50142));
        // 1000 tokens: 0.4209989 + 15.18344 + 16.50142.
        assert!(close(prefill_ms(1_000), 32.1058589));
        // Quadratic growth: 8k tokens cost far more than 8× 1k tokens' linear part.
        assert!(close(
            prefill_ms(8_192),
            4.209989e-7 * 8192.0 * 8192.0 + 1.518344e-2 * 8192.0 + 16.50142
        ));
        assert!(prefill_ms(2_000) > prefill_ms(1_000));
    }

    #[test]
    fn decode_follows_the_polynomial_with_a_floor() {
        assert!(close(decode_ms(0.0), 5.74));
        assert!(close(decode_ms(0.5), -25.74 * 0.25 + 54.01 * 0.5 + 5.74));
        assert!(close(decode_ms(1.0), 34.01));
        // Out-of-range usage is clamped, NaN counts as empty.
        assert!(close(decode_ms(3.0), 34.01));
        assert!(close(decode_ms(f64::NAN), 5.74));
        assert!(decode_ms(-1.0) >= 1.0);
    }

    #[test]
    fn step_adds_both_parts_and_divides_by_speedup() {
        let work = StepWork {
            prefill_tokens: 1_000,
            decode_seqs: 4,
            kv_usage: 0.5,
        };
        let expected_ms = prefill_ms(1_000) + decode_ms(0.5);
        let d = step_duration(&work, 1.0);
        assert!((d.as_secs_f64() * 1e3 - expected_ms).abs() < 1e-6);
        let fast = step_duration(&work, 10.0);
        assert!((fast.as_secs_f64() * 1e4 - expected_ms).abs() < 1e-4);
        let decode_only = StepWork {
            prefill_tokens: 0,
            ..work
        };
        assert!(
            (step_duration(&decode_only, 1.0).as_secs_f64() * 1e3 - decode_ms(0.5)).abs() < 1e-6
        );
    }

    #[test]
    fn instant_and_empty_steps_take_no_time() {
        let work = StepWork {
            prefill_tokens: 100,
            decode_seqs: 1,
            kv_usage: 0.1,
        };
        assert_eq!(step_duration(&work, f64::INFINITY), Duration::ZERO);
        assert_eq!(step_duration(&StepWork::default(), 1.0), Duration::ZERO);
    }
}
