//! `dynamo bench replay`: replay a Mooncake trace against a running graph (`--url`) or a
//! graph this command starts (`--graph`), and report latencies and the KV hit rate. With
//! `--baseline`, the graph is replayed twice per round, as given and with the baseline's
//! settings, each from a fresh start, and the two are compared round by round.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use dynamo_bench::{ComparedRun, ReplayArgs, ReplayComparison, ReplayReport, Side};

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
    /// Compare against the same graph with these settings added (repeatable), e.g.
    /// `--baseline router.mode=round-robin`: each round replays both, each on a freshly
    /// started graph, and the report gives each figure's gain within the rounds.
    #[arg(long = "baseline", value_name = "NODE.KEY=VALUE", requires = "graph")]
    baseline: Vec<String>,
    /// Rounds of the comparison; the order of the two alternates from round to round.
    #[arg(long, default_value_t = 1, requires = "baseline",
          value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let Some(graph) = a.graph.as_deref().filter(|_| !a.baseline.is_empty()) else {
        return run_once(a);
    };
    compare(graph, &a.sets, &a.baseline, a.rounds, a.replay)
}

fn run_once(a: Args) -> anyhow::Result<ExitCode> {
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
    Ok(exit(std::iter::once(&report)))
}

/// Replays `graph` with `sets` (the candidate) and with `sets` + `baseline`, `rounds`
/// times: candidate first in odd rounds, baseline first in even ones, so a drift of the
/// machine over the run weighs on both. Text mode prints each report as it finishes.
fn compare(
    graph: &Path,
    sets: &[String],
    baseline: &[String],
    rounds: u32,
    replay: ReplayArgs,
) -> anyhow::Result<ExitCode> {
    check_settings(graph, sets, baseline)?;
    let json = replay.json;
    let mut runs = Vec::new();
    let mut failure = None;
    'rounds: for round in 1..=rounds {
        let order = if round % 2 == 1 {
            [Side::Candidate, Side::Baseline]
        } else {
            [Side::Baseline, Side::Candidate]
        };
        for side in order {
            let mut with: Vec<String> = sets.to_vec();
            if side == Side::Baseline {
                with.extend(baseline.iter().cloned());
            }
            let report = match replay_started(graph, &with, &replay) {
                Ok(report) => report,
                Err(e) => {
                    let what = format!("round {round} of {rounds}, {}", side.name());
                    failure = Some(e.context(what));
                    break 'rounds;
                }
            };
            if !json {
                println!("== round {round} of {rounds}: {} ==", side.name());
                println!("{}", report.to_text());
            }
            runs.push(ComparedRun {
                side,
                round,
                report,
            });
        }
    }
    let candidate = if sets.is_empty() {
        "the graph as given".to_string()
    } else {
        format!("the graph with {}", sets.join(" "))
    };
    let baseline = format!("the candidate with {}", baseline.join(" "));
    // Nothing finished: the error alone says it (a bad flag or row fails the first run).
    if runs.is_empty() {
        if let Some(e) = failure {
            return Err(e);
        }
    }
    let mut comparison = ReplayComparison::new(candidate, baseline, runs);
    comparison.rounds_requested = rounds;
    comparison.error = failure.as_ref().map(|e| format!("{e:#}"));
    if json {
        println!("{}", comparison.to_json());
    } else if comparison.rounds > 0 {
        print!("{}", comparison.to_text());
    }
    // A later run failed: what finished is printed above, not lost with it.
    if let Some(e) = failure {
        eprintln!(
            "error: {e:#}\n{} of {rounds} rounds finished; {}",
            comparison.rounds,
            if comparison.rounds > 0 {
                "the comparison above covers them"
            } else {
                "the reports above are all there is"
            }
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(exit(comparison.runs.iter().map(|r| &r.report)))
}

/// The graph, and both sides' settings on it, are checked before the first replay: a typo
/// in `--baseline` must not cost a finished candidate run.
fn check_settings(graph: &Path, sets: &[String], baseline: &[String]) -> anyhow::Result<()> {
    let checked = crate::cmd::graph::load(graph);
    let Some(mut plan) = checked.plan else {
        eprint!(
            "{}",
            dynamo_graph::render::render_text(&checked.file, &checked.diagnostics)
        );
        anyhow::bail!("{} is not a valid graph", graph.display());
    };
    // The baseline's settings go on top of the candidate's, as `graph up` gets them.
    for (flag, settings) in [("--set", sets), ("--baseline", baseline)] {
        for s in settings {
            if let Err(e) = dynamo_graph::overrides::apply(&mut plan, s) {
                anyhow::bail!("{flag} {s}: {e}");
            }
        }
    }
    Ok(())
}

/// One replay on a freshly started `graph` with `sets`, stopped after it.
fn replay_started(
    graph: &Path,
    sets: &[String],
    replay: &ReplayArgs,
) -> anyhow::Result<ReplayReport> {
    let started = start(graph, sets)?;
    let mut args = replay.clone();
    args.url = started.url.clone();
    let report = dynamo_bench::replay_blocking(args)?;
    drop(started);
    Ok(report)
}

/// Failure when a replay got no answer at all.
fn exit<'a>(mut reports: impl Iterator<Item = &'a ReplayReport>) -> ExitCode {
    if reports.any(|r| r.run.requests_ok == 0) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
