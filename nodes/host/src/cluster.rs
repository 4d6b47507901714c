//! A graph across machines, as etcd holds it. Agents register their machine under a lease
//! (`dynamo/agents/<machine>`); `graph up --etcd` writes the plan
//! (`dynamo/graphs/<namespace>/<graph>/plan`); each agent starts the processes the plan puts
//! on its machine and reports each one's state under its own lease
//! (`…/status/<process>`), so the states of a machine that disappears go with it;
//! `graph down` deletes the graph's keys and the agents stop its processes.

use std::collections::BTreeMap;

use dynamo_graph::plan::Plan;
use dynamo_runtime::discovery::{DiscoveryError, EtcdClient};
use serde::{Deserialize, Serialize};

use crate::gpus::{GpuDevice, GpuSource};

pub const AGENTS_PREFIX: &str = "dynamo/agents/";
pub const GRAPHS_PREFIX: &str = "dynamo/graphs/";

pub fn agent_key(machine: &str) -> String {
    format!("{AGENTS_PREFIX}{machine}")
}

/// Every key of one graph.
pub fn graph_prefix(namespace: &str, graph: &str) -> String {
    format!("{GRAPHS_PREFIX}{namespace}/{graph}/")
}

pub fn plan_key(namespace: &str, graph: &str) -> String {
    format!("{}plan", graph_prefix(namespace, graph))
}

pub fn status_prefix(namespace: &str, graph: &str) -> String {
    format!("{}status/", graph_prefix(namespace, graph))
}

pub fn status_key(namespace: &str, graph: &str, process: &str) -> String {
    format!("{}{process}", status_prefix(namespace, graph))
}

/// What an agent says of its machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub machine: String,
    pub address: String,
    pub gpus: u32,
    /// How `gpus` was counted (absent in records of older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_source: Option<GpuSource>,
    /// Each GPU's name and memory, when NVML counted them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_devices: Vec<GpuDevice>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub pid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessState {
    Starting,
    Ready,
    Restarting,
    Failed,
}

impl ProcessState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Restarting => "restarting",
            Self::Failed => "failed",
        }
    }
}

/// What an agent says of one process of a graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStatus {
    pub machine: String,
    pub state: ProcessState,
    pub restarts: u32,
    pub last_error: Option<String>,
    /// `replica -> http://addr` of the frontends it serves.
    #[serde(default)]
    pub http: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Etcd(#[from] DiscoveryError),
    #[error("{key}: not what an agent writes: {message}")]
    Corrupt { key: String, message: String },
    #[error("no agent runs for {}: start `dynamo agent --machine NAME --etcd URL` there (live agents: {})", .missing.join(", "), if .live.is_empty() { "none".to_string() } else { .live.join(", ") })]
    MissingAgents {
        missing: Vec<String>,
        live: Vec<String>,
    },
    #[error("graph `{graph}` (namespace `{namespace}`) is already up in this etcd; `dynamo graph down {graph}` stops it")]
    AlreadyUp { namespace: String, graph: String },
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T, ClusterError> {
    serde_json::from_slice(value).map_err(|e| ClusterError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

/// The machines whose agents are alive, by name.
pub async fn live_agents(etcd: &EtcdClient) -> Result<BTreeMap<String, AgentInfo>, ClusterError> {
    let (kvs, _) = etcd.range_prefix(AGENTS_PREFIX).await?;
    kvs.iter()
        .map(|kv| {
            let info: AgentInfo = decode(&kv.key, &kv.value)?;
            Ok((info.machine.clone(), info))
        })
        .collect()
}

/// Every machine of `plan` must have a live agent.
pub fn check_agents(plan: &Plan, agents: &BTreeMap<String, AgentInfo>) -> Result<(), ClusterError> {
    let missing: Vec<String> = (plan.machines.iter())
        .filter(|m| !agents.contains_key(&m.name))
        .map(|m| m.name.clone())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(ClusterError::MissingAgents {
        missing,
        live: agents.keys().cloned().collect(),
    })
}

/// Writes the plan for the agents; refuses a graph that is already up.
pub async fn publish_plan(etcd: &EtcdClient, plan: &Plan) -> Result<(), ClusterError> {
    let key = plan_key(&plan.namespace, &plan.graph);
    let (existing, _) = etcd.range_prefix(&key).await?;
    if existing.iter().any(|kv| kv.key == key) {
        return Err(ClusterError::AlreadyUp {
            namespace: plan.namespace.clone(),
            graph: plan.graph.clone(),
        });
    }
    let json = serde_json::to_vec(plan).map_err(|e| ClusterError::Corrupt {
        key: key.clone(),
        message: e.to_string(),
    })?;
    etcd.put(&key, &json, 0).await?;
    Ok(())
}

/// The plan of a graph that is up, if any.
pub async fn read_plan(
    etcd: &EtcdClient,
    namespace: &str,
    graph: &str,
) -> Result<Option<Plan>, ClusterError> {
    let key = plan_key(namespace, graph);
    let (kvs, _) = etcd.range_prefix(&key).await?;
    kvs.iter()
        .find(|kv| kv.key == key)
        .map(|kv| decode(&kv.key, &kv.value))
        .transpose()
}

/// What the agents report of a graph's processes, by process.
pub async fn statuses(
    etcd: &EtcdClient,
    namespace: &str,
    graph: &str,
) -> Result<BTreeMap<String, ProcessStatus>, ClusterError> {
    let prefix = status_prefix(namespace, graph);
    let (kvs, _) = etcd.range_prefix(&prefix).await?;
    kvs.iter()
        .map(|kv| {
            let name = kv.key.strip_prefix(&prefix).unwrap_or(&kv.key).to_string();
            Ok((name, decode(&kv.key, &kv.value)?))
        })
        .collect()
}

/// Takes a graph down: its plan and everything under it. Returns whether it was up.
pub async fn take_down(
    etcd: &EtcdClient,
    namespace: &str,
    graph: &str,
) -> Result<bool, ClusterError> {
    let had_plan = read_plan(etcd, namespace, graph).await?.is_some();
    etcd.delete_prefix(&plan_key(namespace, graph)).await?;
    Ok(had_plan)
}

/// Rewrites the plan so the processes of machine `lost` run on one other live machine
/// that every moved replica's placement allows and whose free GPUs hold them (the fewest
/// processes first). Processes move together so the links between them keep working;
/// replicas keep their ids, hence their NATS subjects, so callers need no change.
/// Returns the machine and the moved processes, or why nothing can take them.
pub fn replace_lost(
    plan: &mut Plan,
    lost: &str,
    live: &BTreeMap<String, AgentInfo>,
) -> Result<(String, Vec<String>), String> {
    let moved: Vec<String> = (plan.processes.iter())
        .filter(|p| p.machine == lost)
        .map(|p| p.name.clone())
        .collect();
    let replicas: Vec<usize> = (0..plan.replicas.len())
        .filter(|&i| plan.replicas[i].machine == lost)
        .collect();
    let need_gpus: usize = replicas.iter().map(|&i| plan.replicas[i].gpus.len()).sum();
    let allowed = |m: &dynamo_graph::plan::PlannedMachine| {
        replicas.iter().all(|&i| {
            plan.node(&plan.replicas[i].id.node)
                .is_none_or(|n| n.placement.allows(m))
        })
    };
    let used_gpus = |machine: &str| -> Vec<u32> {
        (plan.replicas.iter())
            .filter(|r| r.machine == machine)
            .flat_map(|r| r.gpus.iter().copied())
            .collect()
    };
    let processes_on = |machine: &str| {
        plan.processes
            .iter()
            .filter(|p| p.machine == machine)
            .count()
    };
    let mut candidates: Vec<(usize, String, Vec<u32>)> = Vec::new();
    let mut refused = Vec::new();
    for m in plan.machines.iter().filter(|m| m.name != lost) {
        if !live.contains_key(&m.name) {
            continue;
        }
        if !allowed(m) {
            refused.push(format!("{}: placement does not allow it", m.name));
            continue;
        }
        let used = used_gpus(&m.name);
        let free: Vec<u32> = (0..m.gpus).filter(|g| !used.contains(g)).collect();
        if free.len() < need_gpus {
            refused.push(format!(
                "{}: {} free GPUs, {need_gpus} needed",
                m.name,
                free.len()
            ));
            continue;
        }
        candidates.push((processes_on(&m.name), m.name.clone(), free));
    }
    candidates.sort();
    let Some((_, target, free)) = candidates.into_iter().next() else {
        return Err(if refused.is_empty() {
            "no other machine has a live agent".to_string()
        } else {
            refused.join("; ")
        });
    };
    let mut free = free.into_iter();
    for &i in &replicas {
        let r = &mut plan.replicas[i];
        r.machine = target.clone();
        r.gpus = (0..r.gpus.len()).filter_map(|_| free.next()).collect();
        r.why = format!("re-placed from lost machine {lost}");
    }
    for p in plan.processes.iter_mut().filter(|p| p.machine == lost) {
        p.machine = target.clone();
    }
    Ok((target, moved))
}

/// Overwrites the plan of a graph that is up (after a re-placement).
pub async fn update_plan(etcd: &EtcdClient, plan: &Plan) -> Result<(), ClusterError> {
    let key = plan_key(&plan.namespace, &plan.graph);
    let json = serde_json::to_vec(plan).map_err(|e| ClusterError::Corrupt {
        key: key.clone(),
        message: e.to_string(),
    })?;
    etcd.put(&key, &json, 0).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_nest_under_the_graph() {
        assert_eq!(plan_key("prod", "g"), "dynamo/graphs/prod/g/plan");
        assert_eq!(
            status_key("prod", "g", "decode-0"),
            "dynamo/graphs/prod/g/status/decode-0"
        );
        assert!(status_key("prod", "g", "x").starts_with(&graph_prefix("prod", "g")));
        assert_eq!(agent_key("gpu-a"), "dynamo/agents/gpu-a");
    }

    #[test]
    fn states_round_trip_as_words() {
        let s = ProcessStatus {
            machine: "m1".into(),
            state: ProcessState::Ready,
            restarts: 2,
            last_error: None,
            http: BTreeMap::new(),
        };
        let json = serde_json::to_string(&s).unwrap_or_default();
        assert!(json.contains(r#""state":"ready""#), "{json}");
        let back: ProcessStatus = serde_json::from_str(&json).expect("round trip");
        assert_eq!(back, s);
    }

    #[test]
    fn an_agent_record_reads_with_or_without_gpu_details() {
        let old = r#"{"machine":"m1","address":"10.0.0.2","gpus":2,"pid":7}"#;
        let info: AgentInfo = serde_json::from_str(old).expect("an older agent's record");
        assert_eq!((info.gpus, info.gpu_source), (2, None));
        assert!(info.gpu_devices.is_empty());
        let new = AgentInfo {
            gpu_source: Some(GpuSource::Nvml),
            gpu_devices: vec![GpuDevice {
                index: 0,
                uuid: "GPU-8d1a4c52-0f1e-2b3c-4d5e-6f708192a3b4".into(),
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_mib: 81559,
            }],
            gpus: 1,
            ..info
        };
        let json = serde_json::to_string(&new).unwrap_or_default();
        assert!(json.contains(r#""gpu_source":"nvml""#), "{json}");
        let back: AgentInfo = serde_json::from_str(&json).expect("round trip");
        assert_eq!(back, new);
    }

    const FOUR: &str = r#"
[graph]
name = "g"
[models.m]
path = "/m.gguf"
[cluster]
nats = "nats://127.0.0.1:4222"
[cluster.machines.edge]
address = "10.0.0.1"
[cluster.machines.a]
address = "10.0.0.2"
gpus = 2
labels = { pool = "w" }
[cluster.machines.b]
address = "10.0.0.3"
gpus = 2
labels = { pool = "w" }
[cluster.machines.c]
address = "10.0.0.4"
gpus = 1
labels = { pool = "w" }
[nodes.frontend]
kind = "frontend"
placement = { machine = "edge" }
[nodes.preprocessor]
kind = "preprocessor"
model = "m"
placement = { machine = "edge" }
[nodes.router]
kind = "router"
placement = { machine = "edge" }
[nodes.worker]
kind = "worker"
engine = "mocker"
model = "m"
replicas = 2
gpus = 2
placement = { labels = { pool = "w" } }
[[edges]]
from = "frontend"
to = "preprocessor"
[[edges]]
from = "preprocessor"
to = "router"
[[edges]]
from = "router"
to = "worker"
"#;

    fn four() -> Plan {
        let c = dynamo_graph::check(
            dynamo_graph::SourceFile::new("g.toml", FOUR),
            &dynamo_graph::Environment::default(),
        );
        let msgs: Vec<String> = c
            .diagnostics
            .items
            .iter()
            .map(|d| d.message.clone())
            .collect();
        c.plan.unwrap_or_else(|| panic!("plan: {msgs:?}"))
    }

    fn agents(names: &[&str]) -> BTreeMap<String, AgentInfo> {
        (names.iter())
            .map(|n| {
                let info = AgentInfo {
                    machine: n.to_string(),
                    address: String::new(),
                    gpus: 0,
                    gpu_source: None,
                    gpu_devices: Vec::new(),
                    labels: BTreeMap::new(),
                    pid: 0,
                };
                (n.to_string(), info)
            })
            .collect()
    }

    #[test]
    fn a_lost_machine_moves_to_one_that_its_placement_and_gpus_allow() {
        let mut plan = four();
        let on = |plan: &Plan, m: &str| -> Vec<String> {
            (plan.replicas.iter())
                .filter(|r| r.machine == m)
                .map(|r| r.id.to_string())
                .collect()
        };
        // The two 2-GPU workers land on a and b (c has one GPU).
        let lost = if on(&plan, "a").is_empty() { "b" } else { "a" };
        let other = if lost == "a" { "b" } else { "a" };
        assert_eq!(on(&plan, lost).len(), 1);
        // c is live but has one GPU; the other worker machine is full; edge lacks the label.
        let err = replace_lost(&mut plan.clone(), lost, &agents(&["edge", "a", "b", "c"]))
            .expect_err("nowhere fits");
        assert!(err.contains("c: 1 free GPUs, 2 needed"), "{err}");
        assert!(err.contains("edge: placement does not allow it"), "{err}");
        assert!(err.contains(&format!("{other}: 0 free GPUs")), "{err}");
        // The edge machine's pinned processes cannot move at all.
        let err =
            replace_lost(&mut plan.clone(), "edge", &agents(&["a", "b", "c"])).expect_err("pinned");
        assert!(err.contains("placement does not allow it"), "{err}");

        // Give c a second GPU: the worker moves there, with GPU ids of c.
        if let Some(c) = plan.machines.iter_mut().find(|m| m.name == "c") {
            c.gpus = 2;
        }
        let moved_replica = on(&plan, lost);
        let (target, processes) =
            replace_lost(&mut plan, lost, &agents(&["edge", "a", "b", "c"])).expect("moves");
        assert_eq!(target, "c");
        assert_eq!(processes.len(), 1);
        assert_eq!(on(&plan, "c"), moved_replica);
        assert!(on(&plan, lost).is_empty());
        let r = plan
            .replicas
            .iter()
            .find(|r| r.machine == "c")
            .expect("moved");
        assert_eq!(r.gpus, vec![0, 1]);
        assert!(plan.processes.iter().all(|p| p.machine != lost));
    }
}
