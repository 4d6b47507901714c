//! `dynamo bench graph`: how long validation and placement take on a large generated
//! graph. The generator lives in `dynamo_graph::generate` so tests use the same graphs.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use dynamo_graph::{generate, Environment, SourceFile};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    #[arg(long, default_value_t = 20_000)]
    edges: usize,
    #[arg(long, default_value_t = 1_000)]
    machines: usize,
    /// Repetitions; the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long)]
    json: bool,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let text = generate::large_graph(a.nodes, a.edges, a.machines);
    let (mut total, mut parse) = (Vec::new(), Vec::new());
    let mut last = None;
    for _ in 0..a.runs.max(1) {
        let t0 = Instant::now();
        let (spec, _) = dynamo_graph::decode::decode(&text);
        parse.push(t0.elapsed());
        drop(spec);
        let t0 = Instant::now();
        let c = dynamo_graph::check(
            SourceFile::new("generated.toml", text.clone()),
            &Environment::default(),
        );
        total.push(t0.elapsed());
        last = Some(c);
    }
    let Some(c) = last else {
        anyhow::bail!("no run")
    };
    if c.diagnostics.has_errors() || c.plan.is_none() {
        anyhow::bail!(
            "the generated graph did not validate: {:?}",
            c.diagnostics.codes().first()
        );
    }
    let plan = c.plan.as_ref().map_or(0, |p| p.replicas.len());
    let (t, p) = (median(total), median(parse));
    if a.json {
        println!(
            "{{\"nodes\":{},\"edges\":{},\"machines\":{},\"replicas\":{plan},\"bytes\":{},\"parse_ms\":{:.1},\"check_and_place_ms\":{:.1}}}",
            a.nodes,
            c.spec.edges.len(),
            a.machines,
            text.len(),
            p.as_secs_f64() * 1e3,
            t.as_secs_f64() * 1e3
        );
    } else {
        println!(
            "graph: {} nodes, {} edges, {} machines, {} replicas ({} KiB of TOML)",
            a.nodes,
            c.spec.edges.len(),
            a.machines,
            plan,
            text.len() / 1024
        );
        println!(
            "parse + decode:                    {:>8.1} ms (median of {})",
            p.as_secs_f64() * 1e3,
            a.runs
        );
        println!(
            "parse + validate + place (total):  {:>8.1} ms (median of {})",
            t.as_secs_f64() * 1e3,
            a.runs
        );
    }
    Ok(ExitCode::SUCCESS)
}
