//! Pictures of a graph: DOT, Mermaid, SVG and JSON, all from one [`Drawing`] so they
//! show the same thing, in a stable order. A valid graph is drawn as placed (machines as
//! clusters, replicas grouped per machine); an invalid one is still drawn, with the
//! broken parts marked and missing nodes as placeholders.

pub mod dot;
pub mod json;
pub mod mermaid;
pub mod svg;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::kinds::{self, EdgeKind};
use crate::plan::gpu_list;
use crate::source::Span;
use crate::Checked;

#[derive(Debug, Clone, Serialize)]
pub struct DrawNode {
    /// Unique id in the drawing: the node name, or `node@machine` when split.
    pub id: String,
    pub node: String,
    pub kind: String,
    /// Replica indexes drawn in this box.
    pub replicas: Vec<u32>,
    pub machine: Option<String>,
    pub gpus: String,
    pub broken: bool,
    /// A placeholder for a name an edge uses but no node defines.
    pub missing: bool,
}

impl DrawNode {
    pub fn label(&self) -> String {
        if self.missing {
            return format!("{}\n(missing)", self.node);
        }
        let mut l = format!("{}\n{}", self.node, self.kind);
        if self.replicas.len() > 1 {
            l.push_str(&format!(" ×{}", self.replicas.len()));
        }
        if self.gpus != "-" {
            l.push_str(&format!("\nGPU {}", self.gpus));
        }
        l
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DrawEdge {
    pub from: String,
    pub to: String,
    pub from_port: String,
    pub to_port: String,
    pub kind: EdgeKind,
    pub schema: String,
    pub transport: String,
    pub broken: bool,
}

impl DrawEdge {
    pub fn label(&self) -> String {
        let mut l = format!("{} → {}\n{}", self.from_port, self.to_port, self.schema);
        if !self.transport.is_empty() {
            l.push_str(&format!("\n{}", self.transport));
        }
        l
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Drawing {
    pub graph: String,
    pub valid: bool,
    /// Machines in plan order; empty when the graph is not placed.
    pub machines: Vec<String>,
    pub nodes: Vec<DrawNode>,
    pub edges: Vec<DrawEdge>,
}

fn overlaps(a: Span, b: Span) -> bool {
    a.start < b.end.max(b.start + 1) && b.start < a.end.max(a.start + 1)
}

impl Drawing {
    pub fn new(c: &Checked) -> Drawing {
        let error_spans: Vec<Span> = c
            .diagnostics
            .items
            .iter()
            .filter(|d| d.is_error())
            .filter_map(|d| d.span)
            .collect();
        let is_broken = |spans: &[Span]| {
            spans
                .iter()
                .any(|s| error_spans.iter().any(|e| overlaps(*s, *e)))
        };
        match &c.plan {
            Some(plan) => {
                // One box per (node, machine).
                let mut boxes: BTreeMap<(usize, String), DrawNode> = BTreeMap::new();
                let order: BTreeMap<&str, usize> = plan
                    .nodes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (n.name.as_str(), i))
                    .collect();
                let split: BTreeMap<&str, bool> = plan
                    .nodes
                    .iter()
                    .map(|n| {
                        let mut ms: Vec<&str> = plan
                            .replicas
                            .iter()
                            .filter(|r| r.id.node == n.name)
                            .map(|r| r.machine.as_str())
                            .collect();
                        ms.sort_unstable();
                        ms.dedup();
                        (n.name.as_str(), ms.len() > 1)
                    })
                    .collect();
                for r in &plan.replicas {
                    let i = order.get(r.id.node.as_str()).copied().unwrap_or(usize::MAX);
                    let kind = plan.nodes.get(i).map_or(String::new(), |n| n.kind.clone());
                    let id = if split.get(r.id.node.as_str()).copied().unwrap_or(false) {
                        format!("{}@{}", r.id.node, r.machine)
                    } else {
                        r.id.node.clone()
                    };
                    let b = boxes
                        .entry((i, r.machine.clone()))
                        .or_insert_with(|| DrawNode {
                            id,
                            node: r.id.node.clone(),
                            kind,
                            replicas: Vec::new(),
                            machine: Some(r.machine.clone()),
                            gpus: String::new(),
                            broken: false,
                            missing: false,
                        });
                    b.replicas.push(r.id.index);
                    let mut g: Vec<u32> = Vec::new();
                    g.extend(&r.gpus);
                    if !g.is_empty() {
                        b.gpus = if b.gpus.is_empty() || b.gpus == "-" {
                            gpu_list(&g)
                        } else {
                            format!("{},{}", b.gpus, gpu_list(&g))
                        };
                    } else if b.gpus.is_empty() {
                        b.gpus = "-".into();
                    }
                }
                let nodes: Vec<DrawNode> = boxes.into_values().collect();
                let mut edges = Vec::new();
                for e in &plan.edges {
                    let transports: Vec<&str> = e.transports().iter().map(|t| t.as_str()).collect();
                    let froms: Vec<&DrawNode> =
                        nodes.iter().filter(|n| n.node == e.from.node).collect();
                    let tos: Vec<&DrawNode> =
                        nodes.iter().filter(|n| n.node == e.to.node).collect();
                    for a in &froms {
                        for b in &tos {
                            edges.push(DrawEdge {
                                from: a.id.clone(),
                                to: b.id.clone(),
                                from_port: e.from.port.clone(),
                                to_port: e.to.port.clone(),
                                kind: e.kind,
                                schema: e.schema.clone(),
                                transport: transports.join("+"),
                                broken: false,
                            });
                        }
                    }
                }
                Drawing {
                    graph: plan.graph.clone(),
                    valid: true,
                    machines: plan.machines.iter().map(|m| m.name.clone()).collect(),
                    nodes,
                    edges,
                }
            }
            None => {
                let spec = &c.spec;
                let mut nodes: Vec<DrawNode> = spec
                    .nodes
                    .iter()
                    .map(|n| {
                        let mut spans =
                            vec![n.name.span, n.kind.span, n.replicas.span, n.gpus.span];
                        spans.extend(n.settings.values().map(|v| v.span));
                        DrawNode {
                            id: n.name.value.clone(),
                            node: n.name.value.clone(),
                            kind: n.kind.value.clone(),
                            replicas: (0..n.replicas.value.min(1_000)).collect(),
                            machine: None,
                            gpus: if n.gpus.value == 0 {
                                "-".into()
                            } else {
                                format!("{}/replica", n.gpus.value)
                            },
                            broken: is_broken(&spans),
                            missing: false,
                        }
                    })
                    .collect();
                let mut edges = Vec::new();
                for e in &spec.edges {
                    let end =
                        |text: &str, nodes: &mut Vec<DrawNode>, out: bool| -> (String, String) {
                            let (node, port) = text.split_once('.').unwrap_or((text, ""));
                            if !nodes.iter().any(|n| n.node == node) {
                                nodes.push(DrawNode {
                                    id: node.to_string(),
                                    node: node.to_string(),
                                    kind: String::new(),
                                    replicas: Vec::new(),
                                    machine: None,
                                    gpus: "-".into(),
                                    broken: true,
                                    missing: true,
                                });
                            }
                            let port = if port.is_empty() {
                                let kind = spec.node(node).and_then(|n| kinds::kind(&n.kind.value));
                                let dir = if out {
                                    kinds::Direction::Out
                                } else {
                                    kinds::Direction::In
                                };
                                kind.and_then(|k| k.default_port(dir))
                                    .map_or("?", |p| p.name)
                                    .to_string()
                            } else {
                                port.to_string()
                            };
                            (node.to_string(), port)
                        };
                    let (from, from_port) = end(&e.from.value, &mut nodes, true);
                    let (to, to_port) = end(&e.to.value, &mut nodes, false);
                    let schema = spec
                        .node(&from)
                        .and_then(|n| kinds::kind(&n.kind.value))
                        .and_then(|k| k.port(&from_port))
                        .map_or("?", |p| p.schema)
                        .to_string();
                    edges.push(DrawEdge {
                        from,
                        to,
                        from_port,
                        to_port,
                        kind: e.kind.value,
                        schema,
                        transport: String::new(),
                        broken: is_broken(&[e.span, e.from.span, e.to.span]),
                    });
                }
                Drawing {
                    graph: spec.name.value.clone(),
                    valid: false,
                    machines: Vec::new(),
                    nodes,
                    edges,
                }
            }
        }
    }
}

/// An identifier safe in DOT and Mermaid: letters, digits and `_`.
pub fn safe_id(id: &str) -> String {
    let mut s: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if s.starts_with(|c: char| c.is_ascii_digit()) || s.is_empty() {
        s.insert(0, 'n');
    }
    // Keep ids distinct when two names differ only in punctuation.
    if s != id {
        s.push_str(&format!(
            "_{:x}",
            id.bytes()
                .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
                & 0xffff
        ));
    }
    s
}
