//! Runs the processes a plan asks for: captures their output, waits for readiness,
//! restarts them with backoff per their policy, reports events, and shuts them all down
//! (SIGTERM to each process group, SIGKILL after a grace period). On Linux a supervisor
//! that dies abruptly (SIGKILL, a crash) takes its processes with it: each gets SIGTERM
//! from the kernel and drains, rather than serving on as an orphan.
//!
//! ```no_run
//! # async fn run() -> Result<(), dynamo_runtime::supervisor::StartError> {
//! use std::{sync::Arc, time::Duration};
//! use dynamo_runtime::supervisor::*;
//! let (supervisor, mut events) = Supervisor::new(Arc::new(TracingSink));
//! let spec = ProcessSpec::new("decode/1", "/usr/bin/dynamo")
//!     .args(["node", "decode"])
//!     .restart(RestartPolicy::on_failure(5))
//!     .readiness(Readiness::stdout_line("DYNAMO_READY", Duration::from_secs(30)));
//! supervisor.start(spec).await?; // Ok once ready; Err names the process, cause, stderr
//! tokio::spawn(async move { while let Some(ev) = events.recv().await { println!("{ev:?}") } });
//! let report = supervisor.shutdown(Duration::from_secs(10)).await;
//! # let _ = report; Ok(()) }
//! ```

mod child;
pub mod cuda_visible;
mod events;
mod spawner;
mod spec;

pub use events::{
    write_tail, EventKind, ExitInfo, FailureCause, LogSink, OutputStream, ProcessEvent,
    ShutdownReport, StartError, TracingSink,
};
pub use spec::{ProcessSpec, Readiness, ReadinessCheck, RestartMode, RestartPolicy};

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use child::{lock, NotReady, Running};

/// Supervises a set of named processes. Cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    shared: Arc<Shared>,
}

struct Shared {
    sink: Arc<dyn LogSink>,
    events: mpsc::UnboundedSender<ProcessEvent>,
    shutdown: CancellationToken,
    processes: Mutex<BTreeMap<String, Supervised>>,
    report: Mutex<ShutdownReport>,
}

/// One process under supervision, as the supervisor's handle sees it.
struct Supervised {
    stop: Arc<StopSignal>,
    monitor: Option<JoinHandle<()>>,
}

/// Tells one monitor to stop its process, and how long SIGTERM may take.
struct StopSignal {
    token: CancellationToken,
    grace: Mutex<Duration>,
}

impl Shared {
    fn emit(&self, process: &str, kind: EventKind) {
        // Nobody listening is fine: events are a report, not a control channel.
        let _ = self.events.send(ProcessEvent {
            process: process.to_string(),
            kind,
        });
    }
}

impl Supervisor {
    /// A supervisor whose processes' output goes to `sink`; events arrive on the receiver.
    pub fn new(sink: Arc<dyn LogSink>) -> (Self, mpsc::UnboundedReceiver<ProcessEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            sink,
            events,
            shutdown: CancellationToken::new(),
            processes: Mutex::new(BTreeMap::new()),
            report: Mutex::new(ShutdownReport::default()),
        });
        (Supervisor { shared }, rx)
    }

    /// Starts supervising `spec` and resolves once it is first ready. Restarts before that
    /// follow the policy; if it gives up first, the error names the process, the cause
    /// and its last stderr lines. After `Ok` the process keeps being supervised.
    pub async fn start(&self, spec: ProcessSpec) -> Result<(), StartError> {
        let fail = |cause| StartError {
            process: spec.name.clone(),
            cause,
            stderr_tail: Vec::new(),
        };
        if self.shared.shutdown.is_cancelled() {
            return Err(fail(FailureCause::ShuttingDown));
        }
        let stop = Arc::new(StopSignal {
            token: self.shared.shutdown.child_token(),
            grace: Mutex::new(Duration::from_secs(10)),
        });
        {
            let mut processes = lock(&self.shared.processes);
            if processes.contains_key(&spec.name) {
                return Err(fail(FailureCause::DuplicateName));
            }
            let entry = Supervised {
                stop: stop.clone(),
                monitor: None,
            };
            processes.insert(spec.name.clone(), entry);
        }
        let name = spec.name.clone();
        let (ready_tx, ready_rx) = oneshot::channel();
        let handle = tokio::spawn(monitor(spec, self.shared.clone(), stop, ready_tx));
        if let Some(entry) = lock(&self.shared.processes).get_mut(&name) {
            entry.monitor = Some(handle);
        }
        match ready_rx.await {
            Ok(result) => result,
            Err(_) => Err(StartError {
                process: name,
                cause: FailureCause::ShuttingDown,
                stderr_tail: Vec::new(),
            }),
        }
    }

    /// Names of the processes under supervision (running, starting or backing off).
    pub fn processes(&self) -> Vec<String> {
        lock(&self.shared.processes).keys().cloned().collect()
    }

    /// Stops one process (SIGTERM, SIGKILL after `grace`) without restarting it; the
    /// `Stopped` event says how it went. Returns whether it was supervised.
    pub async fn stop(&self, name: &str, grace: Duration) -> bool {
        let (stop, monitor) = {
            let mut processes = lock(&self.shared.processes);
            let Some(entry) = processes.get_mut(name) else {
                return false;
            };
            (entry.stop.clone(), entry.monitor.take())
        };
        *lock(&stop.grace) = grace;
        stop.token.cancel();
        if let Some(m) = monitor {
            await_monitor(m, grace).await;
        }
        true
    }

    /// Stops restarting, sends SIGTERM to every process group, waits up to `grace`, then
    /// sends SIGKILL to what is left.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let monitors: Vec<_> = lock(&self.shared.processes)
            .values_mut()
            .filter_map(|entry| {
                *lock(&entry.stop.grace) = grace;
                entry.monitor.take()
            })
            .collect();
        self.shared.shutdown.cancel();
        for m in monitors {
            await_monitor(m, grace).await;
        }
        let mut report = std::mem::take(&mut *lock(&self.shared.report));
        report.stopped.sort();
        report.killed.sort();
        report
    }
}

/// Bounded: after the grace a monitor only waits for SIGKILL to take effect.
async fn await_monitor(monitor: JoinHandle<()>, grace: Duration) {
    if tokio::time::timeout(grace + Duration::from_secs(5), monitor)
        .await
        .is_err()
    {
        tracing::error!("a supervised process did not die after SIGKILL");
    }
}

type ReadySender = oneshot::Sender<Result<(), StartError>>;

/// How one run of a process ended.
enum RunEnd {
    /// Shutdown stopped it; the monitor ends.
    Stopped,
    Failed {
        cause: FailureCause,
        succeeded: bool,
        stderr_tail: Vec<String>,
    },
}

async fn monitor(
    spec: ProcessSpec,
    shared: Arc<Shared>,
    stop: Arc<StopSignal>,
    ready: ReadySender,
) {
    let mut ready = Some(ready);
    let mut restarts: VecDeque<Instant> = VecDeque::new();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        shared.emit(&spec.name, EventKind::Starting { attempt });
        let (cause, succeeded, stderr_tail) =
            match run_once(&spec, attempt, &shared, &stop, &mut ready).await {
                RunEnd::Stopped => break,
                RunEnd::Failed {
                    cause,
                    succeeded,
                    stderr_tail,
                } => (cause, succeeded, stderr_tail),
            };
        if stop.token.is_cancelled() {
            break;
        }
        let policy = &spec.restart;
        let now = Instant::now();
        while restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.reset_window)
        {
            restarts.pop_front();
        }
        if !policy.wants_restart(succeeded) || restarts.len() >= policy.max_restarts as usize {
            let cause = if policy.wants_restart(succeeded) {
                FailureCause::GaveUp {
                    restarts: restarts.len() as u32,
                    last: Box::new(cause),
                }
            } else {
                cause
            };
            if !succeeded || policy.wants_restart(succeeded) {
                let reason = format!("{cause}");
                shared.emit(
                    &spec.name,
                    EventKind::GaveUp {
                        reason,
                        stderr_tail: stderr_tail.clone(),
                    },
                );
            }
            if let Some(tx) = ready.take() {
                let _ = tx.send(Err(StartError {
                    process: spec.name.clone(),
                    cause,
                    stderr_tail,
                }));
            }
            break;
        }
        let delay = policy.delay(restarts.len() as u32, fastrand::f64());
        restarts.push_back(now);
        shared.emit(
            &spec.name,
            EventKind::Restarting {
                attempt: attempt + 1,
                delay,
            },
        );
        tokio::select! {
            _ = stop.token.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    lock(&shared.processes).remove(&spec.name);
}

async fn run_once(
    spec: &ProcessSpec,
    attempt: u32,
    shared: &Shared,
    signal: &StopSignal,
    ready: &mut Option<ReadySender>,
) -> RunEnd {
    let mut running = match Running::spawn(spec, shared.sink.clone()).await {
        Ok(r) => r,
        Err(cause) => {
            return RunEnd::Failed {
                cause,
                succeeded: false,
                stderr_tail: Vec::new(),
            }
        }
    };
    let readiness = tokio::select! {
        _ = signal.token.cancelled() => return stop_process(spec, &mut running, shared, signal).await,
        r = running.wait_ready(spec) => r,
    };
    let not_ready = match readiness {
        Ok(()) => None,
        Err(NotReady::Exited(status)) => Some((FailureCause::ExitedBeforeReady(status), status)),
        Err(NotReady::Timeout) => {
            let status = running.kill().await;
            let check = spec.readiness.check.to_string();
            Some((
                FailureCause::NotReady(spec.readiness.timeout, check),
                status,
            ))
        }
    };
    if let Some((cause, status)) = not_ready {
        let stderr_tail = running.stderr_tail();
        shared.emit(
            &spec.name,
            EventKind::Exited {
                status,
                stderr_tail: stderr_tail.clone(),
            },
        );
        // Exiting cleanly before readiness is still a failure to start.
        return RunEnd::Failed {
            cause,
            succeeded: false,
            stderr_tail,
        };
    }
    shared.emit(&spec.name, EventKind::Ready { attempt });
    if let Some(tx) = ready.take() {
        let _ = tx.send(Ok(()));
    }
    let status = tokio::select! {
        _ = signal.token.cancelled() => return stop_process(spec, &mut running, shared, signal).await,
        s = running.wait() => s,
    };
    let stderr_tail = running.stderr_tail();
    shared.emit(
        &spec.name,
        EventKind::Exited {
            status,
            stderr_tail: stderr_tail.clone(),
        },
    );
    RunEnd::Failed {
        cause: FailureCause::Exited(status),
        succeeded: status.success(),
        stderr_tail,
    }
}

async fn stop_process(
    spec: &ProcessSpec,
    running: &mut Running,
    shared: &Shared,
    signal: &StopSignal,
) -> RunEnd {
    let grace = *lock(&signal.grace);
    let (status, killed) = running.terminate(grace).await;
    shared.emit(&spec.name, EventKind::Stopped { status, killed });
    if !shared.shutdown.is_cancelled() {
        // Stopped one by one with `stop`: the event is the report.
        return RunEnd::Stopped;
    }
    let mut report = lock(&shared.report);
    if killed {
        report.killed.push(spec.name.clone());
    } else {
        report.stopped.push(spec.name.clone());
    }
    RunEnd::Stopped
}
