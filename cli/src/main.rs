//! `dynamo`: describe an LLM-serving pipeline as a TOML graph, check it, plan it, draw it
//! and run it.

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dynamo",
    version,
    about = "Serve LLM pipelines described as a TOML graph"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check, plan, draw and run graph files.
    #[command(subcommand)]
    Graph(cmd::graph::GraphCommand),
    /// Benchmarks whose figures go in the README.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Graph(c) => cmd::graph::run(c),
        Command::Bench(c) => cmd::bench::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
