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
}
