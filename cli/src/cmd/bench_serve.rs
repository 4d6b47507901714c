//! `dynamo bench serve`: the load generator of `dynamo-bench`, optionally around a graph
//! it starts itself, so one command measures startup time, idle memory and the CPU spent
//! per request and per token by the graph's non-engine processes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use dynamo_bench::BenchArgs;

use crate::cmd::started_graph::{graph_pids, rss_kib, start};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    bench: BenchArgs,
    /// Start this graph (frontend on a free port) and load it instead of `--url`.
    #[arg(long)]
    graph: Option<PathBuf>,
    /// Settings for the started graph, e.g. `--set worker.speedup=inf` (repeatable).
    #[arg(long = "set", value_name = "NODE.KEY=VALUE", requires = "graph")]
    sets: Vec<String>,
    /// Count the started graph's engine processes' CPU too (e.g. to compare transports,
    /// whose worker side runs there). `--server-pids` adds more (e.g. a nats-server).
    #[arg(long, requires = "graph")]
    include_engines: bool,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let mut bench = a.bench;
    let mut started = None;
    let mut header = serde_json::Map::new();
    if let Some(graph) = &a.graph {
        let s = start(graph, &a.sets)?;
        let pids = graph_pids(&s.run_dir, a.include_engines)?;
        if pids.is_empty() {
            bail!(
                "found no non-engine process of the graph under {}",
                s.run_dir.display()
            );
        }
        let rss: u64 = pids.iter().map(|p| rss_kib(*p)).sum();
        header.insert("graph_ready_ms".into(), s.ready_ms.into());
        header.insert(
            "idle_rss_mib".into(),
            serde_json::json!((rss as f64 / 1024.0 * 10.0).round() / 10.0),
        );
        header.insert("measured_pids".into(), serde_json::json!(pids));
        bench.url = s.url.clone();
        bench.server_pids.extend(pids);
        started = Some(s);
    }
    let json = bench.json;
    let report = dynamo_bench::run_blocking(bench)?;
    drop(started);
    if json {
        let mut v = report.to_json();
        if let Some(obj) = v.as_object_mut() {
            obj.extend(header);
        }
        println!("{v}");
    } else {
        if !header.is_empty() {
            let which = if a.include_engines {
                "all its processes"
            } else {
                "non-engine processes"
            };
            println!(
                "graph ready in {} ms; idle RSS of {which} {} MiB",
                header["graph_ready_ms"], header["idle_rss_mib"]
            );
        }
        print!("{}", report.to_text());
    }
    Ok(if report.requests_ok == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
