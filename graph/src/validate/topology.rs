//! The shape of the graph: cycles of call edges, reachability from a frontend, required
//! ports, and outputs that feed several edges.

use std::collections::{BTreeMap, VecDeque};

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

use crate::diagnostic::{Code, Diagnostic};
use crate::kinds::{Direction, EdgeKind};
use crate::validate::resolve::{Resolved, ResolvedEdge};

pub fn check(r: &Resolved<'_>, diags: &mut Vec<Diagnostic>) {
    cycles(r, diags);
    reachability(r, diags);
    required_ports(r, diags);
    fan_out(r, diags);
}

fn call_edges<'r>(r: &'r Resolved<'_>) -> impl Iterator<Item = &'r ResolvedEdge> {
    r.edges.iter().filter(move |e| {
        r.spec.edges[e.index].kind.value == EdgeKind::Call && e.from.port.edge == EdgeKind::Call
    })
}

/// Every strongly connected component of call edges is one diagnostic naming each edge.
fn cycles(r: &Resolved<'_>, diags: &mut Vec<Diagnostic>) {
    let mut g: DiGraph<usize, usize> = DiGraph::with_capacity(r.spec.nodes.len(), r.edges.len());
    let ids: Vec<NodeIndex> = (0..r.spec.nodes.len()).map(|i| g.add_node(i)).collect();
    for e in call_edges(r) {
        g.add_edge(ids[e.from.node], ids[e.to.node], e.index);
    }
    let mut sccs: Vec<Vec<usize>> = tarjan_scc(&g)
        .into_iter()
        .map(|c| {
            let mut v: Vec<usize> = c.into_iter().map(|n| g[n]).collect();
            v.sort_unstable();
            v
        })
        .collect();
    sccs.sort();
    // The edges inside each component, found in one pass over the edges.
    let mut comp_of = vec![usize::MAX; r.spec.nodes.len()];
    for (c, comp) in sccs.iter().enumerate() {
        for &n in comp {
            comp_of[n] = c;
        }
    }
    let mut inner_edges: Vec<Vec<usize>> = vec![Vec::new(); sccs.len()];
    for e in call_edges(r) {
        let c = comp_of[e.from.node];
        if c != usize::MAX && c == comp_of[e.to.node] {
            inner_edges[c].push(e.index);
        }
    }
    for (comp, mut inner) in sccs.into_iter().zip(inner_edges) {
        if inner.is_empty() {
            continue;
        }
        inner.sort_unstable();
        let names: Vec<String> = comp
            .iter()
            .map(|&n| format!("`{}`", r.node_name(n)))
            .collect();
        let first = &r.spec.edges[inner[0]];
        let mut d = Diagnostic::at(
            Code::E0205,
            first.span,
            if comp.len() == 1 {
                format!("node {} calls itself", names[0])
            } else {
                format!("call edges form a cycle through {}", names.join(", "))
            },
        )
        .label("this edge is part of the cycle");
        for &i in &inner[1..] {
            d = d.with_label(r.spec.edges[i].span, "and this one");
        }
        diags.push(d.help(
            "requests must flow one way; if this edge carries events back (KV events), mark it `kind = \"feedback\"`",
        ));
    }
}

fn reachability(r: &Resolved<'_>, diags: &mut Vec<Diagnostic>) {
    let frontends: Vec<usize> = (0..r.spec.nodes.len())
        .filter(|&i| r.kind(i).is_some_and(|k| k.name == "frontend"))
        .collect();
    if frontends.is_empty() {
        if !r.spec.nodes.is_empty() {
            diags.push(
                Diagnostic::at(Code::E0208, r.spec.name.span, "the graph has no frontend, so no request can enter it")
                    .label("in this graph")
                    .help("add `[nodes.frontend]` with `kind = \"frontend\"` and connect it to a preprocessor"),
            );
        }
        return;
    }
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); r.spec.nodes.len()];
    for e in call_edges(r) {
        out[e.from.node].push(e.to.node);
    }
    let mut seen = vec![false; r.spec.nodes.len()];
    let mut queue: VecDeque<usize> = frontends.into_iter().collect();
    for &f in &queue {
        seen[f] = true;
    }
    while let Some(n) = queue.pop_front() {
        for &m in &out[n] {
            if !seen[m] {
                seen[m] = true;
                queue.push_back(m);
            }
        }
    }
    for (i, node) in r.spec.nodes.iter().enumerate() {
        if !seen[i] && r.kind(i).is_some() {
            diags.push(
                Diagnostic::at(
                    Code::E0206,
                    node.name.span,
                    format!(
                        "node `{}` cannot be reached from any frontend",
                        node.name.value
                    ),
                )
                .label("no request ever gets here")
                .help(
                    "connect it with a call edge from a node that a frontend reaches, or remove it",
                ),
            );
        }
    }
}

fn required_ports(r: &Resolved<'_>, diags: &mut Vec<Diagnostic>) {
    let mut connected: BTreeMap<(usize, &str), usize> = BTreeMap::new();
    for e in &r.edges {
        *connected
            .entry((e.from.node, e.from.port.name))
            .or_default() += 1;
        *connected.entry((e.to.node, e.to.port.name)).or_default() += 1;
    }
    for (i, node) in r.spec.nodes.iter().enumerate() {
        let Some(kind) = r.kind(i) else { continue };
        for p in kind.ports.iter().filter(|p| p.required) {
            if !connected.contains_key(&(i, p.name)) {
                let (dir, example) = match p.dir {
                    Direction::In => ("input", format!("to = \"{}.{}\"", node.name.value, p.name)),
                    Direction::Out => (
                        "output",
                        format!("from = \"{}.{}\"", node.name.value, p.name),
                    ),
                };
                diags.push(
                    Diagnostic::at(
                        Code::E0207,
                        node.name.span,
                        format!(
                            "required {dir} port `{}.{}` is not connected",
                            node.name.value, p.name
                        ),
                    )
                    .label(format!("`{}` ({}) is never connected", p.name, p.doc))
                    .help(format!("add an edge with `{example}`")),
                );
            }
        }
        for group in kind.require_any {
            if !group.iter().any(|p| connected.contains_key(&(i, *p))) {
                let ports: Vec<String> = group
                    .iter()
                    .map(|p| format!("`{}.{p}`", node.name.value))
                    .collect();
                diags.push(
                    Diagnostic::at(
                        Code::E0207,
                        node.name.span,
                        format!("{} `{}` sends requests nowhere", kind.name, node.name.value),
                    )
                    .label(format!("connect one of {}", ports.join(" or ")))
                    .help("connect the router to the workers it chooses among"),
                );
            }
        }
    }
}

fn fan_out(r: &Resolved<'_>, diags: &mut Vec<Diagnostic>) {
    let mut by_port: BTreeMap<(usize, &str), Vec<usize>> = BTreeMap::new();
    for e in call_edges(r) {
        if !e.from.port.fan_out {
            by_port
                .entry((e.from.node, e.from.port.name))
                .or_default()
                .push(e.index);
        }
    }
    for ((node, port), edges) in by_port {
        if edges.len() < 2 {
            continue;
        }
        let name = r.node_name(node);
        let mut d = Diagnostic::at(
            Code::E0209,
            r.spec.edges[edges[1]].span,
            format!("output `{name}.{port}` feeds {} edges", edges.len()),
        )
        .label("second edge from the same output")
        .with_label(r.spec.edges[edges[0]].span, "first edge");
        for &i in &edges[2..] {
            d = d.with_label(r.spec.edges[i].span, "another edge");
        }
        diags
            .push(d.help("only a router chooses among several targets; put a router between them"));
    }
}
