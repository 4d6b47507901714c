//! `dynamo bench replay`: replay a Mooncake trace against a running graph (`--url`) or a
//! graph this command starts (`--graph`), and report latencies and the KV hit rate.

use std::path::PathBuf;
use std::process::ExitCode;

use dynamo_bench::ReplayArgs;

use crate::cmd::started_graph::start;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    replay: ReplayArgs,
    /// Start this graph (frontend on a free port) and replay against it instead of `--url`.
    #[arg(long)]
    graph: Option<PathBuf>,
    /// Settings for the started graph, e.g. `--set router.mode=round-robin` (repeatable).
    #[arg(long = "set", value_name = "NODE.KEY=VALUE", requires = "graph")]
    sets: Vec<String>,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let mut replay = a.replay;
    let started = match &a.graph {
        Some(graph) => {
            let s = start(graph, &a.sets)?;
            replay.url = s.url.clone();
            Some(s)
        }
        None => None,
    };
    let json = replay.json;
    let report = dynamo_bench::replay_blocking(replay)?;
    drop(started);
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(if report.run.requests_ok == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
