//! One planned process (`dynamo node run`): build its replicas callee-first, connect each
//! output port with the transport of each link in the plan, serve every input port on
//! the process's Unix socket (and on NATS where a link reaches it over NATS, and on a TCP
//! listener where a `tcp` KV link does: [`crate::kv_tcp`]), and say when it is ready.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dynamo_graph::kinds::EdgeKind;
use dynamo_graph::plan::{Plan, PlannedReplica, PortRef, ReplicaId, Transport};
use dynamo_mocker::{KvImportService, PrefillService};
use dynamo_protocol::{
    ChatRequest, KvStreamItem, KvSubscribe, KvTransfer, KvTransferAck, PrefillRequest,
    PrefillResult, TextDelta, TokenDelta, TokenRequest,
};
use dynamo_runtime::edge_metrics::{EdgeLabels, EdgeRegistry};
use dynamo_runtime::transport::in_process::InProcessClient;
use dynamo_runtime::transport::socket_client::{SocketClient, SocketClientConfig};
use dynamo_runtime::transport::socket_server::SocketServer;
use dynamo_runtime::{InstanceSet, Message, RequestContext, ResponseStream, Service};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::endpoints::{endpoint, instance_id, socket_path, METRICS_ENDPOINT};
use crate::kv_tcp::{self, KvTcpError, KvTcpSide};
use crate::metrics::{MetricsHub, MetricsService};
use crate::nats::{NatsSetupError, NatsSide};
use crate::nodes::{self, BuildError};
use crate::{HTTP_LINE, READY_LINE};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("the plan has no process `{0}`")]
    UnknownProcess(String),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("edge {edge}: transport `{transport}` is not available in this build yet ({issue})")]
    Transport {
        edge: String,
        transport: &'static str,
        issue: &'static str,
    },
    #[error(transparent)]
    Nats(#[from] NatsSetupError),
    #[error(transparent)]
    KvTcp(#[from] KvTcpError),
    #[error("edge {edge}: no local service at `{endpoint}` (the plan and the process disagree)")]
    MissingLocal { edge: String, endpoint: String },
    #[error("socket {path}: {message}")]
    Socket { path: PathBuf, message: String },
    #[error("frontend {node}: cannot listen on {addr}: {source}")]
    Listen {
        node: String,
        addr: String,
        source: std::io::Error,
    },
}

/// The input services built so far in this process, by endpoint.
struct Local<Req, Resp> {
    services: HashMap<String, Arc<dyn Service<Req, Resp>>>,
}

impl<Req, Resp> Default for Local<Req, Resp> {
    fn default() -> Self {
        Local {
            services: HashMap::new(),
        }
    }
}

struct Ctx<'p> {
    plan: &'p Plan,
    run_dir: &'p Path,
    /// The machine this process runs on.
    machine: &'p str,
    clients: BTreeMap<String, SocketClient>,
    /// Present when a link of this process is on NATS.
    nats: Option<NatsSide>,
    /// Counters of every edge this process calls through.
    edges: Arc<EdgeRegistry>,
}

impl Ctx<'_> {
    fn client(&mut self, process: &str) -> SocketClient {
        let path = socket_path(self.run_dir, process);
        self.clients
            .entry(process.to_string())
            .or_insert_with(|| SocketClient::lazy(path, SocketClientConfig::default()))
            .clone()
    }

    /// A client for `port` of replica `target`, reached by `transport`: the local service
    /// for in-process links, the target process's socket for socket links, the target
    /// replica's own subject for NATS links.
    fn link_client<Req: Message, Resp: Message>(
        &mut self,
        target: &ReplicaId,
        port: &str,
        transport: Transport,
        edge: String,
        local: &Local<Req, Resp>,
    ) -> Result<Arc<dyn Service<Req, Resp>>, ProcessError> {
        let ep = endpoint(target, port);
        match transport {
            Transport::InProcess => {
                let svc = local
                    .services
                    .get(&ep)
                    .cloned()
                    .ok_or(ProcessError::MissingLocal { edge, endpoint: ep })?;
                Ok(InProcessClient::new(svc).into_service())
            }
            // A shared-memory or CUDA IPC link's messages go over the local socket and carry
            // only block ids; the bytes are read from the sender's mapped (or opened GPU)
            // pool (the prefill service is told which instances these are).
            Transport::Socket | Transport::Shm | Transport::CudaIpc => {
                let process = self
                    .plan
                    .replica(target)
                    .map(|r| r.process.clone())
                    .unwrap_or_default();
                Ok(self.client(&process).endpoint::<Req, Resp>(&ep))
            }
            Transport::Nats => match &self.nats {
                Some(nats) => Ok(nats.client::<Req, Resp>(target, port)),
                None => Err(NatsSetupError::NoUrl { edge }.into()),
            },
            // Validation lets `tcp` carry KV blocks only, so `Req` is `KvTransfer` here.
            Transport::Tcp => {
                let kv = kv_tcp::client(
                    self.plan,
                    self.run_dir,
                    self.machine,
                    target,
                    port,
                    edge.clone(),
                )?;
                let any: Box<dyn std::any::Any> = Box::new(kv);
                match any.downcast::<Arc<dyn Service<Req, Resp>>>() {
                    Ok(client) => Ok(*client),
                    Err(_) => Err(ProcessError::Transport {
                        edge,
                        transport: "tcp",
                        issue: "tcp links carry KV blocks only",
                    }),
                }
            }
        }
    }

    /// `client` (of edge `from -> to`, by `transport`), counted on the edge's metrics
    /// for the replica that holds it.
    fn metered<Req: Message, Resp: Message>(
        &self,
        client: Arc<dyn Service<Req, Resp>>,
        (from, to): (&PortRef, &PortRef),
        transport: Transport,
        replica: u32,
    ) -> Arc<dyn Service<Req, Resp>> {
        let labels = EdgeLabels {
            from: from.to_string(),
            to: to.to_string(),
            transport: transport.as_str().to_string(),
            replica,
            serialises: transport != Transport::InProcess,
        };
        self.edges.meter(labels, client)
    }

    /// Also serve `port` of `replica` on NATS, when a link of the plan reaches it there.
    fn serve_nats<Req: Message, Resp: Message>(
        &mut self,
        replica: &ReplicaId,
        port: &str,
        service: &Arc<dyn Service<Req, Resp>>,
    ) -> Result<(), ProcessError> {
        match self.nats.as_mut() {
            Some(nats) => nats
                .serve(replica, port, service)
                .map_err(|e| NatsSetupError::from(e).into()),
            None => Ok(()),
        }
    }

    /// The instances behind `replica`'s output `port`, one per link of every call edge
    /// leaving it, each reached by the link's transport.
    fn outputs<Req: Message, Resp: Message>(
        &mut self,
        replica: &PlannedReplica,
        port: &str,
        local: &Local<Req, Resp>,
    ) -> Result<Arc<InstanceSet<Req, Resp>>, ProcessError> {
        let set = InstanceSet::new(format!("{}.{port}", replica.id.node));
        let plan = self.plan;
        // Links over NATS, by target port: routed to only while registered (with etcd).
        let mut over_nats: BTreeMap<(String, String), Vec<_>> = BTreeMap::new();
        for edge in plan.edges.iter().filter(|e| {
            e.kind == EdgeKind::Call && e.from.node == replica.id.node && e.from.port == port
        }) {
            for link in edge.links.iter().filter(|l| l.from == replica.id.index) {
                let target = ReplicaId {
                    node: edge.to.node.clone(),
                    index: link.to,
                };
                let client = self.link_client(
                    &target,
                    &edge.to.port,
                    link.transport,
                    format!("{} -> {}", edge.from, edge.to),
                    local,
                )?;
                let client =
                    self.metered(client, (&edge.from, &edge.to), link.transport, link.from);
                if link.transport == Transport::Nats {
                    (over_nats.entry((edge.to.node.clone(), edge.to.port.clone())))
                        .or_default()
                        .push((instance_id(&target), client.clone()));
                }
                set.add(instance_id(&target), client);
            }
        }
        let set = Arc::new(set);
        if let Some(nats) = self.nats.as_mut() {
            for ((node, port), planned) in over_nats {
                nats.follow(&set, &node, &port, planned);
            }
        }
        Ok(set)
    }

    /// The producers feeding `replica`'s feedback input `port` (a router's `events`): one
    /// client per link, reaching the producer's port of the same name, by the link's
    /// transport. The consumer subscribes; the producer streams.
    fn feedback_sources<Req: Message, Resp: Message>(
        &mut self,
        replica: &PlannedReplica,
        port: &str,
        local: &Local<Req, Resp>,
    ) -> Result<Vec<Source<Req, Resp>>, ProcessError> {
        let plan = self.plan;
        let mut out = Vec::new();
        for edge in plan.edges.iter().filter(|e| {
            e.kind == EdgeKind::Feedback && e.to.node == replica.id.node && e.to.port == port
        }) {
            for link in edge.links.iter().filter(|l| l.to == replica.id.index) {
                let source = ReplicaId {
                    node: edge.from.node.clone(),
                    index: link.from,
                };
                let client = self.link_client(
                    &source,
                    &edge.from.port,
                    link.transport,
                    format!("{} ~> {}", edge.from, edge.to),
                    local,
                )?;
                let client = self.metered(client, (&edge.from, &edge.to), link.transport, link.to);
                out.push((instance_id(&source), client));
            }
        }
        Ok(out)
    }
}

/// A subscription port whose streams end when the process starts stopping: a stream of
/// KV events never finishes on its own, and draining must not wait for it (over NATS no
/// connection closes to end it, and the subscriber resubscribes anyway).
struct UntilShutdown<Req, Resp> {
    inner: Arc<dyn Service<Req, Resp>>,
    shutdown: CancellationToken,
}

impl<Req: Message, Resp: Message> Service<Req, Resp> for UntilShutdown<Req, Resp> {
    fn call(&self, req: Req, ctx: RequestContext) -> ResponseStream<Resp> {
        let stop = self.shutdown.clone().cancelled_owned();
        Box::pin(self.inner.call(req, ctx).take_until(stop))
    }
}

/// A producer on a feedback edge: its instance id and the client that subscribes to it.
type Source<Req, Resp> = (u64, Arc<dyn Service<Req, Resp>>);

/// The instance ids `port` of `replica` reaches over links of `transport`.
fn link_targets(
    plan: &Plan,
    replica: &PlannedReplica,
    port: &str,
    transport: Transport,
) -> BTreeSet<u64> {
    plan.edges
        .iter()
        .filter(|e| e.from.node == replica.id.node && e.from.port == port)
        .flat_map(|e| {
            e.links
                .iter()
                .filter(|l| l.from == replica.id.index && l.transport == transport)
                .map(|l| {
                    instance_id(&ReplicaId {
                        node: e.to.node.clone(),
                        index: l.to,
                    })
                })
        })
        .collect()
}

/// A router whose requests go through `prefill` and `decode` outputs.
fn routes_disaggregated(plan: &Plan, router: &str) -> bool {
    plan.edges
        .iter()
        .any(|e| e.kind == EdgeKind::Call && e.from.node == router && e.from.port == "decode")
}

/// The block size of the engines a router's `out` port reaches (validation made them agree).
fn worker_block_size(plan: &Plan, router: &str) -> Option<usize> {
    plan.edges
        .iter()
        .filter(|e| e.kind == EdgeKind::Call && e.from.node == router)
        .filter_map(|e| plan.node(&e.to.node))
        .find_map(|n| n.u64("block_size"))
        .and_then(|b| usize::try_from(b).ok())
}

/// Node names in an order where every callee comes before its callers.
fn callee_first(plan: &Plan) -> Vec<String> {
    let index: HashMap<&str, usize> = plan
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut out_deg = vec![0usize; plan.nodes.len()];
    let mut callers: Vec<Vec<usize>> = vec![Vec::new(); plan.nodes.len()];
    for e in plan.edges.iter().filter(|e| e.kind == EdgeKind::Call) {
        if let (Some(&f), Some(&t)) = (
            index.get(e.from.node.as_str()),
            index.get(e.to.node.as_str()),
        ) {
            out_deg[f] += 1;
            callers[t].push(f);
        }
    }
    let mut queue: VecDeque<usize> = (0..plan.nodes.len()).filter(|&i| out_deg[i] == 0).collect();
    let mut order = Vec::with_capacity(plan.nodes.len());
    while let Some(n) = queue.pop_front() {
        order.push(plan.nodes[n].name.clone());
        for &c in &callers[n] {
            out_deg[c] -= 1;
            if out_deg[c] == 0 {
                queue.push_back(c);
            }
        }
    }
    order
}

/// Say something to the controller on stdout (it reads these lines).
fn announce(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Run `process` of `plan` until `shutdown` is cancelled.
pub async fn run(
    plan: Plan,
    process: &str,
    run_dir: &Path,
    shutdown: CancellationToken,
) -> Result<(), ProcessError> {
    let me = plan
        .process(process)
        .ok_or_else(|| ProcessError::UnknownProcess(process.to_string()))?
        .clone();
    let sock = socket_path(run_dir, process);
    let mut server = SocketServer::bind(&sock).map_err(|e| ProcessError::Socket {
        path: sock.clone(),
        message: e.to_string(),
    })?;
    let hub = MetricsHub::new(&plan, process, run_dir);
    let mut kv_tcp = KvTcpSide::open(&plan, &me, run_dir)?;
    let mut ctx = Ctx {
        plan: &plan,
        run_dir,
        machine: &me.machine,
        clients: BTreeMap::new(),
        nats: NatsSide::open(&plan, &me.name, &me.replicas).await?,
        edges: hub.edges(),
    };
    let mut chat: Local<ChatRequest, TextDelta> = Local::default();
    let mut tokens: Local<TokenRequest, TokenDelta> = Local::default();
    let mut kv_events: Local<KvSubscribe, KvStreamItem> = Local::default();
    let mut kv_in: Local<KvTransfer, KvTransferAck> = Local::default();
    let mut prefill_in: Local<PrefillRequest, PrefillResult> = Local::default();
    let mut frontends = Vec::new();
    let mut tasks_before_ready = Vec::new();
    let order = callee_first(&plan);
    let mine: Vec<&PlannedReplica> = order
        .iter()
        .flat_map(|n| me.replicas.iter().filter(move |r| &r.node == n))
        .filter_map(|id| plan.replica(id))
        .collect();
    let register_err =
        |e: dynamo_runtime::transport::socket_server::ServerError| ProcessError::Socket {
            path: sock.clone(),
            message: e.to_string(),
        };
    for replica in mine {
        let Some(node) = plan.node(&replica.id.node) else {
            continue;
        };
        match node.kind.as_str() {
            "worker" | "prefill" | "decode" => {
                let model = nodes::model_of(node, &plan.models)?;
                let built = nodes::engine(node, replica, nodes::model_path(node, model)?).await?;
                let svc = built.svc.clone();
                let events: Arc<dyn Service<KvSubscribe, KvStreamItem>> = Arc::new(UntilShutdown {
                    inner: built.events.clone(),
                    shutdown: shutdown.clone(),
                });
                let events_ep = endpoint(&replica.id, "events");
                server
                    .register(&events_ep, events.clone())
                    .map_err(register_err)?;
                ctx.serve_nats(&replica.id, "events", &events)?;
                kv_events.services.insert(events_ep, events);
                let ep = endpoint(&replica.id, "in");
                if node.kind == "prefill" {
                    // Its `kv` output reaches the decode workers, built before it.
                    let kv_out = ctx.outputs(replica, "kv", &kv_in)?;
                    let engine = built.engine_for(node)?;
                    let cuda = link_targets(&plan, replica, "kv", Transport::CudaIpc);
                    if !cuda.is_empty() && engine.gpu_pool().is_none() {
                        return Err(ProcessError::Transport {
                            edge: format!("{}.kv", replica.id.node),
                            transport: Transport::CudaIpc.as_str(),
                            issue: "only the mocker keeps its KV cache on a GPU; the model engines have no CUDA backend yet",
                        });
                    }
                    let prefill: Arc<dyn Service<PrefillRequest, PrefillResult>> = Arc::new(
                        PrefillService::new(engine, kv_out)
                            .with_shm_instances(link_targets(&plan, replica, "kv", Transport::Shm))
                            .with_tcp_instances(link_targets(&plan, replica, "kv", Transport::Tcp))
                            .with_cuda_instances(cuda),
                    );
                    server
                        .register(&ep, prefill.clone())
                        .map_err(register_err)?;
                    ctx.serve_nats(&replica.id, "in", &prefill)?;
                    prefill_in.services.insert(ep, prefill);
                } else {
                    if node.kind == "decode" {
                        let import: Arc<dyn Service<KvTransfer, KvTransferAck>> =
                            Arc::new(KvImportService::new(built.engine_for(node)?));
                        let kv_ep = endpoint(&replica.id, "kv");
                        server
                            .register(&kv_ep, import.clone())
                            .map_err(register_err)?;
                        kv_tcp
                            .serve(&replica.id, "kv", &import)
                            .map_err(register_err)?;
                        kv_in.services.insert(kv_ep, import);
                    }
                    server.register(&ep, svc.clone()).map_err(register_err)?;
                    ctx.serve_nats(&replica.id, "in", &svc)?;
                    tokens.services.insert(ep, svc);
                }
                if let Some(engine) = built.in_process {
                    hub.add_engine(replica.id.clone(), engine);
                }
            }
            "router" => {
                let block_size = worker_block_size(&plan, &replica.id.node);
                // A KV router indexes the workers it chooses by overlap: the prefill workers
                // when it disaggregates, else the workers behind `out`.
                let (svc, kv, indexed_port) = if routes_disaggregated(&plan, &replica.id.node) {
                    let decode = ctx.outputs(replica, "decode", &tokens)?;
                    let prefill = ctx.outputs(replica, "prefill", &prefill_in)?;
                    let (svc, kv) =
                        nodes::disagg_router(node, block_size, prefill, decode, &hub, &replica.id)?;
                    (svc, kv, "prefill")
                } else {
                    let workers = ctx.outputs(replica, "out", &tokens)?;
                    let (svc, kv) = nodes::router(node, block_size, workers)?;
                    (svc, kv, "out")
                };
                if let Some(kv) = kv.filter(|k| k.mode() == dynamo_router::KvMode::Events) {
                    let indexed: Vec<&str> = plan
                        .edges
                        .iter()
                        .filter(|e| e.from.node == replica.id.node && e.from.port == indexed_port)
                        .map(|e| e.to.node.as_str())
                        .collect();
                    for (worker, source) in ctx.feedback_sources(replica, "events", &kv_events)? {
                        let wanted = plan.replicas.iter().any(|r| {
                            instance_id(&r.id) == worker && indexed.contains(&r.id.node.as_str())
                        });
                        if wanted {
                            tasks_before_ready.push(tokio::spawn(crate::events::follow(
                                kv.clone(),
                                worker,
                                source,
                                shutdown.clone(),
                            )));
                        }
                    }
                    hub.add_router(replica.id.clone(), kv);
                }
                let ep = endpoint(&replica.id, "in");
                server.register(&ep, svc.clone()).map_err(register_err)?;
                ctx.serve_nats(&replica.id, "in", &svc)?;
                tokens.services.insert(ep, svc);
            }
            "preprocessor" => {
                let model = nodes::model_of(node, &plan.models)?;
                let downstream: Arc<dyn Service<TokenRequest, TokenDelta>> =
                    ctx.outputs(replica, "out", &tokens)?;
                let svc = nodes::preprocessor(node, model, downstream)?;
                let ep = endpoint(&replica.id, "in");
                server.register(&ep, svc.clone()).map_err(register_err)?;
                ctx.serve_nats(&replica.id, "in", &svc)?;
                chat.services.insert(ep, svc);
            }
            "frontend" => {
                let downstream: Arc<dyn Service<ChatRequest, TextDelta>> =
                    ctx.outputs(replica, "out", &chat)?;
                let served = served_models(&plan, replica);
                let fe = nodes::frontend(node, served, downstream)?;
                let host = node.str("host").unwrap_or("127.0.0.1").to_string();
                let port = node.u64("port").unwrap_or(8000);
                let addr = format!("{host}:{port}");
                let listener = tokio::net::TcpListener::bind(&addr)
                    .await
                    .map_err(|source| ProcessError::Listen {
                        node: node.name.clone(),
                        addr: addr.clone(),
                        source,
                    })?;
                hub.attach(&fe);
                frontends.push((listener, fe, replica.id.clone()));
            }
            other => {
                return Err(BuildError::NotYet {
                    node: node.name.clone(),
                    what: format!("node kind `{other}`"),
                    issue: "a later issue",
                }
                .into())
            }
        }
    }
    let metrics: Arc<dyn Service<(), String>> = Arc::new(MetricsService::new(hub.clone()));
    server
        .register::<(), String>(METRICS_ENDPOINT, metrics.clone())
        .map_err(register_err)?;
    if let Some(nats) = ctx.nats.as_mut() {
        nats.serve_metrics(&metrics).map_err(NatsSetupError::from)?;
    }
    let mut tasks = tasks_before_ready;
    if let Some(nats) = ctx.nats.as_mut() {
        tasks.extend(nats.start(&shutdown).await.map_err(NatsSetupError::from)?);
    }
    tasks.push(tokio::spawn(server.serve(shutdown.clone())));
    tasks.extend(kv_tcp.start(&shutdown).await);
    if !frontends.is_empty() {
        if let Some(nats) = ctx.nats.as_ref() {
            hub.add_remote_peers(nats.remote_metrics(&plan, &me.machine));
        }
        tasks.push(tokio::spawn(hub.clone().poll_peers(shutdown.clone())));
    }
    for (listener, fe, id) in frontends {
        if let Ok(addr) = listener.local_addr() {
            announce(&format!("{HTTP_LINE} {id} http://{addr}"));
        }
        let token = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = dynamo_frontend::serve(listener, fe, token).await {
                tracing::error!(error = %e, "frontend stopped");
            }
        }));
    }
    announce(READY_LINE);
    shutdown.cancelled().await;
    for t in tasks {
        let _ = t.await;
    }
    hub.shutdown().await;
    if let Some(nats) = ctx.nats.as_mut() {
        nats.close().await;
    }
    kv_tcp.close().await;
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

/// The model names a frontend serves: those of the preprocessors it calls.
fn served_models(plan: &Plan, replica: &PlannedReplica) -> Vec<String> {
    let mut names: Vec<String> = plan
        .edges
        .iter()
        .filter(|e| e.kind == EdgeKind::Call && e.from.node == replica.id.node)
        .filter_map(|e| plan.node(&e.to.node))
        .filter_map(|n| n.str("model"))
        .filter_map(|m| plan.model(m))
        .map(|m| m.served_name.clone())
        .collect();
    names.sort();
    names.dedup();
    names
}
