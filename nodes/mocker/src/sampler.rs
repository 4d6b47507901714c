//! Output token ids: real ids of the model's vocabulary, deterministic per seed.

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};

/// Draws one request's output tokens.
#[derive(Debug, Clone)]
pub struct TokenSampler {
    rng: Xoshiro256PlusPlus,
}

/// What every request of an engine shares: the vocabulary and how often EOS is drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocabulary {
    /// Ids never drawn as ordinary tokens, sorted, all below `size`.
    special: Vec<u32>,
    /// Ids that may be drawn: `size - special.len()`, at least 1.
    ordinary: u32,
    eos_probability: f64,
}

impl Vocabulary {
    /// `special` must be sorted, deduplicated and below `size`, leaving at least one
    /// ordinary id (as `MockerConfig::validate` ensures); otherwise every draw is id 0.
    pub fn new(size: u32, special: Vec<u32>, eos_probability: f64) -> Self {
        let ordinary = size.saturating_sub(special.len() as u32).max(1);
        Vocabulary {
            special,
            ordinary,
            // NaN means never: `random_bool` must get a number in 0..=1.
            eos_probability: if eos_probability.is_nan() {
                0.0
            } else {
                eos_probability.clamp(0.0, 1.0)
            },
        }
    }

    /// The `rank`-th id that is not special.
    fn ordinary_id(&self, rank: u32) -> u32 {
        let mut id = rank;
        for &s in &self.special {
            if s <= id {
                id += 1;
            } else {
                break;
            }
        }
        id
    }
}

impl TokenSampler {
    pub fn new(seed: u64) -> Self {
        TokenSampler {
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
        }
    }

    /// The next token. With `eos_probability` (unless `ignore_eos`) it is one of
    /// `stop_ids`; otherwise an ordinary id of the vocabulary, uniformly.
    pub fn next_token(&mut self, vocab: &Vocabulary, stop_ids: &[u32], ignore_eos: bool) -> u32 {
        if !ignore_eos && !stop_ids.is_empty() && self.rng.random_bool(vocab.eos_probability) {
            return stop_ids[self.rng.random_range(0..stop_ids.len())];
        }
        vocab.ordinary_id(self.rng.random_range(0..vocab.ordinary))
    }
}

impl Vocabulary {
    /// The log-probability of `token` under the draw [`TokenSampler::next_token`] makes:
    /// the end-of-sequence chance spread evenly over `stop_ids`, the rest evenly over the
    /// ordinary ids. The alternatives are the first `top` ordinary ids, all as likely as
    /// any ordinary token (the draw is uniform; there is no better answer).
    pub fn logprob(
        &self,
        token: u32,
        stop_ids: &[u32],
        ignore_eos: bool,
        top: u32,
    ) -> dynamo_protocol::TokenLogprob {
        let p_eos = if ignore_eos || stop_ids.is_empty() {
            0.0
        } else {
            self.eos_probability
        };
        let ordinary = ((1.0 - p_eos) / f64::from(self.ordinary)).ln() as f32;
        let logprob = if p_eos > 0.0 && stop_ids.contains(&token) {
            (p_eos / stop_ids.len() as f64).ln() as f32
        } else {
            ordinary
        };
        let top = (0..top.min(self.ordinary))
            .map(|i| (self.ordinary_id(i), ordinary))
            .collect();
        dynamo_protocol::TokenLogprob {
            token_id: token,
            logprob,
            top,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_draws_special_ids_and_stays_in_the_vocabulary() {
        let vocab = Vocabulary::new(8, vec![0, 3, 7], 0.0);
        let mut s = TokenSampler::new(1);
        let mut seen = [0usize; 8];
        for _ in 0..5_000 {
            seen[s.next_token(&vocab, &[], false) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[3] + seen[7], 0, "{seen:?}");
        for id in [1, 2, 4, 5, 6] {
            assert!(seen[id] > 700, "id {id} drawn {} times", seen[id]);
        }
    }

    #[test]
    fn out_of_range_eos_probabilities_do_not_panic() {
        let mut s = TokenSampler::new(3);
        for p in [f64::NAN, -1.0, 7.0] {
            let vocab = Vocabulary::new(100, vec![], p);
            let t = s.next_token(&vocab, &[5], false);
            assert!(t < 100);
        }
        let always = Vocabulary::new(100, vec![], 7.0);
        assert_eq!(s.next_token(&always, &[5], false), 5);
    }

    #[test]
    fn same_seed_same_tokens() {
        let vocab = Vocabulary::new(32_000, vec![0, 1, 2], 0.01);
        let draw = |seed| {
            let mut s = TokenSampler::new(seed);
            (0..64)
                .map(|_| s.next_token(&vocab, &[2], false))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn eos_is_rare_and_ignore_eos_suppresses_it() {
        let vocab = Vocabulary::new(1_000, vec![0], 0.01);
        let mut s = TokenSampler::new(9);
        let eos = (0..100_000)
            .filter(|_| s.next_token(&vocab, &[0], false) == 0)
            .count();
        assert!((500..1_500).contains(&eos), "{eos} EOS in 100k draws");
        let mut s = TokenSampler::new(9);
        assert!((0..100_000).all(|_| s.next_token(&vocab, &[0], true) != 0));
    }

    #[test]
    fn logprobs_are_those_of_the_uniform_draw() {
        let vocab = Vocabulary::new(10, vec![0, 9], 0.2);
        // 8 ordinary ids share 0.8; the two stop ids share 0.2.
        let lp = vocab.logprob(5, &[0, 9], false, 3);
        assert!((lp.logprob - (0.1f32).ln()).abs() < 1e-6, "{lp:?}");
        assert_eq!(
            lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let stop = vocab.logprob(9, &[0, 9], false, 0);
        assert!((stop.logprob - (0.1f32).ln()).abs() < 1e-6);
        assert!(stop.top.is_empty());
        // ignore_eos: the ordinary ids share everything.
        let all = vocab.logprob(5, &[0, 9], true, 0);
        assert!((all.logprob - (0.125f32).ln()).abs() < 1e-6);
    }
}
