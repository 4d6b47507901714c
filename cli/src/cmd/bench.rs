//! `dynamo bench …`: benchmarks whose figures go in the README.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Validate and place a generated graph (default: 10,000 nodes, 20,000 edges, 1,000 machines).
    Graph(crate::cmd::bench_graph::Args),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Graph(a) => crate::cmd::bench_graph::run(a),
    }
}
