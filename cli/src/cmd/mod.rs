pub mod bench;
pub mod bench_graph;
pub mod bench_serve;
pub mod chat;
pub mod graph;
pub mod model;
pub mod node;
pub mod up;
