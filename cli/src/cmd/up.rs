//! `dynamo graph up`: check the file, plan it, fetch missing models, start every process
//! and serve until Ctrl-C or SIGTERM, then drain and stop.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dynamo_host::controller::{self, Progress, UpOptions};
use dynamo_runtime::supervisor::{EventKind, OutputStream};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio::signal::unix::{signal, SignalKind};

use crate::cmd::graph::{load, local_environment, INVALID};
use crate::cmd::model;

#[derive(clap::Args)]
pub struct UpArgs {
    file: PathBuf,
    /// Override a node setting, e.g. `--set frontend.port=0` (repeatable).
    #[arg(long = "set", value_name = "NODE.KEY=VALUE")]
    sets: Vec<String>,
    /// Seconds in-flight requests get to finish when stopping.
    #[arg(long, default_value_t = 30)]
    grace: u64,
    /// Seconds each process may take to become ready.
    #[arg(long, default_value_t = 120)]
    ready_timeout: u64,
    /// Never download a missing model; fail instead.
    #[arg(long)]
    offline: bool,
    /// Open a chat prompt in the terminal against the graph; Ctrl-D or /quit stops it.
    #[arg(long)]
    interactive: bool,
    /// The NATS server for edges with `transport = "nats"`, e.g. `nats://127.0.0.1:4222`;
    /// overrides `[cluster] nats` in the file.
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// Run the graph on the machines whose `dynamo agent`s registered in this etcd
    /// (`http://HOST:PORT`) instead of on this machine; Ctrl-C takes it down.
    #[arg(long, value_name = "URL")]
    etcd: Option<String>,
    /// The admin server (live graph page, /api/graph, /api/stats for `graph top`), over
    /// the file's `[admin] address`. The default tries 127.0.0.1:9100 and the next nine
    /// ports; port 0 picks any free one; `off` serves none.
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
}

const DEFAULT_ADMIN: &str = "127.0.0.1:9100";

pub fn run(args: UpArgs, dyn_log: Option<String>) -> anyhow::Result<ExitCode> {
    // `--nats` overrides the file's `[cluster] nats` before validation, so edges on NATS
    // count as configured.
    let checked = match (&args.nats, dynamo_graph::read(&args.file)) {
        (Some(url), Ok(file)) => {
            let env = dynamo_graph::Environment {
                nats: Some(url.clone()),
                ..local_environment()
            };
            dynamo_graph::check(file, &env)
        }
        _ => load(&args.file),
    };
    if !checked.diagnostics.items.is_empty() {
        eprint!(
            "{}",
            dynamo_graph::render::render_text(&checked.file, &checked.diagnostics)
        );
    }
    let Some(mut plan) = checked.plan else {
        return Ok(ExitCode::from(INVALID));
    };
    for s in &args.sets {
        if let Err(e) = dynamo_graph::overrides::apply(&mut plan, s) {
            eprintln!("error: --set {s}: {e}");
            return Ok(ExitCode::from(INVALID));
        }
    }
    // The flag, else the file's `[admin]`, else the default.
    let admin = (args.admin.clone())
        .or_else(|| plan.admin.address.clone())
        .unwrap_or_else(|| DEFAULT_ADMIN.to_string());
    if let Some(etcd) = &args.etcd {
        let admin = crate::cmd::cluster::AdminAddress {
            fallback: admin == DEFAULT_ADMIN,
            addr: admin,
        };
        return crate::cmd::cluster::up(plan, etcd, Duration::from_secs(args.ready_timeout), admin);
    }
    model::resolve_plan(&mut plan, args.offline)?;
    let exe = std::env::current_exe().context("finding the dynamo binary")?;
    let opts = UpOptions {
        exe,
        run_dir: controller::run_dir_for(&std::env::temp_dir(), &plan.graph),
        ready_timeout: Duration::from_secs(args.ready_timeout),
        env: dyn_log
            .map(|v| vec![("DYN_LOG".to_string(), v)])
            .unwrap_or_default(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(
        plan,
        opts,
        Duration::from_secs(args.grace),
        args.interactive,
        admin,
    ))
}

async fn serve(
    plan: dynamo_graph::Plan,
    opts: UpOptions,
    grace: Duration,
    interactive: bool,
    admin: String,
) -> anyhow::Result<ExitCode> {
    // Listen before anything starts: a Ctrl-C or SIGTERM that arrives while the graph
    // starts (or just after it says it serves) is then held for the loop below, instead of
    // killing this process with its default action and orphaning what it started.
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let multi = MultiProgress::new();
    let bars: Arc<std::sync::Mutex<std::collections::BTreeMap<String, ProgressBar>>> =
        Arc::default();
    let log = {
        let multi = multi.clone();
        Arc::new(move |process: &str, _stream: OutputStream, line: &str| {
            multi.suspend(|| eprintln!("{process} | {line}"));
        })
    };
    let progress = {
        let (multi, bars) = (multi.clone(), bars.clone());
        Arc::new(move |p: Progress| {
            let Ok(mut bars) = bars.lock() else { return };
            match p {
                Progress::Starting { process, replicas } => {
                    let bar = multi.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template("{spinner} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                    bar.set_message(format!("starting {process} ({})", replicas.join(", ")));
                    bar.enable_steady_tick(Duration::from_millis(100));
                    bars.insert(process, bar);
                }
                Progress::Ready { process, after } => {
                    if let Some(bar) = bars.get(&process) {
                        bar.finish_with_message(format!(
                            "ready    {process} in {} ms",
                            after.as_millis()
                        ));
                    }
                }
            }
        })
    };
    let started = tokio::select! {
        r = controller::up(&plan, &opts, log, progress) => r,
        // Dropping the start kills what it started (the runtime drops the supervisor's
        // tasks, and each child is killed with its task).
        _ = int.recv() => {
            eprintln!("interrupted while starting graph `{}`; stopping", plan.graph);
            return Ok(ExitCode::from(130));
        }
        _ = term.recv() => {
            eprintln!("terminated while starting graph `{}`; stopping", plan.graph);
            return Ok(ExitCode::from(143));
        }
    };
    let mut running = match started {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    println!(
        "graph `{}` is serving (ready in {} ms):",
        plan.graph,
        running.started_in.as_millis()
    );
    for (replica, url) in &running.http {
        println!("  {replica}: OpenAI API {url}/v1   metrics {url}/metrics");
    }
    let admin_stop = tokio_util::sync::CancellationToken::new();
    if admin != "off" {
        let clients = dynamo_host::admin::socket_clients(&plan, &running.run_dir);
        let fallback = admin == DEFAULT_ADMIN;
        serve_graph_page(&admin, fallback, &plan, clients, &admin_stop).await;
    }
    println!("  run directory: {}", running.run_dir.display());
    println!(
        "Ctrl-C stops it (in-flight requests get {} s to finish).",
        grace.as_secs()
    );
    let chat_done = tokio_util::sync::CancellationToken::new();
    if interactive {
        let url = running.http.values().next().cloned().unwrap_or_default();
        let model = plan
            .models
            .first()
            .map(|m| m.served_name.clone())
            .unwrap_or_default();
        let done = chat_done.clone();
        tokio::spawn(async move {
            crate::cmd::chat::repl(&url, &model).await;
            done.cancel();
        });
    }
    let failed = loop {
        tokio::select! {
            _ = int.recv() => break false,
            _ = term.recv() => break false,
            _ = chat_done.cancelled() => break false,
            ev = running.events.recv() => {
                let Some(ev) = ev else { break true };
                match ev.kind {
                    EventKind::Exited { status, stderr_tail } => {
                        eprintln!("process {} exited ({status:?}); last stderr:\n  {}", ev.process, stderr_tail.join("\n  "));
                    }
                    EventKind::Restarting { attempt, delay } => eprintln!("restarting {} (attempt {attempt}) in {} ms", ev.process, delay.as_millis()),
                    EventKind::Ready { attempt } if attempt > 1 => eprintln!("{} is ready again", ev.process),
                    EventKind::GaveUp { reason, .. } => {
                        eprintln!("error: process {} will not be restarted: {reason}; stopping the graph", ev.process);
                        break true;
                    }
                    _ => {}
                }
            }
        }
    };
    eprintln!("stopping graph `{}` …", plan.graph);
    admin_stop.cancel();
    let report = running.shutdown(grace).await;
    eprintln!(
        "stopped: {} processes stopped, {} killed",
        report.stopped.len(),
        report.killed.len()
    );
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Binds the admin address (`fallback`: the next nine ports may be tried), says where the
/// graph page is, and serves it with the figures `clients` reach until `stop`.
pub async fn serve_graph_page(
    addr: &str,
    fallback: bool,
    plan: &dynamo_graph::Plan,
    clients: dynamo_host::admin::MetricsClients,
    stop: &tokio_util::sync::CancellationToken,
) {
    match dynamo_host::admin::bind(addr, fallback).await {
        Ok(listener) => {
            if let Ok(addr) = listener.local_addr() {
                println!("  graph page: http://{addr}/   (dynamo graph top --admin {addr})");
            }
            tokio::spawn(dynamo_host::admin::serve(
                listener,
                plan.clone(),
                clients,
                stop.clone(),
            ));
        }
        Err(e) => eprintln!("warning: {e}; no graph page"),
    }
}
