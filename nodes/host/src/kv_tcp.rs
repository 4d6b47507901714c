//! KV blocks across machines: the plan's `tcp` links (a `prefill.kv → decode.kv` edge
//! whose two replicas landed on different machines).
//!
//! The decode side serves its `kv` port on a TCP listener of its own, at its machine's
//! address and a port the kernel picks, and registers that address in etcd under the
//! port's instance key (leased like every instance: it disappears with the process or
//! its machine). The prefill side looks the address up at every (re)connect, so a decode
//! worker that restarted, or was re-placed on another machine, is found again. Each
//! `KvTransfer` is a bulk call (`dynamo_runtime::transport::bulk`) on a connection of its
//! own per peer: the rest of the chunk is encoded, its block bytes follow raw, written
//! from the chunk's buffer and read straight into the buffer the decode worker imports
//! from (no copy into or out of a message). Never through NATS, never queued behind
//! control traffic, with TCP's flow control and the prefill worker's window of chunks in
//! flight as the backpressure.
//!
//! Without etcd (one machine, `transport = "tcp"` asked for explicitly) the address goes
//! into a file in the run directory instead.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dynamo_graph::kinds::EdgeKind;
use dynamo_graph::plan::{Plan, PlannedProcess, ReplicaId, Transport};
use dynamo_protocol::{KvTransfer, KvTransferAck};
use dynamo_runtime::discovery::{instance_key, EtcdClient, Registration, RegistrationConfig};
use dynamo_runtime::transport::bulk::{Bulk, BulkClient, BulkClientConfig, BulkField, BulkServer};
use dynamo_runtime::transport::nats::EndpointAddress;
use dynamo_runtime::transport::socket_client::Resolve;
use dynamo_runtime::transport::socket_server::ServerError;
use dynamo_runtime::{ServeError, Service};
use futures::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::endpoints::{endpoint, instance_id};
use crate::nats::{namespace, CONNECT_TIMEOUT, INSTANCE_TTL};

/// What can stop a process from serving or reaching a `tcp` link.
#[derive(Debug, thiserror::Error)]
pub enum KvTcpError {
    #[error("the KV listener of process `{process}`: {source}")]
    Listen {
        process: String,
        source: ServerError,
    },
    #[error("edge {edge} goes over tcp between machines `{from}` and `{to}`: the decode side's address is found through etcd, so run `dynamo graph up --etcd URL` (with an agent on each machine)")]
    NoEtcd {
        edge: String,
        from: String,
        to: String,
    },
    #[error("etcd `{url}`: {message}")]
    Etcd { url: String, message: String },
}

/// How long a starting process waits for etcd to take its KV listener's address.
const PUBLISH_WAIT: Duration = Duration::from_secs(5);

/// A chunk's block bytes travel raw after the rest of it: from where the prefill worker
/// keeps them when it sends them in place, else from the chunk's payload.
pub const KV_BULK: BulkField<KvTransfer> = BulkField {
    take: |t| {
        if t.in_place.is_empty() {
            Bulk::Owned(std::mem::take(&mut t.payload))
        } else {
            Bulk::Parts(std::mem::take(&mut t.in_place))
        }
    },
    put: |t, bytes| t.payload = bytes,
};

/// This process's side of the `tcp` links that reach its replicas: one listener for all.
pub struct KvTcpSide {
    server: Option<BulkServer<KvTransfer, KvTransferAck>>,
    /// `(replica, port)` some `tcp` link reaches in this process.
    served: BTreeSet<(ReplicaId, String)>,
    namespace: String,
    graph: String,
    etcd: Option<EtcdClient>,
    run_dir: PathBuf,
    registrations: Vec<Registration>,
    files: Vec<PathBuf>,
}

impl KvTcpSide {
    /// Binds a listener at this process's machine address when a `tcp` link reaches one
    /// of its replicas; otherwise serves nothing.
    pub fn open(plan: &Plan, me: &PlannedProcess, run_dir: &Path) -> Result<Self, KvTcpError> {
        let mine: BTreeSet<&ReplicaId> = me.replicas.iter().collect();
        let served: BTreeSet<(ReplicaId, String)> = plan
            .edges
            .iter()
            .filter(|e| e.kind == EdgeKind::Call)
            .flat_map(|e| {
                e.links
                    .iter()
                    .filter(|l| l.transport == Transport::Tcp)
                    .map(move |l| {
                        let to = ReplicaId {
                            node: e.to.node.clone(),
                            index: l.to,
                        };
                        (to, e.to.port.clone())
                    })
            })
            .filter(|(r, _)| mine.contains(r))
            .collect();
        let etcd = plan.etcd.as_deref().map(etcd_client).transpose()?;
        let server = if served.is_empty() {
            None
        } else {
            let host = plan
                .machines
                .iter()
                .find(|m| m.name == me.machine)
                .map_or("127.0.0.1", |m| m.address.as_str());
            let addr = if host.contains(':') {
                format!("[{host}]:0")
            } else {
                format!("{host}:0")
            };
            Some(
                BulkServer::bind(&addr, KV_BULK).map_err(|source| KvTcpError::Listen {
                    process: me.name.clone(),
                    source,
                })?,
            )
        };
        Ok(KvTcpSide {
            server,
            served,
            namespace: namespace(plan).to_string(),
            graph: plan.graph.clone(),
            etcd,
            run_dir: run_dir.to_path_buf(),
            registrations: Vec::new(),
            files: Vec::new(),
        })
    }

    /// Serves `port` of `replica` on the listener too, when a `tcp` link reaches it.
    pub fn serve(
        &mut self,
        replica: &ReplicaId,
        port: &str,
        service: &Arc<dyn Service<KvTransfer, KvTransferAck>>,
    ) -> Result<(), ServerError> {
        match &mut self.server {
            Some(server) if self.served.contains(&(replica.clone(), port.to_string())) => {
                server.register(&endpoint(replica, port), service.clone())
            }
            _ => Ok(()),
        }
    }

    /// Starts serving until `shutdown` and publishes the listener's address for every
    /// served port (etcd, else a file in the run directory), waiting a little for etcd to
    /// take it so that the first hand-off finds it.
    pub async fn start(&mut self, shutdown: &CancellationToken) -> Option<JoinHandle<()>> {
        let server = self.server.take()?;
        let addr = server.local_addr().to_string();
        let task = tokio::spawn(server.serve(shutdown.clone()));
        for (replica, port) in &self.served {
            match &self.etcd {
                Some(etcd) => {
                    let address =
                        EndpointAddress::new(&self.namespace, &self.graph, &replica.node, port);
                    self.registrations.push(Registration::start(
                        etcd.clone(),
                        instance_key(&address, instance_id(replica)),
                        addr.clone().into_bytes(),
                        RegistrationConfig {
                            ttl: INSTANCE_TTL,
                            ..RegistrationConfig::default()
                        },
                    ));
                }
                None => {
                    let file = address_file(&self.run_dir, replica, port);
                    match std::fs::write(&file, &addr) {
                        Ok(()) => self.files.push(file),
                        Err(e) => {
                            tracing::error!(file = %file.display(), error = %e, "cannot publish the KV listener's address")
                        }
                    }
                }
            }
        }
        for r in &self.registrations {
            if !r.wait_registered(PUBLISH_WAIT).await {
                tracing::warn!(%addr, "etcd has not taken the KV listener's address yet; prefill workers find it once it does");
            }
        }
        tracing::info!(%addr, ports = self.served.len(), "KV blocks served over TCP");
        Some(task)
    }

    /// Withdraws the published addresses.
    pub async fn close(&mut self) {
        for r in std::mem::take(&mut self.registrations) {
            let _ = tokio::time::timeout(CONNECT_TIMEOUT, r.deregister()).await;
        }
        for f in std::mem::take(&mut self.files) {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn etcd_client(url: &str) -> Result<EtcdClient, KvTcpError> {
    EtcdClient::new(url, CONNECT_TIMEOUT).map_err(|e| KvTcpError::Etcd {
        url: url.to_string(),
        message: e.to_string(),
    })
}

/// Where a served port's address is published without etcd.
fn address_file(run_dir: &Path, replica: &ReplicaId, port: &str) -> PathBuf {
    run_dir.join(format!("{:x}-{port}.tcp", instance_id(replica)))
}

/// A client for `port` of `target` over `tcp`: it finds the target's listener (etcd, or
/// the run directory on one machine) at every (re)connect.
pub fn client(
    plan: &Plan,
    run_dir: &Path,
    caller_machine: &str,
    target: &ReplicaId,
    port: &str,
    edge: String,
) -> Result<Arc<dyn Service<KvTransfer, KvTransferAck>>, KvTcpError> {
    let name = format!("{target}.{port} (tcp)");
    let resolve: Resolve = match plan.etcd.as_deref() {
        Some(url) => {
            let etcd = etcd_client(url)?;
            let address = EndpointAddress::new(namespace(plan), &plan.graph, &target.node, port);
            let key = instance_key(&address, instance_id(target));
            let who = name.clone();
            Arc::new(move || {
                let (etcd, key, who) = (etcd.clone(), key.clone(), who.clone());
                async move { lookup(&etcd, &key, &who).await }.boxed()
            })
        }
        None => {
            let to_machine = plan
                .replica(target)
                .map(|r| r.machine.clone())
                .unwrap_or_default();
            if to_machine != caller_machine {
                return Err(KvTcpError::NoEtcd {
                    edge,
                    from: caller_machine.to_string(),
                    to: to_machine,
                });
            }
            let file = address_file(run_dir, target, port);
            let who = name.clone();
            Arc::new(move || {
                let read = std::fs::read_to_string(&file).map_err(|e| {
                    ServeError::unavailable(format!(
                        "{who} has not published its KV address ({}: {e})",
                        file.display()
                    ))
                });
                futures::future::ready(read.map(|a| a.trim().to_string())).boxed()
            })
        }
    };
    let client = BulkClient::new(&name, resolve, KV_BULK, BulkClientConfig::default());
    Ok(client.endpoint(&endpoint(target, port)))
}

/// The address `key` holds in etcd.
async fn lookup(etcd: &EtcdClient, key: &str, who: &str) -> Result<String, ServeError> {
    let (kvs, _) = etcd
        .range_prefix(key)
        .await
        .map_err(|e| ServeError::unavailable(format!("finding {who}'s KV address in etcd: {e}")))?;
    kvs.into_iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| String::from_utf8(kv.value).ok())
        .filter(|a| !a.is_empty())
        .ok_or_else(|| {
            ServeError::unavailable(format!(
                "{who} has no KV address in etcd (not started yet, or its machine is gone)"
            ))
        })
}
