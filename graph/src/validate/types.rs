//! Port types: an edge's kind, schema, cardinality and memory domain must agree at both
//! ends.

use crate::diagnostic::{Code, Diagnostic};
use crate::kinds::{EdgeKind, Memory, MemorySpec, PortSpec};
use crate::spec::NodeSpec;
use crate::validate::resolve::Resolved;

/// The memory domain a port has on a given node.
pub fn memory_of(port: &PortSpec, node: &NodeSpec) -> Memory {
    match port.memory {
        MemorySpec::Host => Memory::Host,
        MemorySpec::Device => match node.setting_str("device") {
            Some("cuda") => Memory::Cuda,
            _ => Memory::Host,
        },
    }
}

fn kind_word(k: EdgeKind) -> &'static str {
    match k {
        EdgeKind::Call => "call",
        EdgeKind::Feedback => "feedback",
    }
}

pub fn check(r: &Resolved<'_>, diags: &mut Vec<Diagnostic>) {
    for e in &r.edges {
        let spec = &r.spec.edges[e.index];
        let (from_node, to_node) = (&r.spec.nodes[e.from.node], &r.spec.nodes[e.to.node]);
        let (fp, tp) = (e.from.port, e.to.port);
        let fname = format!("{}.{}", from_node.name.value, fp.name);
        let tname = format!("{}.{}", to_node.name.value, tp.name);
        if fp.edge != spec.kind.value || tp.edge != spec.kind.value {
            let port_kind = if fp.edge != spec.kind.value {
                fp.edge
            } else {
                tp.edge
            };
            let help = match port_kind {
                EdgeKind::Feedback => "event ports are one-way streams: mark the edge `kind = \"feedback\"` (or write it as `\"a.events ~> b.events\"`)",
                EdgeKind::Call => "only event ports carry feedback edges; remove `kind = \"feedback\"`",
            };
            diags.push(
                Diagnostic::at(
                    Code::E0204,
                    spec.kind.span,
                    format!(
                        "edge `{fname}` -> `{tname}` is a {} edge, but its ports carry {} edges",
                        kind_word(spec.kind.value),
                        kind_word(port_kind)
                    ),
                )
                .label(format!("declared {}", kind_word(spec.kind.value)))
                .help(help),
            );
            continue;
        }
        if fp.schema != tp.schema {
            diags.push(
                Diagnostic::at(
                    Code::E0201,
                    spec.to.span,
                    format!(
                        "`{tname}` expects `{}` but `{fname}` sends `{}`",
                        tp.schema, fp.schema
                    ),
                )
                .label(format!("expects `{}`", tp.schema))
                .with_label(spec.from.span, format!("sends `{}`", fp.schema))
                .help(port_help(r, e.from.node, fp)),
            );
            continue;
        }
        if fp.cardinality != tp.cardinality {
            diags.push(
                Diagnostic::at(
                    Code::E0202,
                    spec.to.span,
                    format!(
                        "`{fname}` answers with a {} response but `{tname}` with a {} one",
                        fp.cardinality.as_str(),
                        tp.cardinality.as_str()
                    ),
                )
                .label("cardinality differs")
                .help("a stream cannot feed a unary port: connect ports of the same cardinality"),
            );
            continue;
        }
        let (fm, tm) = (memory_of(fp, from_node), memory_of(tp, to_node));
        if fm != tm {
            let fdev = from_node
                .setting_span("device")
                .unwrap_or(from_node.name.span);
            let tdev = to_node.setting_span("device").unwrap_or(to_node.name.span);
            diags.push(
                Diagnostic::at(
                    Code::E0203,
                    spec.span,
                    format!(
                        "`{fname}` is in {} memory but `{tname}` is in {} memory",
                        fm.as_str(),
                        tm.as_str()
                    ),
                )
                .label("memory domains differ")
                .with_label(
                    fdev,
                    format!(
                        "`{}` keeps its KV cache in {} memory",
                        from_node.name.value,
                        fm.as_str()
                    ),
                )
                .with_label(
                    tdev,
                    format!(
                        "`{}` keeps its KV cache in {} memory",
                        to_node.name.value,
                        tm.as_str()
                    ),
                )
                .help("set the same `device` on both nodes"),
            );
        }
    }
}

/// Which input ports would accept what `port` sends.
fn port_help(r: &Resolved<'_>, node: usize, port: &PortSpec) -> String {
    let mut ok: Vec<String> = Vec::new();
    for (i, n) in r.spec.nodes.iter().enumerate() {
        if i == node {
            continue;
        }
        if let Some(k) = r.kind(i) {
            for p in k.ports {
                if p.dir == crate::kinds::Direction::In
                    && p.schema == port.schema
                    && p.edge == port.edge
                {
                    ok.push(format!("`{}.{}`", n.name.value, p.name));
                }
            }
        }
    }
    if ok.is_empty() {
        format!("no input port of this graph accepts `{}`", port.schema)
    } else {
        ok.truncate(6);
        format!("ports that accept `{}`: {}", port.schema, ok.join(", "))
    }
}
