//! The KV router's cost of sending a request to a worker, and the router's own account of
//! the work it has already sent each worker.
//!
//! ```text
//! cost(w) = overlap_weight × (prompt_blocks − overlap(w) + pending_prefill_blocks(w))
//!         + active_decode_blocks(w)
//! ```
//!
//! As in Dynamo's router, a request's pending prefill is its *new* blocks, those the chosen
//! worker did not hold when it was routed (`prompt_blocks − overlap`): the cached part
//! costs the worker no compute, so it must not count as queued prefill either.
//!
//! `overlap_weight` here is the weight in effect ([`super::config::effective_weight`]): the
//! graph's `overlap_weight`, raised while the router's account shows prefill queued.
//!
//! Lowest cost wins; ties go to the lower load (requests in flight), then at random. With a
//! temperature above 0 the worker is sampled with `p ∝ exp(−normalised_cost / T)`.

use std::collections::HashMap;

use dynamo_runtime::InstanceId;

/// Work the router has sent one worker and not yet seen finish.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerLoad {
    /// Uncached prompt blocks (prompt − overlap at routing) of requests whose first token
    /// has not come back yet.
    pub prefill_blocks: u64,
    /// Prompt blocks of requests whose stream is still open (their KV is held).
    pub decode_blocks: u64,
    /// Requests in flight.
    pub requests: u64,
}

/// The router's bookkeeping of requests in flight, per worker.
#[derive(Debug, Default)]
pub struct ActiveLoads {
    by_worker: HashMap<InstanceId, WorkerLoad>,
}

impl ActiveLoads {
    pub fn get(&self, worker: InstanceId) -> WorkerLoad {
        self.by_worker.get(&worker).copied().unwrap_or_default()
    }

    /// A request of `prompt_blocks` blocks, `new_blocks` of them not cached on `worker`,
    /// was sent to `worker`.
    pub fn dispatched(&mut self, worker: InstanceId, prompt_blocks: u64, new_blocks: u64) {
        let l = self.by_worker.entry(worker).or_default();
        l.prefill_blocks += new_blocks.min(prompt_blocks);
        l.decode_blocks += prompt_blocks;
        l.requests += 1;
    }

    /// Its first token came back: its `new_blocks` are prefilled.
    pub fn prefilled(&mut self, worker: InstanceId, new_blocks: u64) {
        if let Some(l) = self.by_worker.get_mut(&worker) {
            l.prefill_blocks = l.prefill_blocks.saturating_sub(new_blocks);
        }
    }

    /// Its stream ended; `prefilled` says whether [`ActiveLoads::prefilled`] was called.
    pub fn finished(
        &mut self,
        worker: InstanceId,
        prompt_blocks: u64,
        new_blocks: u64,
        prefilled: bool,
    ) {
        let Some(l) = self.by_worker.get_mut(&worker) else {
            return;
        };
        if !prefilled {
            l.prefill_blocks = l
                .prefill_blocks
                .saturating_sub(new_blocks.min(prompt_blocks));
        }
        l.decode_blocks = l.decode_blocks.saturating_sub(prompt_blocks);
        l.requests = l.requests.saturating_sub(1);
        if l.requests == 0 {
            self.by_worker.remove(&worker);
        }
    }
}

/// The cost of sending a request of `prompt_blocks` blocks, `overlap` of them cached, to a
/// worker with `load`.
pub fn cost(overlap_weight: f64, prompt_blocks: u64, overlap: u64, load: WorkerLoad) -> f64 {
    let prefill = prompt_blocks.saturating_sub(overlap) + load.prefill_blocks;
    overlap_weight * prefill as f64 + load.decode_blocks as f64
}

/// One candidate's cost and load (for ties).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub cost: f64,
    pub load: u64,
}

/// The index of the chosen candidate; `None` only for an empty slice.
///
/// `temperature` 0 (or less, or NaN) takes the lowest cost, ties by lower load, then at
/// random; above 0 it samples a softmax over the costs normalised to `[0, 1]`.
pub fn select(scored: &[Scored], temperature: f64, rng: &mut fastrand::Rng) -> Option<usize> {
    if scored.is_empty() {
        return None;
    }
    let (min, max) = scored
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), s| {
            (lo.min(s.cost), hi.max(s.cost))
        });
    if temperature > 0.0 && max > min {
        let weights: Vec<f64> = scored
            .iter()
            .map(|s| (-((s.cost - min) / (max - min)) / temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut x = rng.f64() * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return Some(i);
            }
            x -= w;
        }
        // Rounding left a sliver past the last weight.
        return Some(scored.len() - 1);
    }
    let best_load = scored
        .iter()
        .filter(|s| s.cost <= min)
        .map(|s| s.load)
        .min()?;
    let ties = scored
        .iter()
        .filter(|s| s.cost <= min && s.load == best_load)
        .count();
    let pick = rng.usize(..ties.max(1));
    scored
        .iter()
        .enumerate()
        .filter(|(_, s)| s.cost <= min && s.load == best_load)
        .nth(pick)
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn s(cost: f64, load: u64) -> Scored {
        Scored { cost, load }
    }

    #[test]
    fn cost_counts_uncached_prefill_pending_prefill_and_decode() {
        let idle = WorkerLoad::default();
        assert_eq!(cost(1.0, 10, 0, idle), 10.0);
        assert_eq!(cost(1.0, 10, 4, idle), 6.0);
        assert_eq!(cost(2.0, 10, 4, idle), 12.0);
        assert_eq!(
            cost(1.0, 10, 12, idle),
            0.0,
            "overlap past the prompt is no credit"
        );
        let busy = WorkerLoad {
            prefill_blocks: 5,
            decode_blocks: 20,
            requests: 2,
        };
        assert_eq!(cost(1.0, 10, 4, busy), 6.0 + 5.0 + 20.0);
        assert_eq!(cost(0.5, 10, 4, busy), 0.5 * 11.0 + 20.0);
    }

    #[test]
    fn a_long_cached_prefix_beats_an_idle_worker_until_the_load_outweighs_it() {
        let idle = WorkerLoad::default();
        let holder = |decode| WorkerLoad {
            decode_blocks: decode,
            ..WorkerLoad::default()
        };
        assert!(cost(1.0, 32, 30, holder(20)) < cost(1.0, 32, 0, idle));
        assert!(cost(1.0, 32, 30, holder(40)) > cost(1.0, 32, 0, idle));
    }

    #[test]
    fn pending_prefill_counts_only_the_uncached_blocks() {
        // A 100-block prompt routed for its 90 cached blocks queues 10 blocks of prefill,
        // not 100: the worker computes only those.
        let mut a = ActiveLoads::default();
        a.dispatched(1, 100, 10);
        assert_eq!(
            a.get(1),
            WorkerLoad {
                prefill_blocks: 10,
                decode_blocks: 100,
                requests: 1
            }
        );
        // Its cost to the next request: 10 blocks queued, not 100.
        assert_eq!(cost(1.0, 100, 90, a.get(1)), 10.0 + 10.0 + 100.0);
        a.dispatched(1, 8, 20);
        assert_eq!(
            a.get(1).prefill_blocks,
            18,
            "new blocks never exceed the prompt"
        );
        a.prefilled(1, 10);
        a.finished(1, 100, 10, true);
        a.finished(1, 8, 20, false);
        assert_eq!(a.get(1), WorkerLoad::default());
    }

    #[test]
    fn argmin_then_load_then_random() {
        let mut rng = fastrand::Rng::with_seed(7);
        assert_eq!(select(&[], 0.0, &mut rng), None);
        assert_eq!(
            select(&[s(3.0, 0), s(1.0, 9), s(2.0, 0)], 0.0, &mut rng),
            Some(1)
        );
        assert_eq!(
            select(&[s(1.0, 4), s(1.0, 2), s(5.0, 0)], 0.0, &mut rng),
            Some(1)
        );
        let mut seen = BTreeMap::new();
        for _ in 0..200 {
            let i = select(&[s(1.0, 2), s(1.0, 2), s(0.5, 9), s(1.0, 2)], 0.0, &mut rng);
            assert_eq!(i, Some(2));
            let j = select(&[s(1.0, 2), s(1.0, 3), s(1.0, 2)], 0.0, &mut rng);
            *seen.entry(j).or_insert(0) += 1;
        }
        assert_eq!(
            seen.keys().copied().collect::<Vec<_>>(),
            vec![Some(0), Some(2)]
        );
    }

    #[test]
    fn temperature_prefers_low_cost_but_explores() {
        let mut rng = fastrand::Rng::with_seed(1);
        let scored = [s(0.0, 0), s(10.0, 0)];
        let mut hits = [0usize; 2];
        for _ in 0..2000 {
            if let Some(i) = select(&scored, 1.0, &mut rng) {
                hits[i] += 1;
            }
        }
        // p(cheap) = 1 / (1 + e^-1) ≈ 0.73.
        assert!(hits[0] > hits[1] && hits[1] > 300, "{hits:?}");
        let mut cold = [0usize; 2];
        for _ in 0..500 {
            if let Some(i) = select(&scored, 0.01, &mut rng) {
                cold[i] += 1;
            }
        }
        assert_eq!(cold, [500, 0], "a tiny temperature is argmin");
    }

    #[test]
    fn bookkeeping_moves_prefill_to_decode_and_back_to_zero() {
        let mut a = ActiveLoads::default();
        a.dispatched(1, 10, 10);
        a.dispatched(1, 4, 4);
        assert_eq!(
            a.get(1),
            WorkerLoad {
                prefill_blocks: 14,
                decode_blocks: 14,
                requests: 2
            }
        );
        a.prefilled(1, 10);
        assert_eq!(a.get(1).prefill_blocks, 4);
        a.finished(1, 10, 10, true);
        a.finished(1, 4, 4, false);
        assert_eq!(a.get(1), WorkerLoad::default());
        a.finished(2, 3, 3, false);
        assert_eq!(a.get(2), WorkerLoad::default(), "unknown worker is a no-op");
    }
}
