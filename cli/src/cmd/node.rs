//! `dynamo node run`: one planned process, started by `graph up` (or an agent later).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use tokio_util::sync::CancellationToken;

/// How long a process whose supervisor died drains before it exits anyway: the grace
/// the supervisor would have enforced (then SIGKILL) died with it.
const ORPHAN_DRAIN: Duration = Duration::from_secs(2);

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
    // The supervisor that started this process; SIGTERM while another is the parent
    // means it died (the kernel's parent-death signal, see the runtime's supervisor).
    let parent = nix::unistd::getppid();
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let on_signal = shutdown.clone();
        let process_name = process.clone();
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
            if nix::unistd::getppid() != parent {
                exit_after_drain(&process_name);
            }
            on_signal.cancel();
        });
        dynamo_host::process::run(plan, &process, &run_dir, shutdown)
            .await
            .with_context(|| format!("process `{process}`"))
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The supervisor is gone: drain as on any stop, but exit after [`ORPHAN_DRAIN`] at the
/// latest. A plain thread keeps the bound even if the runtime is stuck.
fn exit_after_drain(process: &str) {
    // Its stderr may be a pipe nobody reads any more: errors are ignored, not panics.
    let _ = writeln!(
        std::io::stderr(),
        "process `{process}`: its supervisor died; draining for at most {} s",
        ORPHAN_DRAIN.as_secs()
    );
    let process = process.to_string();
    let watchdog = std::thread::Builder::new()
        .name("orphan-watchdog".into())
        .spawn(move || {
            std::thread::sleep(ORPHAN_DRAIN);
            let _ = writeln!(
                std::io::stderr(),
                "process `{process}`: still draining after {} s; exiting",
                ORPHAN_DRAIN.as_secs()
            );
            std::process::exit(1);
        });
    if watchdog.is_err() {
        std::process::exit(1);
    }
}
