//! How a router picks one instance among the live ones: the [`Policy`] seam, and the
//! policies that need nothing but the instances' load counters.
//!
//! A policy is a synchronous choice: these read atomics and return an id, taking no lock
//! and allocating nothing; the router calls [`Policy::route`] once per request. The
//! KV-aware policy ([`crate::kv`]) implements the same trait, reads the request's token ids
//! and follows each request through a [`RequestTracker`].

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dynamo_protocol::TokenRequest;
use dynamo_runtime::InstanceId;

/// The router's live counters for one instance, shared by the load table, the policy
/// and every open response stream routed to it.
#[derive(Debug)]
pub struct InstanceLoad {
    id: InstanceId,
    in_flight: AtomicU64,
    routed: AtomicU64,
}

impl InstanceLoad {
    pub fn new(id: InstanceId) -> Self {
        InstanceLoad {
            id,
            in_flight: AtomicU64::new(0),
            routed: AtomicU64::new(0),
        }
    }

    pub fn id(&self) -> InstanceId {
        self.id
    }

    /// Requests dispatched to this instance whose response stream is still open.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests ever dispatched to this instance by this router (retries included).
    pub fn routed(&self) -> u64 {
        self.routed.load(Ordering::Relaxed)
    }

    /// A request was dispatched; pair with [`InstanceLoad::finish`].
    #[cfg(test)]
    pub(crate) fn start(&self) {
        self.reserve();
        self.dispatched();
    }

    /// A request holds a slot of this instance (perhaps before it is sent, e.g. while its
    /// prefill runs elsewhere); pair with [`InstanceLoad::finish`].
    pub(crate) fn reserve(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request was sent to this instance.
    pub(crate) fn dispatched(&self) {
        self.routed.fetch_add(1, Ordering::Relaxed);
    }

    /// A dispatched request's stream ended, failed or was dropped.
    pub(crate) fn finish(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Chooses the instance for one request.
pub trait Policy: Send + Sync + 'static {
    /// The id of one of `candidates`, which is never empty and sorted by id. An id that is
    /// not among them is treated as the first candidate.
    fn choose(
        &self,
        candidates: &[std::sync::Arc<InstanceLoad>],
        request: &TokenRequest,
    ) -> InstanceId;

    /// What the router calls: the choice and, for a policy that keeps its own account of
    /// the work in flight, a tracker told about the request's first token, its move to
    /// another instance on a retry, and (by being dropped) its end. The default is
    /// [`Policy::choose`] with no tracker.
    fn route(&self, candidates: &[std::sync::Arc<InstanceLoad>], request: &TokenRequest) -> Routed {
        Routed {
            instance: self.choose(candidates, request),
            tracker: None,
        }
    }

    /// The KV state of a KV-aware policy (what every worker feeding its events holds),
    /// so a caller can ask for the overlap of a worker it chose another way; `None` for
    /// the others.
    fn kv(&self) -> Option<crate::KvRouterHandle> {
        None
    }
}

/// A routing decision.
pub struct Routed {
    pub instance: InstanceId,
    pub tracker: Option<Box<dyn RequestTracker>>,
}

/// Follows one routed request for its policy. Dropping it means the request is over
/// (stream ended, failed or was dropped).
pub trait RequestTracker: Send + 'static {
    /// The first item came back from the instance (its prefill is done).
    fn first_token(&mut self) {}
    /// The request now runs on `instance` instead (a retry, or the chosen id was not live).
    fn moved_to(&mut self, _instance: InstanceId) {}
}

/// Each candidate in turn.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Policy for RoundRobin {
    fn choose(&self, candidates: &[std::sync::Arc<InstanceLoad>], _: &TokenRequest) -> InstanceId {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        candidates
            .get(n % candidates.len().max(1))
            .map_or(0, |c| c.id)
    }
}

/// A uniformly random candidate (thread-local wyrand).
#[derive(Debug, Default, Clone, Copy)]
pub struct Random;

impl Policy for Random {
    fn choose(&self, candidates: &[std::sync::Arc<InstanceLoad>], _: &TokenRequest) -> InstanceId {
        if candidates.is_empty() {
            return 0;
        }
        candidates[fastrand::usize(..candidates.len())].id
    }
}

/// The candidate with the fewest requests in flight. Ties (an idle cluster, equal loads)
/// go round-robin among the tied candidates, so load spreads instead of piling onto the
/// lowest id.
#[derive(Debug, Default)]
pub struct LeastLoaded {
    next: AtomicUsize,
}

impl Policy for LeastLoaded {
    fn choose(&self, candidates: &[std::sync::Arc<InstanceLoad>], _: &TokenRequest) -> InstanceId {
        let Some(first) = candidates.first() else {
            return 0;
        };
        let (mut min, mut min_at, mut ties) = (first.in_flight(), first.id, 0usize);
        for c in candidates {
            let load = c.in_flight();
            if load < min {
                (min, min_at, ties) = (load, c.id, 1);
            } else if load == min {
                ties += 1;
            }
        }
        if ties <= 1 {
            return min_at;
        }
        // Counters move under us; if the chosen tie is gone by the second pass, the first
        // minimum is still a good answer.
        let mut skip = self.next.fetch_add(1, Ordering::Relaxed) % ties;
        for c in candidates {
            if c.in_flight() == min {
                if skip == 0 {
                    return c.id;
                }
                skip -= 1;
            }
        }
        min_at
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use dynamo_protocol::{SamplingOptions, StopConditions};

    use super::*;

    fn request() -> TokenRequest {
        TokenRequest {
            model: "m".into(),
            token_ids: vec![1, 2, 3],
            sampling: SamplingOptions::default(),
            stop: StopConditions::default(),
        }
    }

    fn loads(ids: &[InstanceId]) -> Vec<Arc<InstanceLoad>> {
        ids.iter()
            .map(|&id| Arc::new(InstanceLoad::new(id)))
            .collect()
    }

    fn counts(
        policy: &dyn Policy,
        c: &[Arc<InstanceLoad>],
        n: usize,
    ) -> BTreeMap<InstanceId, usize> {
        let req = request();
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            *seen.entry(policy.choose(c, &req)).or_insert(0) += 1;
        }
        seen
    }

    #[test]
    fn round_robin_takes_each_in_turn() {
        let c = loads(&[3, 5, 9]);
        let req = request();
        let policy = RoundRobin::default();
        let picks: Vec<_> = (0..6).map(|_| policy.choose(&c, &req)).collect();
        assert_eq!(picks, vec![3, 5, 9, 3, 5, 9]);
    }

    #[test]
    fn random_only_returns_candidates_and_reaches_all() {
        let c = loads(&[1, 2, 3, 4]);
        let seen = counts(&Random, &c, 400);
        assert_eq!(seen.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    }

    #[test]
    fn least_loaded_picks_the_minimum_and_spreads_ties() {
        let c = loads(&[1, 2, 3]);
        for _ in 0..5 {
            c[0].start();
        }
        c[2].start();
        let policy = LeastLoaded::default();
        assert_eq!(counts(&policy, &c, 10), BTreeMap::from([(2, 10)]));

        c[1].start();
        // 1 has five in flight, 2 and 3 one each: the tie alternates between them.
        assert_eq!(counts(&policy, &c, 10), BTreeMap::from([(2, 5), (3, 5)]));
    }

    #[test]
    fn counters_pair_start_and_finish() {
        let load = InstanceLoad::new(7);
        load.start();
        load.start();
        load.finish();
        assert_eq!((load.id(), load.in_flight(), load.routed()), (7, 1, 2));
    }
}
