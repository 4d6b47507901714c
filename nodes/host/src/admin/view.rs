//! The graph as placed, as the page draws it: machines, their processes, every node with
//! its replicas (machine, process), and the edges with the transports of their links.

use dynamo_graph::kinds::EdgeKind;
use dynamo_graph::plan::Plan;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GraphView {
    pub graph: String,
    pub machines: Vec<MachineView>,
    pub nodes: Vec<NodeView>,
    pub edges: Vec<EdgeView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineView {
    pub name: String,
    pub processes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    pub name: String,
    pub kind: String,
    pub replicas: Vec<ReplicaView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaView {
    pub index: u32,
    pub machine: String,
    pub process: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EdgeView {
    /// `node.port`.
    pub from: String,
    pub to: String,
    /// `call` or `feedback`.
    pub kind: String,
    pub schema: String,
    /// The transports of its links, sorted.
    pub transports: Vec<String>,
}

impl GraphView {
    pub fn new(plan: &Plan) -> GraphView {
        let machines = plan
            .machines
            .iter()
            .map(|m| MachineView {
                name: m.name.clone(),
                processes: plan
                    .processes
                    .iter()
                    .filter(|p| p.machine == m.name)
                    .map(|p| p.name.clone())
                    .collect(),
            })
            .collect();
        let nodes = plan
            .nodes
            .iter()
            .map(|n| NodeView {
                name: n.name.clone(),
                kind: n.kind.clone(),
                replicas: plan
                    .replicas
                    .iter()
                    .filter(|r| r.id.node == n.name)
                    .map(|r| ReplicaView {
                        index: r.id.index,
                        machine: r.machine.clone(),
                        process: r.process.clone(),
                    })
                    .collect(),
            })
            .collect();
        let edges = plan
            .edges
            .iter()
            .map(|e| {
                let mut transports: Vec<String> = e
                    .links
                    .iter()
                    .map(|l| l.transport.as_str().to_string())
                    .collect();
                transports.sort();
                transports.dedup();
                EdgeView {
                    from: e.from.to_string(),
                    to: e.to.to_string(),
                    kind: match e.kind {
                        EdgeKind::Call => "call",
                        EdgeKind::Feedback => "feedback",
                    }
                    .to_string(),
                    schema: e.schema.clone(),
                    transports,
                }
            })
            .collect();
        GraphView {
            graph: plan.graph.clone(),
            machines,
            nodes,
            edges,
        }
    }
}
