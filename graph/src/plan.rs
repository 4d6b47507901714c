//! The `Plan`: which replica runs where, in which process, with which GPUs, and which
//! transport carries each edge. `graph plan` prints it and `graph up` executes it: they
//! are the same value, and it serialises to JSON so every process gets it verbatim.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::kinds::{EdgeKind, Memory};
use crate::spec::{Admin, ModelSource, RestartPolicy, Telemetry, TransportChoice};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    InProcess,
    Socket,
    Nats,
    Shm,
    CudaIpc,
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::InProcess => "in-process",
            Transport::Socket => "socket",
            Transport::Nats => "nats",
            Transport::Shm => "shm",
            Transport::CudaIpc => "cuda-ipc",
            Transport::Tcp => "tcp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedMachine {
    pub name: String,
    pub address: String,
    pub gpus: u32,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedModel {
    pub name: String,
    pub served_name: String,
    pub source: Option<ModelSource>,
    pub system_prompt: Option<String>,
    pub chat_template: Option<String>,
    pub context_length: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedNode {
    pub name: String,
    pub kind: String,
    pub replicas: u32,
    pub gpus: u32,
    pub restart: RestartPolicy,
    /// Every setting of the kind, defaults filled in.
    pub settings: BTreeMap<String, serde_json::Value>,
    /// The file's placement constraints, for re-placing replicas of a lost machine.
    #[serde(default)]
    pub placement: PlannedPlacement,
}

/// A node's `placement`, as written in the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedPlacement {
    /// Pinned to this machine.
    pub machine: Option<String>,
    /// Only machines with all these labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// On the machine of this node's replicas.
    pub colocate_with: Option<String>,
}

impl PlannedPlacement {
    /// Whether `machine` may hold a replica of the node, its pin and labels considered.
    pub fn allows(&self, machine: &PlannedMachine) -> bool {
        self.machine.as_ref().is_none_or(|m| *m == machine.name)
            && (self.labels.iter()).all(|(k, v)| machine.labels.get(k) == Some(v))
    }
}

impl PlannedNode {
    pub fn str(&self, key: &str) -> Option<&str> {
        self.settings.get(key).and_then(|v| v.as_str())
    }
    pub fn u64(&self, key: &str) -> Option<u64> {
        self.settings.get(key).and_then(|v| v.as_u64())
    }
    /// A number; `"inf"` (how the plan writes an infinite float) is infinity.
    pub fn f64(&self, key: &str) -> Option<f64> {
        match self.settings.get(key)? {
            serde_json::Value::String(s) => s.parse().ok(),
            v => v.as_f64(),
        }
    }
    pub fn bool(&self, key: &str) -> Option<bool> {
        self.settings.get(key).and_then(|v| v.as_bool())
    }
}

/// `node/index`, the name of one replica everywhere (logs, metrics, plans).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaId {
    pub node: String,
    pub index: u32,
}

impl std::fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.node, self.index)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedReplica {
    pub id: ReplicaId,
    pub machine: String,
    pub gpus: Vec<u32>,
    pub process: String,
    /// Why it landed there, for people.
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedProcess {
    pub name: String,
    pub machine: String,
    pub replicas: Vec<ReplicaId>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRef {
    pub node: String,
    pub port: String,
}

impl std::fmt::Display for PortRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.node, self.port)
    }
}

/// One replica-to-replica connection of an edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub from: u32,
    pub to: u32,
    pub transport: Transport,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedEdge {
    pub from: PortRef,
    pub to: PortRef,
    pub kind: EdgeKind,
    pub schema: String,
    pub memory: Memory,
    pub requested: TransportChoice,
    pub queue_size: u32,
    pub timeout_ms: Option<u64>,
    pub links: Vec<Link>,
    pub why: String,
}

impl PlannedEdge {
    /// The distinct transports of this edge's links, in a stable order.
    pub fn transports(&self) -> Vec<Transport> {
        let mut t: Vec<Transport> = self.links.iter().map(|l| l.transport).collect();
        t.sort_unstable();
        t.dedup();
        t
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub graph: String,
    pub namespace: String,
    pub nats: Option<String>,
    pub etcd: Option<String>,
    pub machines: Vec<PlannedMachine>,
    pub models: Vec<PlannedModel>,
    pub nodes: Vec<PlannedNode>,
    pub replicas: Vec<PlannedReplica>,
    pub processes: Vec<PlannedProcess>,
    pub edges: Vec<PlannedEdge>,
    /// `[telemetry]`, read by every process when it starts.
    #[serde(default)]
    pub telemetry: Telemetry,
    /// `[admin]`, read by `graph up`.
    #[serde(default)]
    pub admin: Admin,
}

impl Plan {
    pub fn node(&self, name: &str) -> Option<&PlannedNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn model(&self, name: &str) -> Option<&PlannedModel> {
        self.models.iter().find(|m| m.name == name)
    }

    pub fn replica(&self, id: &ReplicaId) -> Option<&PlannedReplica> {
        self.replicas.iter().find(|r| &r.id == id)
    }

    pub fn process(&self, name: &str) -> Option<&PlannedProcess> {
        self.processes.iter().find(|p| p.name == name)
    }

    /// The plan as the tables `dynamo graph plan` prints.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "graph `{}` (namespace `{}`): {} node{}, {} replica{}, {} process{} on {} machine{}",
            self.graph,
            self.namespace,
            self.nodes.len(),
            s(self.nodes.len()),
            self.replicas.len(),
            s(self.replicas.len()),
            self.processes.len(),
            if self.processes.len() == 1 { "" } else { "es" },
            self.machines.len(),
            s(self.machines.len()),
        );
        out.push('\n');
        let rows: Vec<[String; 5]> = self
            .replicas
            .iter()
            .map(|r| {
                [
                    r.id.to_string(),
                    r.machine.clone(),
                    gpu_list(&r.gpus),
                    r.process.clone(),
                    r.why.clone(),
                ]
            })
            .collect();
        table(
            &mut out,
            ["REPLICA", "MACHINE", "GPUS", "PROCESS", "WHY"],
            &rows,
        );
        out.push('\n');
        let rows: Vec<[String; 5]> = self
            .edges
            .iter()
            .map(|e| {
                let kind = match e.kind {
                    EdgeKind::Call => "call",
                    EdgeKind::Feedback => "feedback",
                };
                let transports: Vec<&str> = e.transports().iter().map(|t| t.as_str()).collect();
                [
                    format!("{} -> {}", e.from, e.to),
                    kind.to_string(),
                    e.schema.clone(),
                    transports.join("+"),
                    e.why.clone(),
                ]
            })
            .collect();
        table(
            &mut out,
            ["EDGE", "KIND", "SCHEMA", "TRANSPORT", "WHY"],
            &rows,
        );
        if let Some(endpoint) = &self.telemetry.otlp_endpoint {
            let _ = writeln!(
                out,
                "\ntraces: OTLP/gRPC to {endpoint}, sampling {}",
                self.telemetry.sampling_ratio
            );
        }
        out
    }
}

fn s(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// `-`, `0`, `0,1`, or `2-5` for a contiguous run.
pub fn gpu_list(g: &[u32]) -> String {
    match g {
        [] => "-".into(),
        [one] => one.to_string(),
        [first, .., last] if (*last - *first) as usize + 1 == g.len() => format!("{first}-{last}"),
        _ => g.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
    }
}

fn table<const N: usize>(out: &mut String, head: [&str; N], rows: &[[String; N]]) {
    let mut w: [usize; N] = head.map(str::len);
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |out: &mut String, cells: &[&str]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<width$}  ", width = w[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(out, &head);
    for r in rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        line(out, &cells);
    }
}
