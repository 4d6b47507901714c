//! `dynamo`: describe an LLM-serving pipeline as a TOML graph, check it, plan it, draw it
//! and run it.

mod cmd;
mod telemetry;

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
    /// Run the processes graphs place on this machine (see `graph up --etcd`).
    Agent(cmd::agent::AgentArgs),
    /// Run one process of a plan (`graph up` starts these).
    #[command(subcommand)]
    Node(cmd::node::NodeCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The one place the environment is read: DYN_LOG (RUST_LOG syntax) sets the log level.
    let dyn_log = std::env::var("DYN_LOG").ok();
    // A planned process exports its spans when its graph says where (`[telemetry]`).
    let export = match &cli.command {
        Command::Node(cmd::node::NodeCommand::Run { plan, process, .. }) => {
            telemetry::from_plan_file(plan, process)
        }
        _ => None,
    };
    let _tracing = telemetry::init(dyn_log.as_deref(), export);
    let result = match cli.command {
        Command::Graph(c) => cmd::graph::run(c, dyn_log),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Agent(a) => cmd::agent::run(a, dyn_log),
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
