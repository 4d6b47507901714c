//! The per-instance load counters, kept index-aligned with the instance set's snapshot so
//! a request finds its candidates with two atomic loads and a pointer compare. The table
//! is rebuilt (under a mutex, off the hot path) only when the instance set changes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use arc_swap::{ArcSwap, Guard};
use dynamo_protocol::{TokenDelta, TokenRequest};
use dynamo_runtime::{Instance, InstanceId, InstanceSet, Service};

use crate::policy::{InstanceLoad, Policy, RequestTracker, Routed};

pub(crate) type Instances<Req, Resp> = Arc<Vec<Instance<Req, Resp>>>;
pub(crate) type Client<Req, Resp> = Arc<dyn Service<Req, Resp>>;

/// A snapshot of the instance set and the counter table aligned with it.
type Current<Req, Resp> = (Instances<Req, Resp>, Guard<Arc<LoadTable<Req, Resp>>>);

/// The counters for one version of the instance set.
struct LoadTable<Req, Resp> {
    /// The snapshot `live` is aligned with. Weak, so the table keeps no client alive; it
    /// still pins the allocation, so the address cannot be reused by a later snapshot.
    source: Weak<Vec<Instance<Req, Resp>>>,
    /// One entry per instance of `source`, same order (sorted by id).
    live: Vec<Arc<InstanceLoad>>,
    /// Instances gone from the set whose streams were still open at the last rebuild; kept
    /// so their counters are reused if they come back and shown in stats until they drain.
    retired: Vec<Arc<InstanceLoad>>,
}

/// One routing decision: the instance to call and the counters to charge.
pub(crate) struct Pick<Req = TokenRequest, Resp = TokenDelta> {
    pub id: InstanceId,
    pub client: Client<Req, Resp>,
    pub load: Arc<InstanceLoad>,
    /// Whether another instance was live, i.e. whether a retry could go anywhere.
    pub has_alternative: bool,
    /// The policy's account of this request, if it keeps one.
    pub tracker: Option<Box<dyn RequestTracker>>,
}

/// The load counters of one output port's instances. Generic over the port's messages so
/// the decode and prefill ports of a disaggregated router share the same accounting; the
/// policy always sees the [`TokenRequest`] being served.
pub(crate) struct Loads<Req = TokenRequest, Resp = TokenDelta> {
    table: ArcSwap<LoadTable<Req, Resp>>,
    rebuild: Mutex<()>,
}

impl<Req: Send + 'static, Resp: Send + 'static> Loads<Req, Resp> {
    pub fn new() -> Self {
        Loads {
            table: ArcSwap::from_pointee(LoadTable {
                source: Weak::new(),
                live: Vec::new(),
                retired: Vec::new(),
            }),
            rebuild: Mutex::new(()),
        }
    }

    /// Asks `policy` for one of the live instances; `None` if there is none.
    pub fn pick(
        &self,
        set: &InstanceSet<Req, Resp>,
        policy: &dyn Policy,
        request: &TokenRequest,
    ) -> Option<Pick<Req, Resp>> {
        let (instances, table) = self.current(set);
        let candidates: &[Arc<InstanceLoad>] = &table.live;
        if candidates.is_empty() {
            return None;
        }
        let Routed {
            instance: chosen,
            mut tracker,
        } = policy.route(candidates, request);
        let at = candidates
            .binary_search_by_key(&chosen, |c| c.id())
            .unwrap_or_else(|_| {
                tracing::warn!(chosen, "router policy chose an instance that is not live");
                if let (Some(t), Some(first)) = (tracker.as_mut(), candidates.first()) {
                    t.moved_to(first.id());
                }
                0
            });
        let mut pick = pick_at(&instances, candidates, at)?;
        pick.tracker = tracker;
        Some(pick)
    }

    /// A replacement for `failed`, found dead before its first item: the least-loaded
    /// other live instance, ties going to the next after `failed` in id order. The policy
    /// is not consulted, so a retry does not shift its rotation (with round-robin over
    /// two instances, that would send every first attempt to the dead one).
    pub fn pick_other(
        &self,
        set: &InstanceSet<Req, Resp>,
        failed: InstanceId,
    ) -> Option<Pick<Req, Resp>> {
        let (instances, table) = self.current(set);
        let candidates: &[Arc<InstanceLoad>] = &table.live;
        let after = candidates.partition_point(|c| c.id() <= failed);
        let (up_to, beyond) = candidates.split_at(after);
        let at = beyond
            .iter()
            .enumerate()
            .map(|(i, c)| (after + i, c))
            .chain(up_to.iter().enumerate())
            .filter(|(_, c)| c.id() != failed)
            .min_by_key(|(_, c)| c.in_flight())
            .map(|(at, _)| at)?;
        pick_at(&instances, candidates, at)
    }

    /// `(id, in_flight, routed)` for every live instance, and for gone ones whose streams
    /// are still open, sorted by id.
    pub fn stats(&self, set: &InstanceSet<Req, Resp>) -> Vec<(InstanceId, u64, u64)> {
        let (_, table) = self.current(set);
        let mut out: Vec<_> = table
            .live
            .iter()
            .chain(table.retired.iter().filter(|l| l.in_flight() > 0))
            .map(|l| (l.id(), l.in_flight(), l.routed()))
            .collect();
        out.sort_unstable_by_key(|s| s.0);
        out
    }

    /// The set's instances now and the table aligned with them.
    fn current(&self, set: &InstanceSet<Req, Resp>) -> Current<Req, Resp> {
        let instances = set.snapshot();
        let table = self.table.load();
        if std::ptr::eq(table.source.as_ptr(), Arc::as_ptr(&instances)) {
            return (instances, table);
        }
        drop(table);
        self.rebuild(set)
    }

    #[cold]
    fn rebuild(&self, set: &InstanceSet<Req, Resp>) -> Current<Req, Resp> {
        let _only_one = self.rebuild.lock().unwrap_or_else(PoisonError::into_inner);
        // Always move to the set's newest state, never back to an older snapshot a slow
        // caller may hold.
        let instances = set.snapshot();
        let old = self.table.load_full();
        if std::ptr::eq(old.source.as_ptr(), Arc::as_ptr(&instances)) {
            return (instances, Guard::from_inner(old));
        }
        let mut known: BTreeMap<InstanceId, Arc<InstanceLoad>> = old
            .live
            .iter()
            .chain(old.retired.iter())
            .map(|l| (l.id(), l.clone()))
            .collect();
        let live: Vec<_> = instances
            .iter()
            .map(|i| {
                known
                    .remove(&i.id)
                    .unwrap_or_else(|| Arc::new(InstanceLoad::new(i.id)))
            })
            .collect();
        let retired = known.into_values().filter(|l| l.in_flight() > 0).collect();
        let table = Arc::new(LoadTable {
            source: Arc::downgrade(&instances),
            live,
            retired,
        });
        self.table.store(table.clone());
        (instances, Guard::from_inner(table))
    }
}

fn pick_at<Req, Resp>(
    instances: &Instances<Req, Resp>,
    candidates: &[Arc<InstanceLoad>],
    at: usize,
) -> Option<Pick<Req, Resp>> {
    let instance = instances.get(at)?;
    Some(Pick {
        id: instance.id,
        client: instance.client.clone(),
        load: candidates.get(at)?.clone(),
        has_alternative: candidates.len() > 1,
        tracker: None,
    })
}
