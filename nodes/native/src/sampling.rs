//! Choosing the next token from a row of logits: penalties, then greedy or temperature
//! with top-k and top-p. The random draw is seeded by the request's seed and the
//! position, so the same request gives the same tokens, also after a preemption.

use dynamo_protocol::{SamplingOptions, TokenLogprob};
use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

/// Reusable buffers; one per engine.
#[derive(Default)]
pub struct Sampler {
    adjusted: Vec<f32>,
    order: Vec<u32>,
    counts: Vec<(u32, u32)>,
}

impl Sampler {
    /// The next token of a sequence whose `generated` tokens so far are given.
    pub fn sample(
        &mut self,
        logits: &[f32],
        opts: &SamplingOptions,
        generated: &[u32],
        seed: u64,
        position: usize,
    ) -> u32 {
        let penalised = opts.presence_penalty != 0.0 || opts.frequency_penalty != 0.0;
        let logits: &[f32] = if penalised && !generated.is_empty() {
            self.adjusted.clear();
            self.adjusted.extend_from_slice(logits);
            self.counts.clear();
            let mut sorted: Vec<u32> = generated.to_vec();
            sorted.sort_unstable();
            for id in sorted {
                match self.counts.last_mut() {
                    Some((last, n)) if *last == id => *n += 1,
                    _ => self.counts.push((id, 1)),
                }
            }
            for &(id, n) in &self.counts {
                if let Some(l) = self.adjusted.get_mut(id as usize) {
                    *l -= opts.presence_penalty + opts.frequency_penalty * n as f32;
                }
            }
            &self.adjusted
        } else {
            logits
        };
        if opts.temperature <= 0.0 || opts.top_k == 1 {
            return argmax(logits);
        }
        // Candidates by descending logit, cut by top-k.
        self.order.clear();
        self.order.extend(0..logits.len() as u32);
        let k = match opts.top_k {
            0 => logits.len(),
            k => (k as usize).min(logits.len()),
        };
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        if k < self.order.len() {
            self.order.select_nth_unstable_by(k - 1, by_logit);
            self.order.truncate(k);
        }
        self.order.sort_unstable_by(by_logit);
        let inv_t = 1.0 / opts.temperature;
        let top = logits[self.order[0] as usize];
        let mut probs: Vec<f32> = self
            .order
            .iter()
            .map(|&i| ((logits[i as usize] - top) * inv_t).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        // Top-p: the smallest prefix whose mass reaches `top_p`.
        let mut keep = probs.len();
        if opts.top_p < 1.0 {
            let mut mass = 0.0;
            for (i, p) in probs.iter().enumerate() {
                mass += p / total;
                if mass >= opts.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        probs.truncate(keep);
        let kept: f32 = probs.iter().sum();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(
            seed ^ (position as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let mut draw = rng.random::<f32>() * kept;
        for (i, p) in probs.iter().enumerate() {
            if draw < *p {
                return self.order[i];
            }
            draw -= p;
        }
        self.order[keep - 1]
    }
}

/// The first index of the largest logit (llama.cpp's greedy choice).
/// `token`'s log-probability under the softmax of `logits` (the raw model distribution,
/// before temperature and penalties), with the `top` most likely tokens.
pub fn logprobs(logits: &[f32], token: u32, top: u32) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
    let lse = f64::from(max) + sum.ln();
    let lp = |x: f32| (f64::from(x) - lse) as f32;
    // The `top` largest, kept sorted (descending) in a short vector.
    let n = top as usize;
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(n + 1);
    if n > 0 {
        for (i, &x) in logits.iter().enumerate() {
            if best.len() == n && best.last().is_some_and(|&(b, _)| x <= b) {
                continue;
            }
            let at = best.partition_point(|&(b, _)| b >= x);
            best.insert(at, (x, i as u32));
            best.truncate(n);
        }
    }
    TokenLogprob {
        token_id: token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&x| lp(x)),
        top: best.into_iter().map(|(x, id)| (id, lp(x))).collect(),
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(temperature: f32, top_k: u32, top_p: f32) -> SamplingOptions {
        SamplingOptions {
            temperature,
            top_k,
            top_p,
            ..SamplingOptions::default()
        }
    }

    #[test]
    fn greedy_takes_the_largest_and_penalties_move_it() {
        let logits = [0.1, 3.0, 2.9, -1.0];
        let mut s = Sampler::default();
        assert_eq!(s.sample(&logits, &opts(0.0, 0, 1.0), &[], 1, 0), 1);
        let pen = SamplingOptions {
            presence_penalty: 0.5,
            ..opts(0.0, 0, 1.0)
        };
        assert_eq!(s.sample(&logits, &pen, &[1], 1, 0), 2);
        let freq = SamplingOptions {
            frequency_penalty: 0.05,
            ..opts(0.0, 0, 1.0)
        };
        assert_eq!(
            s.sample(&logits, &freq, &[1], 1, 0),
            1,
            "one repeat costs 0.05"
        );
        assert_eq!(s.sample(&logits, &freq, &[1, 1, 1], 1, 0), 2);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_draws_and_seeds_repeat() {
        let logits = [2.0, 1.9, 1.8, 0.0, -5.0];
        let mut s = Sampler::default();
        let draws = |s: &mut Sampler, o: &SamplingOptions, seed| {
            (0..400)
                .map(|p| s.sample(&logits, o, &[], seed, p))
                .collect::<Vec<_>>()
        };
        let k2 = draws(&mut s, &opts(1.0, 2, 1.0), 7);
        assert!(k2.iter().all(|&t| t < 2));
        assert!(k2.contains(&0) && k2.contains(&1));
        let p = draws(&mut s, &opts(1.0, 0, 0.5), 7);
        assert!(p.iter().all(|&t| t < 2), "top-p 0.5 keeps the two best");
        let all = draws(&mut s, &opts(1.0, 0, 1.0), 7);
        assert!(all.contains(&3), "plain temperature reaches the tail");
        assert_eq!(all, draws(&mut s, &opts(1.0, 0, 1.0), 7));
        assert_ne!(all, draws(&mut s, &opts(1.0, 0, 1.0), 8));
    }

    #[test]
    fn logprobs_are_the_log_softmax_with_the_most_likely_first() {
        let logits = [1.0f32, 3.0, 2.0, 3.0 - 1e-3, -5.0];
        let lp = logprobs(&logits, 2, 3);
        let z: f64 = logits.iter().map(|&x| f64::from(x).exp()).sum();
        let want = (2.0f64.exp() / z).ln() as f32;
        assert!((lp.logprob - want).abs() < 1e-5, "{lp:?}");
        assert_eq!(
            lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 3, 2]
        );
        let total: f64 = (0..5)
            .map(|i| f64::from(logprobs(&logits, i, 0).logprob).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert!(logprobs(&logits, 0, 0).top.is_empty());
    }
}
