//! Graphviz DOT: machines as clusters, edge labels with ports, schema and transport,
//! feedback edges dashed, broken parts red.

use super::{safe_id, Drawing};
use crate::kinds::EdgeKind;

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn shape(kind: &str) -> &'static str {
    match kind {
        "frontend" => "house",
        "router" => "diamond",
        "worker" | "prefill" | "decode" => "box3d",
        _ => "box",
    }
}

pub fn render(d: &Drawing) -> String {
    let mut out = String::new();
    out.push_str(&format!("digraph \"{}\" {{\n", esc(&d.graph)));
    out.push_str("  rankdir=LR;\n  node [fontname=\"Helvetica\", style=filled, fillcolor=\"#eef3fb\"];\n  edge [fontname=\"Helvetica\", fontsize=10];\n");
    let node_line = |n: &super::DrawNode, indent: &str| {
        let mut attrs = format!("label=\"{}\", shape={}", esc(&n.label()), shape(&n.kind));
        if n.missing {
            attrs.push_str(", style=\"dashed\", color=red, fontcolor=red, fillcolor=white");
        } else if n.broken {
            attrs.push_str(", color=red, penwidth=2");
        }
        format!("{indent}{} [{attrs}];\n", safe_id(&n.id))
    };
    if d.machines.is_empty() {
        for n in &d.nodes {
            out.push_str(&node_line(n, "  "));
        }
    } else {
        for (i, m) in d.machines.iter().enumerate() {
            let inside: Vec<_> = d
                .nodes
                .iter()
                .filter(|n| n.machine.as_deref() == Some(m))
                .collect();
            if inside.is_empty() {
                continue;
            }
            out.push_str(&format!(
                "  subgraph cluster_{i} {{\n    label=\"{}\";\n    style=rounded;\n",
                esc(m)
            ));
            for n in inside {
                out.push_str(&node_line(n, "    "));
            }
            out.push_str("  }\n");
        }
    }
    for e in &d.edges {
        let mut attrs = format!("label=\"{}\"", esc(&e.label()));
        if e.kind == EdgeKind::Feedback {
            attrs.push_str(", style=dashed, constraint=false");
        }
        if e.broken {
            attrs.push_str(", color=red, fontcolor=red");
        }
        out.push_str(&format!(
            "  {} -> {} [{attrs}];\n",
            safe_id(&e.from),
            safe_id(&e.to)
        ));
    }
    out.push_str("}\n");
    out
}
