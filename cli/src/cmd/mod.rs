pub mod bench;
pub mod bench_graph;
pub mod graph;
