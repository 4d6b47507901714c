//! `dynamo agent`: one per machine. It registers the machine in etcd under a lease, follows
//! the graphs written there, starts (under the same supervisor as `graph up`) the
//! processes each plan puts on this machine, reports their states under its lease, and
//! stops them when their graph is taken down.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dynamo_graph::plan::Plan;
use dynamo_runtime::discovery::{
    EtcdClient, PrefixWatch, Registration, RegistrationConfig, Snapshot,
};
use dynamo_runtime::supervisor::EventKind;
use tokio_util::sync::CancellationToken;

use crate::cluster::{self, AgentInfo, ProcessState, ProcessStatus, GRAPHS_PREFIX};
use crate::controller::{self, LogFn, Progress, Running, UpOptions};

/// Prepares a plan read from etcd for this machine (e.g. fetches its models and points
/// them at local files); an error fails the graph's processes here with that message.
pub type PrepareFn = Arc<dyn Fn(&mut Plan) -> Result<(), String> + Send + Sync>;

pub struct AgentOptions {
    pub info: AgentInfo,
    /// How long the machine's key (and its processes' states) outlive a silent agent.
    pub ttl: Duration,
    /// The `dynamo` binary, its run directories' parent, readiness timeout, environment.
    pub exe: PathBuf,
    pub run_base: PathBuf,
    pub ready_timeout: Duration,
    pub env: Vec<(String, String)>,
    /// Time in-flight requests get when a graph is taken down.
    pub grace: Duration,
    pub prepare: PrepareFn,
}

/// The states this agent reports, by key, and the keys of stopped processes to delete.
#[derive(Default)]
struct Reports {
    live: BTreeMap<String, ProcessStatus>,
    gone: Vec<String>,
}

type Statuses = Arc<Mutex<Reports>>;

/// One graph's processes on this machine: those started so far, in batches (the first
/// plan's, then any a re-placement adds).
struct Hosted {
    processes: Vec<String>,
    stop: CancellationToken,
    done: Vec<tokio::task::JoinHandle<()>>,
}

/// Runs the agent until `shutdown`; then stops every process it started.
pub async fn run(
    etcd: EtcdClient,
    opts: AgentOptions,
    log: LogFn,
    shutdown: CancellationToken,
) -> Result<(), serde_json::Error> {
    let value = serde_json::to_vec(&opts.info)?;
    let registration = Registration::start(
        etcd.clone(),
        cluster::agent_key(&opts.info.machine),
        value,
        RegistrationConfig {
            ttl: opts.ttl,
            ..RegistrationConfig::default()
        },
    );
    let lease = registration.status();
    let watch = PrefixWatch::start(etcd.clone(), GRAPHS_PREFIX);
    let mut snapshots = watch.snapshots();
    let statuses: Statuses = Arc::default();
    let opts = Arc::new(opts);
    let mut hosted: BTreeMap<String, Hosted> = BTreeMap::new();
    let mut publish = tokio::time::interval(Duration::from_millis(500));
    let mut plans: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut published = Published::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                let snapshot = snapshots.borrow_and_update().clone();
                // The prefix also holds every agent's reports, which change far more
                // often than plans: only a change of plans is reconciled.
                let current = plans_of(&snapshot);
                if current != plans {
                    plans = current;
                    reconcile(&snapshot, &opts, &log, &statuses, &mut hosted);
                }
            }
            _ = publish.tick() => {
                let lease = lease.borrow().lease;
                if let Some(lease) = lease {
                    publish_statuses(&etcd, &statuses, lease, &mut published).await;
                }
            }
        }
    }
    for (_, h) in std::mem::take(&mut hosted) {
        h.stop.cancel();
        for done in h.done {
            let _ = done.await;
        }
    }
    registration.deregister().await;
    Ok(())
}

/// Starts the graphs that gained processes here, stops those taken down.
fn reconcile(
    snapshot: &Snapshot,
    opts: &Arc<AgentOptions>,
    log: &LogFn,
    statuses: &Statuses,
    hosted: &mut BTreeMap<String, Hosted>,
) {
    let mut wanted: BTreeMap<String, Plan> = BTreeMap::new();
    for (key, value) in snapshot.iter() {
        let Some(prefix) = key.strip_suffix("/plan") else {
            continue;
        };
        match serde_json::from_slice::<Plan>(value) {
            Ok(plan)
                if plan
                    .processes
                    .iter()
                    .any(|p| p.machine == opts.info.machine) =>
            {
                wanted.insert(format!("{prefix}/"), plan);
            }
            Ok(_) => {}
            Err(e) => log(
                "agent",
                dynamo_runtime::supervisor::OutputStream::Stderr,
                &format!("{key}: not a plan: {e}"),
            ),
        }
    }
    hosted.retain(|prefix, h| {
        let keep = wanted.contains_key(prefix);
        if !keep {
            h.stop.cancel();
        }
        keep
    });
    for (prefix, plan) in wanted {
        let h = hosted.entry(prefix).or_insert_with(|| Hosted {
            processes: Vec::new(),
            stop: CancellationToken::new(),
            done: Vec::new(),
        });
        let new: Vec<String> = (plan.processes.iter())
            .filter(|p| p.machine == opts.info.machine && !h.processes.contains(&p.name))
            .map(|p| p.name.clone())
            .collect();
        if new.is_empty() {
            continue;
        }
        h.processes.extend(new.iter().cloned());
        h.done.push(tokio::spawn(host_graph(
            plan,
            new,
            opts.clone(),
            log.clone(),
            statuses.clone(),
            h.stop.clone(),
        )));
    }
}

fn set_state(
    statuses: &Statuses,
    plan: &Plan,
    process: &str,
    change: impl FnOnce(&mut ProcessStatus),
    machine: &str,
) {
    let key = cluster::status_key(&plan.namespace, &plan.graph, process);
    if let Ok(mut s) = statuses.lock() {
        let status = s.live.entry(key).or_insert_with(|| ProcessStatus {
            machine: machine.to_string(),
            state: ProcessState::Starting,
            restarts: 0,
            last_error: None,
            http: BTreeMap::new(),
        });
        change(status);
    }
}

/// Runs processes `mine` of a graph until it is taken down (or the agent stops).
async fn host_graph(
    mut plan: Plan,
    mine: Vec<String>,
    opts: Arc<AgentOptions>,
    log: LogFn,
    statuses: Statuses,
    stop: CancellationToken,
) {
    let machine = opts.info.machine.clone();
    for p in &mine {
        set_state(&statuses, &plan, p, |_| {}, &machine);
    }
    let fail_all = |plan: &Plan, message: String| {
        for p in &mine {
            let m = message.clone();
            set_state(
                &statuses,
                plan,
                p,
                |s| {
                    s.state = ProcessState::Failed;
                    s.last_error = Some(m);
                },
                &machine,
            );
        }
    };
    if let Err(e) = (opts.prepare)(&mut plan) {
        fail_all(&plan, e);
        stop.cancelled().await;
        forget(&statuses, &plan);
        return;
    }
    let up_opts = UpOptions {
        exe: opts.exe.clone(),
        run_dir: opts.run_base.join(format!(
            "dynamo-{}-{}-{}",
            machine,
            plan.graph,
            std::process::id()
        )),
        ready_timeout: opts.ready_timeout,
        env: opts.env.clone(),
    };
    let progress = {
        let (statuses, plan, machine) = (statuses.clone(), plan.clone(), machine.clone());
        Arc::new(move |p: Progress| {
            if let Progress::Ready { process, .. } = p {
                set_state(
                    &statuses,
                    &plan,
                    &process,
                    |s| s.state = ProcessState::Ready,
                    &machine,
                );
            }
        })
    };
    let started = tokio::select! {
        r = controller::up_processes(&plan, &mine, &up_opts, log.clone(), progress) => r,
        _ = stop.cancelled() => {
            forget(&statuses, &plan);
            return;
        }
    };
    let mut running: Running = match started {
        Ok(r) => r,
        Err(e) => {
            fail_all(&plan, e.to_string());
            stop.cancelled().await;
            forget(&statuses, &plan);
            return;
        }
    };
    for (replica, url) in &running.http {
        let process = (plan.processes.iter())
            .find(|p| p.replicas.iter().any(|r| r.to_string() == *replica))
            .map(|p| p.name.clone())
            .unwrap_or_default();
        let (r, u) = (replica.clone(), url.clone());
        set_state(
            &statuses,
            &plan,
            &process,
            |s| {
                s.http.insert(r, u);
            },
            &machine,
        );
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            ev = running.events.recv() => {
                let Some(ev) = ev else { break };
                let process = ev.process.clone();
                match ev.kind {
                    EventKind::Exited { status, stderr_tail } => {
                        let m = format!("exited ({status:?}): {}", stderr_tail.last().cloned().unwrap_or_default());
                        set_state(&statuses, &plan, &process, |s| s.last_error = Some(m), &machine);
                    }
                    EventKind::Restarting { .. } => set_state(&statuses, &plan, &process, |s| {
                        s.state = ProcessState::Restarting;
                        s.restarts += 1;
                    }, &machine),
                    EventKind::Ready { .. } => set_state(&statuses, &plan, &process, |s| s.state = ProcessState::Ready, &machine),
                    EventKind::GaveUp { reason, .. } => set_state(&statuses, &plan, &process, |s| {
                        s.state = ProcessState::Failed;
                        s.last_error = Some(reason.to_string());
                    }, &machine),
                    _ => {}
                }
            }
        }
    }
    running.shutdown(opts.grace).await;
    forget(&statuses, &plan);
}

/// Drops a graph's states here; the publisher deletes their keys.
fn forget(statuses: &Statuses, plan: &Plan) {
    let prefix = cluster::status_prefix(&plan.namespace, &plan.graph);
    if let Ok(mut s) = statuses.lock() {
        let gone: Vec<String> = (s.live.keys())
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect();
        for k in &gone {
            s.live.remove(k);
        }
        s.gone.extend(gone);
    }
}

/// The plans in a snapshot of the graphs' prefix, by key.
fn plans_of(snapshot: &Snapshot) -> BTreeMap<String, Vec<u8>> {
    (snapshot.iter())
        .filter(|(k, _)| k.ends_with("/plan"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// What this agent last wrote, and under which lease.
#[derive(Default)]
struct Published {
    lease: i64,
    values: BTreeMap<String, Vec<u8>>,
}

/// Writes the states that changed since the last call (all of them under a new lease),
/// and deletes those of stopped processes.
async fn publish_statuses(
    etcd: &EtcdClient,
    statuses: &Statuses,
    lease: i64,
    published: &mut Published,
) {
    let (gone, current): (Vec<String>, Vec<(String, Vec<u8>)>) = statuses
        .lock()
        .map(|mut s| {
            let current = (s.live.iter())
                .filter_map(|(k, v)| Some((k.clone(), serde_json::to_vec(v).ok()?)))
                .collect();
            (std::mem::take(&mut s.gone), current)
        })
        .unwrap_or_default();
    if published.lease != lease {
        published.lease = lease;
        published.values.clear();
    }
    for key in gone {
        if etcd.delete_prefix(&key).await.is_ok() {
            published.values.remove(&key);
        }
    }
    for (key, value) in current {
        if published.values.get(&key) == Some(&value) {
            continue;
        }
        if etcd.put(&key, &value, lease).await.is_ok() {
            published.values.insert(key, value);
        }
    }
}
