//! `dynamo`: describe an LLM-serving pipeline as a TOML graph, check it, plan it, draw it
//! and run it.

mod cmd;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Fetch models into the cache.
    #[command(subcommand)]
    Model(cmd::model::ModelCommand),
    /// Run one process of a plan (`graph up` starts these).
    #[command(subcommand)]
    Node(cmd::node::NodeCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The one place the environment is read: DYN_LOG (RUST_LOG syntax) sets the log level.
    let dyn_log = std::env::var("DYN_LOG").ok();
    let filter = tracing_subscriber::EnvFilter::try_new(dyn_log.as_deref().unwrap_or("warn"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Graph(c) => cmd::graph::run(c, dyn_log),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Model(c) => cmd::model::run(c),
        Command::Node(c) => cmd::node::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
