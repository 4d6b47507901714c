//! A graph across machines: `graph up --etcd`, `graph status`, `graph down` (and the
//! helpers `dynamo agent` shares).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use dynamo_graph::Plan;
use dynamo_host::cluster::{self, ProcessState};
use dynamo_runtime::discovery::EtcdClient;

const ETCD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `graph up --etcd` waits for the agents of the plan's machines to register.
const AGENT_WAIT: Duration = Duration::from_secs(10);

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub(crate) fn client(url: &str) -> anyhow::Result<EtcdClient> {
    EtcdClient::new(url, ETCD_TIMEOUT).with_context(|| format!("etcd at {url}"))
}

/// `graph up --etcd`: check every machine has an agent, write the plan, follow the agents'
/// reports until every process is ready (or one fails), then serve until Ctrl-C, which
/// takes the graph down.
/// Where `graph up` serves the graph page: an address (or `off`), and whether the ports
/// after it may be tried when it is taken.
pub struct AdminAddress {
    pub addr: String,
    pub fallback: bool,
}

pub fn up(
    mut plan: Plan,
    url: &str,
    ready_timeout: Duration,
    admin: AdminAddress,
) -> anyhow::Result<ExitCode> {
    let etcd = client(url)?;
    // Processes register their instances there, and callers follow them.
    plan.etcd = Some(url.to_string());
    runtime()?.block_on(async move {
        let t0 = Instant::now();
        // Agents starting beside this command get a moment to register.
        let wait_agents = Instant::now() + AGENT_WAIT;
        let mut told = false;
        loop {
            let agents = cluster::live_agents(&etcd).await?;
            match cluster::check_agents(&plan, &agents) {
                Ok(()) => {
                    // The machines as they are: each agent's address is where its
                    // processes are reached.
                    for m in &mut plan.machines {
                        if let Some(a) = agents.get(&m.name) {
                            if a.address != m.address {
                                eprintln!(
                                    "machine {}: the agent's address {} replaces the file's {}",
                                    m.name, a.address, m.address
                                );
                                m.address = a.address.clone();
                            }
                        }
                    }
                    break;
                }
                Err(e) if Instant::now() > wait_agents => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::from(1));
                }
                Err(e) => {
                    if !told {
                        eprintln!("waiting up to {} s: {e}", AGENT_WAIT.as_secs());
                        told = true;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        if let Err(e) = cluster::publish_plan(&etcd, &plan).await {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
        let (ns, graph) = (plan.namespace.clone(), plan.graph.clone());
        let wanted: Vec<String> = plan.processes.iter().map(|p| p.name.clone()).collect();
        let deadline = Instant::now() + ready_timeout;
        let mut reported: BTreeMap<String, ProcessState> = BTreeMap::new();
        let statuses = loop {
            let s = cluster::statuses(&etcd, &ns, &graph).await?;
            for (p, st) in &s {
                if reported.get(p) != Some(&st.state) {
                    eprintln!("{:<10} {p} on {}", st.state.as_str(), st.machine);
                    reported.insert(p.clone(), st.state);
                }
            }
            if let Some((p, st)) = s.iter().find(|(_, st)| st.state == ProcessState::Failed) {
                eprintln!(
                    "error: process {p} on machine {} failed: {}; taking the graph down",
                    st.machine,
                    st.last_error.as_deref().unwrap_or("no reason given")
                );
                cluster::take_down(&etcd, &ns, &graph).await?;
                return Ok(ExitCode::from(1));
            }
            let ready = wanted
                .iter()
                .all(|p| s.get(p).is_some_and(|st| st.state == ProcessState::Ready));
            if ready {
                break s;
            }
            if Instant::now() > deadline {
                let waiting: Vec<_> = wanted
                    .iter()
                    .filter(|p| !s.get(*p).is_some_and(|st| st.state == ProcessState::Ready))
                    .cloned()
                    .collect();
                eprintln!(
                    "error: not ready within {} s: {}; taking the graph down",
                    ready_timeout.as_secs(),
                    waiting.join(", ")
                );
                cluster::take_down(&etcd, &ns, &graph).await?;
                return Ok(ExitCode::from(1));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        println!(
            "graph `{graph}` is serving on {} machines (ready in {} ms):",
            plan.machines.len(),
            t0.elapsed().as_millis()
        );
        for st in statuses.values() {
            for (replica, url) in &st.http {
                println!("  {replica} on {}: OpenAI API {url}/v1", st.machine);
            }
        }
        let admin_stop = tokio_util::sync::CancellationToken::new();
        // Set up beside the loop below, so a Ctrl-C is heard while it connects.
        tokio::spawn({
            let (plan, stop) = (plan.clone(), admin_stop.clone());
            async move { serve_admin(&plan, &admin, &stop).await }
        });
        println!("Ctrl-C takes it down (`dynamo graph status {graph} --etcd {url}` shows it).");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut follow = Follow {
            plan,
            wanted,
            reported,
            degraded: BTreeMap::new(),
            missing: BTreeMap::new(),
        };
        let mut etcd_down = false;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = tick.tick() => {
                    match follow.tick(&etcd).await {
                        Ok(true) => {
                            eprintln!("graph `{graph}` was taken down");
                            return Ok(ExitCode::SUCCESS);
                        }
                        Ok(false) => {
                            if etcd_down {
                                eprintln!("etcd answers again");
                                etcd_down = false;
                            }
                        }
                        Err(e) => {
                            if !etcd_down {
                                eprintln!("etcd is unreachable ({e}); the graph goes on serving, re-placement waits for it");
                                etcd_down = true;
                            }
                        }
                    }
                }
            }
        }
        admin_stop.cancel();
        eprintln!("taking graph `{graph}` down …");
        cluster::take_down(&etcd, &ns, &graph).await?;
        wait_gone(&etcd, &ns, &graph, Duration::from_secs(60)).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// The graph page of a graph across machines: its processes' metrics come over NATS.
/// The page shows the placement `graph up` made (a re-placed process is scraped where
/// it runs, but drawn where it was first placed).
async fn serve_admin(
    plan: &Plan,
    admin: &AdminAddress,
    stop: &tokio_util::sync::CancellationToken,
) {
    if admin.addr == "off" {
        return;
    }
    if plan.nats.is_none() {
        eprintln!(
            "warning: no graph page: its figures come over NATS, and the graph has no NATS URL"
        );
        return;
    }
    let clients = match dynamo_host::nats::metrics_clients(plan).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warning: no graph page: {e}");
            return;
        }
    };
    crate::cmd::up::serve_graph_page(&admin.addr, admin.fallback, plan, clients, stop).await;
}

/// What `graph up --etcd` keeps track of while the graph serves.
struct Follow {
    plan: Plan,
    wanted: Vec<String>,
    reported: BTreeMap<String, ProcessState>,
    /// Machines whose processes fit nowhere, and why (said once).
    degraded: BTreeMap<String, String>,
    /// Machines without an agent, and for how many ticks in a row.
    missing: BTreeMap<String, u32>,
}

/// Ticks a machine must be missing before its processes move: a lease that expired while
/// etcd itself was away is renewed by its agent within one.
const LOST_AFTER_TICKS: u32 = 2;

impl Follow {
    /// One look at etcd: prints state changes, re-places lost machines. `true` when the
    /// graph was taken down elsewhere (`graph down`).
    async fn tick(&mut self, etcd: &EtcdClient) -> Result<bool, cluster::ClusterError> {
        let (ns, graph) = (self.plan.namespace.clone(), self.plan.graph.clone());
        if cluster::read_plan(etcd, &ns, &graph).await?.is_none() {
            return Ok(true);
        }
        self.replace_lost(etcd).await?;
        let now = cluster::statuses(etcd, &ns, &graph).await?;
        for p in &self.wanted {
            let state = now.get(p).map(|s| s.state);
            if state == self.reported.get(p).copied() {
                continue;
            }
            match now.get(p) {
                Some(st) => eprintln!(
                    "{:<10} {p} on {} (restarts {}{})",
                    st.state.as_str(),
                    st.machine,
                    st.restarts,
                    (st.last_error.as_deref())
                        .map(|e| format!(", last error: {e}"))
                        .unwrap_or_default()
                ),
                None => eprintln!("lost       {p}: its machine's agent stopped reporting"),
            }
            match state {
                Some(s) => self.reported.insert(p.clone(), s),
                None => self.reported.remove(p),
            };
        }
        Ok(false)
    }

    /// Moves the processes of every machine whose agent is gone to another machine; a
    /// machine whose processes fit nowhere leaves the graph degraded.
    async fn replace_lost(&mut self, etcd: &EtcdClient) -> Result<(), cluster::ClusterError> {
        let live = cluster::live_agents(etcd).await?;
        let plan = &mut self.plan;
        let absent: Vec<String> = (plan.machines.iter())
            .filter(|m| !live.contains_key(&m.name))
            .filter(|m| plan.processes.iter().any(|p| p.machine == m.name))
            .map(|m| m.name.clone())
            .collect();
        self.missing.retain(|m, _| absent.contains(m));
        for machine in absent {
            let ticks = self.missing.entry(machine.clone()).or_insert(0);
            *ticks += 1;
            if *ticks < LOST_AFTER_TICKS {
                continue;
            }
            match cluster::replace_lost(plan, &machine, &live) {
                Ok((target, moved)) => {
                    cluster::update_plan(etcd, plan).await?;
                    self.degraded.remove(&machine);
                    eprintln!(
                        "machine {machine} is gone (its agent's lease expired): re-placed {} on {target}",
                        moved.join(", ")
                    );
                }
                Err(why) => {
                    if self.degraded.get(&machine) != Some(&why) {
                        eprintln!(
                            "graph `{}` is degraded: machine {machine} is gone and its processes fit nowhere else ({why})",
                            plan.graph
                        );
                        self.degraded.insert(machine, why);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Waits until no agent reports a process of the graph.
async fn wait_gone(
    etcd: &EtcdClient,
    ns: &str,
    graph: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = cluster::statuses(etcd, ns, graph).await?;
        if left.is_empty() {
            eprintln!("graph `{graph}` is down");
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "processes still reported after {} s: {}",
                timeout.as_secs(),
                left.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `graph status NAME`: each process, its machine, state, restarts and last error.
pub fn status(graph: &str, namespace: &str, url: &str) -> anyhow::Result<ExitCode> {
    let etcd = client(url)?;
    runtime()?.block_on(async move {
        let Some(plan) = cluster::read_plan(&etcd, namespace, graph).await? else {
            eprintln!("graph `{graph}` (namespace `{namespace}`) is not up in {url}");
            return Ok(ExitCode::from(1));
        };
        let statuses = cluster::statuses(&etcd, namespace, graph).await?;
        println!(
            "{:<16} {:<12} {:<11} {:>8}  LAST ERROR",
            "PROCESS", "MACHINE", "STATE", "RESTARTS"
        );
        let mut all_ready = true;
        for p in &plan.processes {
            let (state, restarts, error) = match statuses.get(&p.name) {
                Some(s) => (s.state.as_str(), s.restarts, s.last_error.clone()),
                None => ("unreported", 0, None),
            };
            all_ready &= state == "ready";
            println!(
                "{:<16} {:<12} {:<11} {:>8}  {}",
                p.name,
                p.machine,
                state,
                restarts,
                error.unwrap_or_default()
            );
        }
        Ok(if all_ready {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(3)
        })
    })
}

/// `graph down NAME`: delete its plan; the agents stop its processes.
pub fn down(graph: &str, namespace: &str, url: &str) -> anyhow::Result<ExitCode> {
    let etcd = client(url)?;
    runtime()?.block_on(async move {
        if !cluster::take_down(&etcd, namespace, graph).await? {
            eprintln!("graph `{graph}` (namespace `{namespace}`) is not up in {url}");
            return Ok(ExitCode::from(1));
        }
        wait_gone(&etcd, namespace, graph, Duration::from_secs(60)).await?;
        Ok(ExitCode::SUCCESS)
    })
}
