//! Name resolution: kinds, edge endpoints, models, machines and colocation targets.
//! Everything later passes need is looked up once here.

use std::collections::HashMap;

use crate::diagnostic::{Code, Diagnostic};
use crate::kinds::{self, Direction, KindSpec, PortSpec};
use crate::source::Sp;
use crate::spec::GraphSpec;
use crate::suggest;

/// One end of an edge, resolved.
#[derive(Debug, Clone, Copy)]
pub struct End {
    pub node: usize,
    pub port: &'static PortSpec,
}

#[derive(Debug, Clone, Copy)]
pub struct ResolvedEdge {
    /// Index into `spec.edges`.
    pub index: usize,
    pub from: End,
    pub to: End,
}

/// The graph with every name looked up. Edges that could not be resolved are absent.
#[derive(Debug)]
pub struct Resolved<'a> {
    pub spec: &'a GraphSpec,
    /// The kind of each node, `None` when unknown.
    pub kinds: Vec<Option<&'static KindSpec>>,
    pub node_index: HashMap<&'a str, usize>,
    pub edges: Vec<ResolvedEdge>,
}

impl<'a> Resolved<'a> {
    pub fn kind(&self, node: usize) -> Option<&'static KindSpec> {
        self.kinds.get(node).copied().flatten()
    }

    pub fn node_name(&self, node: usize) -> &'a str {
        self.spec
            .nodes
            .get(node)
            .map_or("?", |n| n.name.value.as_str())
    }
}

pub fn resolve<'a>(spec: &'a GraphSpec, diags: &mut Vec<Diagnostic>) -> Resolved<'a> {
    let kinds: Vec<_> = spec
        .nodes
        .iter()
        .map(|n| kinds::kind(&n.kind.value))
        .collect();
    let node_index: HashMap<&str, usize> = spec
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.value.as_str(), i))
        .collect();
    let mut r = Resolved {
        spec,
        kinds,
        node_index,
        edges: Vec::new(),
    };
    check_references(&r, diags);
    let mut seen: HashMap<(usize, &str, usize, &str), usize> = HashMap::new();
    for (index, e) in spec.edges.iter().enumerate() {
        let from = end(&r, &e.from, Direction::Out, diags);
        let to = end(&r, &e.to, Direction::In, diags);
        if let (Some(from), Some(to)) = (from, to) {
            let key = (from.node, from.port.name, to.node, to.port.name);
            if let Some(&first) = seen.get(&key) {
                let first_span = spec.edges[first].span;
                diags.push(
                    Diagnostic::at(
                        Code::E0109,
                        e.span,
                        format!(
                            "the edge `{}` -> `{}` is declared twice",
                            e.from.value, e.to.value
                        ),
                    )
                    .label("declared again here")
                    .with_label(first_span, "first declared here")
                    .help("remove one of them"),
                );
                continue;
            }
            seen.insert(key, index);
            r.edges.push(ResolvedEdge { index, from, to });
        }
    }
    r
}

fn node_names(spec: &GraphSpec) -> impl Iterator<Item = &str> + Clone {
    spec.nodes.iter().map(|n| n.name.value.as_str())
}

/// Resolve `node.port` (or `node` for its default port).
fn end(
    r: &Resolved<'_>,
    text: &Sp<String>,
    dir: Direction,
    diags: &mut Vec<Diagnostic>,
) -> Option<End> {
    let side = if dir == Direction::Out {
        "source"
    } else {
        "target"
    };
    let (node_name, port_name) = match text.value.split_once('.') {
        Some((n, p)) => (n, Some(p)),
        None => (text.value.as_str(), None),
    };
    if node_name.is_empty() || port_name.is_some_and(|p| p.is_empty() || p.contains('.')) {
        diags.push(
            Diagnostic::at(
                Code::E0107,
                text.span,
                format!("edge {side} `{}` is not a port reference", text.value),
            )
            .label("expected `node.port` or `node`")
            .help("name a node and one of its ports, such as `router.decode`"),
        );
        return None;
    }
    let Some(&node) = r.node_index.get(node_name) else {
        let mut d = Diagnostic::at(
            Code::E0102,
            text.span,
            format!(
                "edge {side} `{}` names unknown node `{node_name}`",
                text.value
            ),
        )
        .label(format!("no node named `{node_name}`"))
        .maybe_help(suggest::help_for(node_name, "nodes", node_names(r.spec)));
        if let Some(near) =
            suggest::closest(node_name, node_names(r.spec)).and_then(|n| r.spec.node(n))
        {
            d = d.with_label(
                near.name.span,
                format!("`{}` is defined here", near.name.value),
            );
        }
        diags.push(d);
        return None;
    };
    let kind = r.kind(node)?;
    let port = match port_name {
        Some(p) => match kind.port(p) {
            Some(port) => port,
            None => {
                let names = kind.ports.iter().map(|p| p.name);
                diags.push(
                    Diagnostic::at(
                        Code::E0103,
                        text.span,
                        format!("{} `{node_name}` has no port `{p}`", kind.name),
                    )
                    .label(format!("no port `{p}` on a {}", kind.name))
                    .maybe_help(suggest::help_for(p, "ports", names)),
                );
                return None;
            }
        },
        None => match kind.default_port(dir) {
            Some(port) => port,
            None => {
                let names: Vec<_> = kind
                    .ports
                    .iter()
                    .filter(|p| p.dir == dir)
                    .map(|p| p.name)
                    .collect();
                let what = if dir == Direction::Out {
                    "output"
                } else {
                    "input"
                };
                diags.push(
                    Diagnostic::at(
                        Code::E0107,
                        text.span,
                        format!("a {} has no default {what} port", kind.name),
                    )
                    .label("name the port: `node.port`")
                    .help(if names.is_empty() {
                        format!("a {} has no {what} ports at all", kind.name)
                    } else {
                        format!(
                            "its {what} ports: {}",
                            crate::decode::reader::quote_list(&names)
                        )
                    }),
                );
                return None;
            }
        },
    };
    if port.dir != dir {
        let (is, want) = match dir {
            Direction::Out => ("an input", "`from` must name an output port"),
            Direction::In => ("an output", "`to` must name an input port"),
        };
        diags.push(
            Diagnostic::at(
                Code::E0108,
                text.span,
                format!("`{node_name}.{}` is {is} port", port.name),
            )
            .label(format!("{is} port"))
            .help(format!("{want}; did you swap `from` and `to`?")),
        );
        return None;
    }
    Some(End { node, port })
}

/// Models, machines and colocation targets named by nodes.
fn check_references(r: &Resolved<'_>, diags: &mut Vec<Diagnostic>) {
    let spec = r.spec;
    let model_names = || spec.models.iter().map(|m| m.name.value.as_str());
    let machine_names: Vec<&str> = spec
        .cluster
        .as_ref()
        .map(|c| c.machines.iter().map(|m| m.name.value.as_str()).collect())
        .unwrap_or_default();
    for n in &spec.nodes {
        if let (Some(model), Some(span)) = (n.setting_str("model"), n.setting_span("model")) {
            if spec.model(model).is_none() {
                let help = if spec.models.is_empty() {
                    Some(format!(
                        "define it: `[models.{model}]` with `path` or `package`"
                    ))
                } else {
                    suggest::help_for(model, "models", model_names())
                };
                diags.push(
                    Diagnostic::at(
                        Code::E0105,
                        span,
                        format!("node `{}` uses unknown model `{model}`", n.name.value),
                    )
                    .label(format!("no model named `{model}`"))
                    .maybe_help(help),
                );
            }
        }
        if let Some(m) = &n.placement.machine {
            if !machine_names.contains(&m.value.as_str()) {
                let help = if spec.cluster.is_none() {
                    Some("without a [cluster] the only machine is this one; add `[cluster.machines.NAME]` sections".to_string())
                } else {
                    suggest::help_for(&m.value, "machines", machine_names.iter().copied())
                };
                diags.push(
                    Diagnostic::at(
                        Code::E0104,
                        m.span,
                        format!(
                            "node `{}` is pinned to unknown machine `{}`",
                            n.name.value, m.value
                        ),
                    )
                    .label("not a machine of the cluster")
                    .maybe_help(help),
                );
            }
        }
        if let Some(c) = &n.placement.colocate_with {
            if c.value == n.name.value {
                diags.push(
                    Diagnostic::at(
                        Code::E0106,
                        c.span,
                        format!("node `{}` is colocated with itself", n.name.value),
                    )
                    .label("names this node")
                    .help("name another node, or remove `colocate_with`"),
                );
            } else if !r.node_index.contains_key(c.value.as_str()) {
                diags.push(
                    Diagnostic::at(
                        Code::E0106,
                        c.span,
                        format!(
                            "node `{}` is colocated with unknown node `{}`",
                            n.name.value, c.value
                        ),
                    )
                    .label(format!("no node named `{}`", c.value))
                    .maybe_help(suggest::help_for(
                        &c.value,
                        "nodes",
                        node_names(spec),
                    )),
                );
            }
        }
    }
}
