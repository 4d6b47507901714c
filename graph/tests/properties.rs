//! Property tests: generated DAGs of any shape validate and place; adding one back-edge
//! between two routers is reported as a cycle that points at both edges.

use dynamo_graph::generate::generate;
use dynamo_graph::{check, Code, Environment, SourceFile};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_dags_validate(nodes in 4usize..300, extra in 0usize..400, machines in 1usize..12, seed in any::<u64>()) {
        let g = generate(nodes, nodes + extra, machines, seed);
        let c = check(SourceFile::new("gen.toml", g.text), &Environment::default());
        prop_assert!(c.is_ok(), "{:?}", c.diagnostics.items.first());
        let plan = c.plan.expect("a valid graph has a plan");
        prop_assert_eq!(plan.nodes.len(), 2 + g.routers + g.workers);
    }

    #[test]
    fn a_back_edge_is_a_cycle_with_both_spans(nodes in 30usize..300, machines in 1usize..6, seed in any::<u64>(), pick in any::<prop::sample::Index>()) {
        let g = generate(nodes, nodes * 2, machines, seed);
        prop_assume!(!g.router_edges.is_empty());
        let (a, b) = g.router_edges[pick.index(g.router_edges.len())];
        let forward = format!("from = \"r{a}\"\nto = \"r{b}\"\n");
        let back = format!("\n[[edges]]\nfrom = \"r{b}\"\nto = \"r{a}\"\n");
        let text = format!("{}{back}", g.text);
        let forward_at = text.find(&forward).expect("the forward edge is in the file");
        let back_at = text.rfind(&format!("from = \"r{b}\"\nto = \"r{a}\"")).expect("the back edge") ;
        let c = check(SourceFile::new("gen.toml", text), &Environment::default());
        let cycles: Vec<_> = c.diagnostics.items.iter().filter(|d| d.code == Code::E0205).collect();
        prop_assert_eq!(cycles.len(), 1, "one component, one diagnostic");
        let d = cycles[0];
        let mut spans: Vec<usize> = d.labels.iter().map(|l| l.span.start).collect();
        spans.extend(d.span.map(|s| s.start));
        // Each edge's span starts at its `from` value, just after `from = `.
        prop_assert!(spans.contains(&(forward_at + 7)), "forward edge not named: {spans:?}");
        prop_assert!(spans.contains(&(back_at + 7)), "back edge not named: {spans:?}");
        prop_assert!(c.plan.is_none());
    }
}
