//! `dynamo graph up` on one machine: check that NATS answers when an edge goes over it,
//! write the plan where every process can read it, start each planned process under the runtime's supervisor (engines first, so the
//! pipeline finds them), wait until each says it is ready, and stop them all, draining,
//! on request.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dynamo_graph::plan::Plan;
use dynamo_graph::spec::{RestartMode, RestartPolicy as GraphRestart};
use dynamo_runtime::supervisor::{
    OutputStream, ProcessEvent, ProcessSpec, Readiness, RestartPolicy, ShutdownReport, StartError,
    Supervisor,
};
use futures::future::join_all;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::{HTTP_LINE, READY_LINE};

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("this graph spans {0} machines: run `dynamo agent` on each and `dynamo graph up --etcd URL` (see the README, Several machines). `dynamo graph plan` shows the placement")]
    MultiMachine(usize),
    #[error("cannot create the run directory {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the plan: {0}")]
    WritePlan(String),
    #[error(transparent)]
    NoNats(crate::nats::NatsSetupError),
    #[error("edge {edge} goes over NATS, and {source}")]
    Nats {
        edge: String,
        source: dynamo_runtime::transport::nats::NatsError,
    },
    #[error("{0}")]
    Start(Box<StartError>),
}

/// Receives every output line of every process: (process, stream, line).
pub type LogFn = Arc<dyn Fn(&str, OutputStream, &str) + Send + Sync>;

/// How to run the processes.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The `dynamo` binary to run as `dynamo node run …`.
    pub exe: PathBuf,
    /// Sockets, the plan file; removed on shutdown.
    pub run_dir: PathBuf,
    /// How long a process may take to become ready.
    pub ready_timeout: Duration,
    /// Environment for the children (e.g. `DYN_LOG`), passed down explicitly.
    pub env: Vec<(String, String)>,
}

/// What the controller reports while starting.
#[derive(Debug, Clone)]
pub enum Progress {
    Starting {
        process: String,
        replicas: Vec<String>,
    },
    Ready {
        process: String,
        after: Duration,
    },
}

/// A running graph.
pub struct Running {
    pub supervisor: Supervisor,
    pub events: UnboundedReceiver<ProcessEvent>,
    /// `replica -> http://addr` of every frontend.
    pub http: BTreeMap<String, String>,
    pub run_dir: PathBuf,
    pub started_in: Duration,
}

impl Running {
    pub async fn shutdown(self, grace: Duration) -> ShutdownReport {
        let report = self.supervisor.shutdown(grace).await;
        let _ = std::fs::remove_dir_all(&self.run_dir);
        report
    }
}

fn restart_policy(r: &GraphRestart) -> RestartPolicy {
    let base = match r.policy {
        RestartMode::Never => RestartPolicy::never(),
        RestartMode::OnFailure => RestartPolicy::on_failure(r.max_restarts),
        RestartMode::Always => RestartPolicy::always(r.max_restarts),
    };
    base.with_backoff(r.backoff, r.max_backoff)
}

/// Whether `process` runs a replica of an engine kind (worker, prefill, decode).
pub fn is_engine_process(plan: &Plan, process: &str) -> bool {
    plan.process(process).is_some_and(|p| {
        p.replicas
            .iter()
            .filter_map(|r| plan.node(&r.node))
            .any(|n| dynamo_graph::kinds::kind(&n.kind).is_some_and(|k| k.engine))
    })
}

/// Start every process of `plan`. `log` gets each output line of each process (after the
/// controller took the lines meant for it); `progress` gets start and ready reports.
pub async fn up(
    plan: &Plan,
    opts: &UpOptions,
    log: LogFn,
    progress: Arc<dyn Fn(Progress) + Send + Sync>,
) -> Result<Running, UpError> {
    if plan.machines.len() > 1 {
        return Err(UpError::MultiMachine(plan.machines.len()));
    }
    let all: Vec<String> = plan.processes.iter().map(|p| p.name.clone()).collect();
    up_processes(plan, &all, opts, log, progress).await
}

/// Start the processes of `plan` named in `names` (an agent starts those of its machine).
pub async fn up_processes(
    plan: &Plan,
    names: &[String],
    opts: &UpOptions,
    log: LogFn,
    progress: Arc<dyn Fn(Progress) + Send + Sync>,
) -> Result<Running, UpError> {
    let t0 = Instant::now();
    // A NATS server that cannot be reached fails here, once, naming the URL, rather than
    // in every process that would then be restarted until it gives up.
    if let Some(edge) = crate::nats::first_nats_edge(plan) {
        let Some(url) = plan.nats.as_deref() else {
            return Err(UpError::NoNats(crate::nats::NatsSetupError::NoUrl { edge }));
        };
        crate::nats::check_reachable(url)
            .await
            .map_err(|source| UpError::Nats { edge, source })?;
    }
    std::fs::create_dir_all(&opts.run_dir).map_err(|source| UpError::RunDir {
        path: opts.run_dir.clone(),
        source,
    })?;
    let plan_path = opts.run_dir.join("plan.json");
    let json = serde_json::to_vec(plan).map_err(|e| UpError::WritePlan(e.to_string()))?;
    std::fs::write(&plan_path, json)
        .map_err(|e| UpError::WritePlan(format!("{}: {e}", plan_path.display())))?;

    let http: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let sink = {
        let http = http.clone();
        move |process: &str, stream: OutputStream, line: &str| {
            if stream == OutputStream::Stdout {
                if line == READY_LINE {
                    return;
                }
                if let Some(rest) = line.strip_prefix(HTTP_LINE) {
                    let mut parts = rest.split_whitespace();
                    if let (Some(replica), Some(url), Ok(mut h)) =
                        (parts.next(), parts.next(), http.lock())
                    {
                        h.insert(replica.to_string(), url.to_string());
                    }
                    return;
                }
            }
            log(process, stream, line);
        }
    };
    let (supervisor, events) = Supervisor::new(Arc::new(sink));
    let spec = |name: &str| -> ProcessSpec {
        let restart = plan
            .process(name)
            .and_then(|p| p.replicas.first())
            .and_then(|r| plan.node(&r.node))
            .map(|n| restart_policy(&n.restart))
            .unwrap_or_else(|| RestartPolicy::on_failure(5));
        let mut s = ProcessSpec::new(name, &opts.exe)
            .args(["node", "run", "--plan"])
            .args([
                plan_path.display().to_string(),
                "--process".into(),
                name.to_string(),
                "--run-dir".into(),
                opts.run_dir.display().to_string(),
            ])
            .restart(restart)
            .readiness(Readiness::stdout_line(READY_LINE, opts.ready_timeout));
        for (k, v) in &opts.env {
            s = s.env(k.clone(), v.clone());
        }
        s
    };
    // Engines first, all at once; then the rest, all at once.
    let (engines, others): (Vec<_>, Vec<_>) = plan
        .processes
        .iter()
        .map(|p| p.name.clone())
        .filter(|p| names.contains(p))
        .partition(|p| is_engine_process(plan, p));
    for wave in [engines, others] {
        let starts = wave.iter().map(|name| {
            let supervisor = &supervisor;
            let progress = progress.clone();
            let spec = spec(name);
            async move {
                let replicas = plan
                    .process(name)
                    .map(|p| p.replicas.iter().map(|r| r.to_string()).collect())
                    .unwrap_or_default();
                progress(Progress::Starting {
                    process: name.clone(),
                    replicas,
                });
                let t = Instant::now();
                supervisor
                    .start(spec)
                    .await
                    .map_err(|e| UpError::Start(Box::new(e)))?;
                progress(Progress::Ready {
                    process: name.clone(),
                    after: t.elapsed(),
                });
                Ok::<(), UpError>(())
            }
        });
        for r in join_all(starts).await {
            if let Err(e) = r {
                supervisor.shutdown(Duration::from_secs(5)).await;
                let _ = std::fs::remove_dir_all(&opts.run_dir);
                return Err(e);
            }
        }
    }
    let http = http.lock().map(|h| h.clone()).unwrap_or_default();
    Ok(Running {
        supervisor,
        events,
        http,
        run_dir: opts.run_dir.clone(),
        started_in: t0.elapsed(),
    })
}

/// A fresh run directory for one `graph up`, short enough for Unix socket paths.
pub fn run_dir_for(base: &Path, graph: &str) -> PathBuf {
    let safe: String = graph
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(24)
        .collect();
    base.join(format!("dynamo-{safe}-{}", std::process::id()))
}
