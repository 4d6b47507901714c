pub mod bench;
pub mod graph;
pub mod bench_graph;
