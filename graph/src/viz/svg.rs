//! SVG laid out in pure Rust by the `layout-rs` crate, so no Graphviz is needed. It draws
//! nodes and labelled edges; machine clusters are shown in node labels, since layout-rs
//! does not draw clusters (pipe `--format dot` into Graphviz's `dot -Tsvg` for those).

use layout::backends::svg::SVGWriter;
use layout::gv::{DotParser, GraphBuilder};

use super::{safe_id, Drawing};
use crate::kinds::EdgeKind;

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', " ")
}

/// A plain DOT subset that layout-rs understands.
fn simple_dot(d: &Drawing) -> String {
    let mut out = String::from("digraph G {\n");
    for n in &d.nodes {
        let mut label = n.label().replace('\n', " ");
        if let Some(m) = &n.machine {
            if d.machines.len() > 1 {
                label.push_str(&format!(" @{m}"));
            }
        }
        let color = if n.broken { ", color=\"red\"" } else { "" };
        out.push_str(&format!(
            "  {} [label=\"{}\", shape=box{color}];\n",
            safe_id(&n.id),
            esc(&label)
        ));
    }
    for e in &d.edges {
        let mut label = format!("{}→{}", e.from_port, e.to_port);
        if !e.transport.is_empty() {
            label.push_str(&format!(" ({})", e.transport));
        }
        let style = match (e.kind, e.broken) {
            (_, true) => ", color=\"red\"",
            (EdgeKind::Feedback, false) => ", style=\"dashed\"",
            _ => "",
        };
        out.push_str(&format!(
            "  {} -> {} [label=\"{}\"{style}];\n",
            safe_id(&e.from),
            safe_id(&e.to),
            esc(&label)
        ));
    }
    out.push_str("}\n");
    out
}

pub fn render(d: &Drawing) -> String {
    let dot = simple_dot(d);
    // layout-rs asserts on inputs it does not expect; never let that take the CLI down.
    let result = std::panic::catch_unwind(|| {
        let mut parser = DotParser::new(&dot);
        let graph = parser.process().ok()?;
        let mut builder = GraphBuilder::new();
        builder.visit_graph(&graph);
        let mut vg = builder.get();
        let mut svg = SVGWriter::new();
        vg.do_it(false, false, false, &mut svg);
        Some(svg.finalize())
    });
    match result {
        Ok(Some(s)) => s,
        _ => format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"400\" height=\"40\"><text x=\"10\" y=\"25\">could not lay out graph `{}`</text></svg>\n",
            d.graph.replace('<', "&lt;")
        ),
    }
}
