//! `dynamo node run`: one planned process, started by `graph up` (or an agent later).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use tokio_util::sync::CancellationToken;

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Run one process of a plan (written by `graph up`) until SIGTERM or SIGINT.
    Run {
        /// The plan, as JSON (`dynamo graph plan --format json`).
        #[arg(long)]
        plan: PathBuf,
        /// Which of the plan's processes to run.
        #[arg(long)]
        process: String,
        /// Where the graph's Unix sockets live.
        #[arg(long)]
        run_dir: PathBuf,
    },
}

pub fn run(cmd: NodeCommand) -> anyhow::Result<ExitCode> {
    let NodeCommand::Run {
        plan,
        process,
        run_dir,
    } = cmd;
    let text = std::fs::read_to_string(&plan)
        .with_context(|| format!("reading the plan {}", plan.display()))?;
    let plan: dynamo_graph::Plan = serde_json::from_str(&text)
        .with_context(|| format!("parsing the plan {}", plan.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            on_signal.cancel();
        });
        dynamo_host::process::run(plan, &process, &run_dir, shutdown)
            .await
            .with_context(|| format!("process `{process}`"))
    })?;
    Ok(ExitCode::SUCCESS)
}
