//! The live instances behind an output port. Calls round-robin by default; a router node
//! reads [`InstanceSet::snapshot`] (one atomic load, no lock) and picks an instance itself
//! by load or KV overlap, then calls it with [`InstanceSet::call_instance`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::edge::{error_stream, RequestContext, ResponseStream, Service};
use crate::error::ServeError;

/// Identifies one instance (replica) of a node, e.g. a worker's lease id.
pub type InstanceId = u64;

/// One live instance and the client that reaches it.
pub struct Instance<Req, Resp> {
    pub id: InstanceId,
    pub client: Arc<dyn Service<Req, Resp>>,
}

impl<Req, Resp> Clone for Instance<Req, Resp> {
    fn clone(&self) -> Self {
        Instance {
            id: self.id,
            client: self.client.clone(),
        }
    }
}

/// The instances behind an output port, sorted by id so snapshots are deterministic.
pub struct InstanceSet<Req, Resp> {
    name: String,
    instances: ArcSwap<Vec<Instance<Req, Resp>>>,
    next: AtomicUsize,
}

impl<Req: Send + 'static, Resp: Send + 'static> InstanceSet<Req, Resp> {
    /// `name` is the port or target node, used in error messages.
    pub fn new(name: impl Into<String>) -> Self {
        InstanceSet {
            name: name.into(),
            instances: ArcSwap::from_pointee(Vec::new()),
            next: AtomicUsize::new(0),
        }
    }

    /// Adds an instance, replacing the client of one with the same id.
    pub fn add(&self, id: InstanceId, client: Arc<dyn Service<Req, Resp>>) {
        self.instances.rcu(|current| {
            let mut next: Vec<_> = current.iter().filter(|i| i.id != id).cloned().collect();
            let at = next.partition_point(|i| i.id < id);
            next.insert(
                at,
                Instance {
                    id,
                    client: client.clone(),
                },
            );
            next
        });
    }

    /// Removes an instance; returns whether it was there.
    pub fn remove(&self, id: InstanceId) -> bool {
        let previous = self.instances.rcu(|current| {
            current
                .iter()
                .filter(|i| i.id != id)
                .cloned()
                .collect::<Vec<_>>()
        });
        previous.iter().any(|i| i.id == id)
    }

    /// The instances right now; later adds and removes do not change this value.
    pub fn snapshot(&self) -> Arc<Vec<Instance<Req, Resp>>> {
        self.instances.load_full()
    }

    pub fn ids(&self) -> Vec<InstanceId> {
        self.instances.load().iter().map(|i| i.id).collect()
    }

    pub fn len(&self) -> usize {
        self.instances.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.instances.load().is_empty()
    }

    /// Calls one instance by id; `Unavailable` if it is gone (the caller picks another).
    pub fn call_instance(
        &self,
        id: InstanceId,
        req: Req,
        ctx: RequestContext,
    ) -> ResponseStream<Resp> {
        let found = self
            .instances
            .load()
            .iter()
            .find(|i| i.id == id)
            .map(|i| i.client.clone());
        match found {
            Some(client) => client.call(req, ctx),
            None => error_stream(ServeError::unavailable(format!(
                "instance {id} of `{}` is not live",
                self.name
            ))),
        }
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Service<Req, Resp> for InstanceSet<Req, Resp> {
    /// Round-robin over the live instances.
    fn call(&self, req: Req, ctx: RequestContext) -> ResponseStream<Resp> {
        let client = {
            let instances = self.instances.load();
            if instances.is_empty() {
                return error_stream(ServeError::unavailable(format!(
                    "no live instance of `{}`",
                    self.name
                )));
            }
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            instances[n % instances.len()].client.clone()
        };
        client.call(req, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use futures::StreamExt;

    /// Answers with its own id.
    struct Named(u64);
    impl Service<(), u64> for Named {
        fn call(&self, _: (), _: RequestContext) -> ResponseStream<u64> {
            Box::pin(futures::stream::iter([Ok(self.0)]))
        }
    }

    async fn one(stream: ResponseStream<u64>) -> Result<u64, ServeError> {
        let items: Vec<_> = stream.collect().await;
        assert_eq!(items.len(), 1);
        items
            .into_iter()
            .next()
            .unwrap_or(Err(ServeError::internal("empty")))
    }

    #[tokio::test]
    async fn round_robins_over_live_instances() {
        let set = InstanceSet::<(), u64>::new("decode");
        let err = one(set.call((), RequestContext::new("r"))).await;
        assert_eq!(err.map_err(|e| e.kind), Err(ErrorKind::Unavailable));
        for id in [30, 10, 20] {
            set.add(id, Arc::new(Named(id)));
        }
        assert_eq!(set.ids(), vec![10, 20, 30]);
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(
                one(set.call((), RequestContext::new("r")))
                    .await
                    .unwrap_or(0),
            );
        }
        let mut counts = std::collections::BTreeMap::new();
        for s in &seen {
            *counts.entry(*s).or_insert(0) += 1;
        }
        assert_eq!(
            counts.into_iter().collect::<Vec<_>>(),
            vec![(10, 2), (20, 2), (30, 2)]
        );
    }

    #[tokio::test]
    async fn add_replaces_remove_removes_and_snapshots_are_stable() {
        let set = InstanceSet::<(), u64>::new("decode");
        set.add(1, Arc::new(Named(100)));
        set.add(1, Arc::new(Named(101)));
        assert_eq!(set.len(), 1);
        assert_eq!(
            one(set.call_instance(1, (), RequestContext::new("r"))).await,
            Ok(101)
        );
        let before = set.snapshot();
        assert!(set.remove(1));
        assert!(!set.remove(1));
        assert_eq!(
            before.len(),
            1,
            "a snapshot does not change under the caller"
        );
        assert!(set.is_empty());
        let gone = one(set.call_instance(1, (), RequestContext::new("r"))).await;
        assert_eq!(gone.map_err(|e| e.kind), Err(ErrorKind::Unavailable));
    }
}
