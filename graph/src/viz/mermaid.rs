//! Mermaid flowchart: machines as subgraphs, feedback edges dotted, broken parts styled.

use super::{safe_id, Drawing};
use crate::kinds::EdgeKind;

fn esc(s: &str) -> String {
    s.replace('"', "#quot;").replace('\n', "<br/>")
}

pub fn render(d: &Drawing) -> String {
    let mut out = String::from("flowchart LR\n");
    let node_line = |n: &super::DrawNode| format!("{}[\"{}\"]", safe_id(&n.id), esc(&n.label()));
    if d.machines.is_empty() {
        for n in &d.nodes {
            out.push_str(&format!("    {}\n", node_line(n)));
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
            out.push_str(&format!("    subgraph machine_{i}[\"{}\"]\n", esc(m)));
            for n in inside {
                out.push_str(&format!("        {}\n", node_line(n)));
            }
            out.push_str("    end\n");
        }
    }
    let mut broken_edges = Vec::new();
    for (i, e) in d.edges.iter().enumerate() {
        let arrow = match e.kind {
            EdgeKind::Call => "-->",
            EdgeKind::Feedback => "-.->",
        };
        out.push_str(&format!(
            "    {} {arrow}|\"{}\"| {}\n",
            safe_id(&e.from),
            esc(&e.label()),
            safe_id(&e.to)
        ));
        if e.broken {
            broken_edges.push(i.to_string());
        }
    }
    out.push_str("    classDef broken stroke:#d00,stroke-width:3px,color:#d00\n");
    out.push_str("    classDef missing stroke:#d00,stroke-dasharray:4 4,color:#d00\n");
    for n in &d.nodes {
        if n.missing {
            out.push_str(&format!("    class {} missing\n", safe_id(&n.id)));
        } else if n.broken {
            out.push_str(&format!("    class {} broken\n", safe_id(&n.id)));
        }
    }
    if !broken_edges.is_empty() {
        out.push_str(&format!(
            "    linkStyle {} stroke:#d00,color:#d00\n",
            broken_edges.join(",")
        ));
    }
    out
}
