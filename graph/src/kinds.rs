//! The catalogue of node kinds: their typed ports and their settings. A new kind is one
//! entry in [`KINDS`].

use serde::{Deserialize, Serialize};

use crate::fields::{float, int, Field, Ty, NON_NEGATIVE, POSITIVE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    In,
    Out,
}

/// A call edge carries requests forward and response streams back; a feedback edge is a
/// one-way event stream (KV events) and may close a cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EdgeKind {
    Call,
    Feedback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cardinality {
    Unary,
    Stream,
}

/// Where a port's payload lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Memory {
    Host,
    Cuda,
}

impl Cardinality {
    pub fn as_str(self) -> &'static str {
        match self {
            Cardinality::Unary => "unary",
            Cardinality::Stream => "stream",
        }
    }
}

impl Memory {
    pub fn as_str(self) -> &'static str {
        match self {
            Memory::Host => "host",
            Memory::Cuda => "cuda",
        }
    }
}

/// How a port's memory domain is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemorySpec {
    Host,
    /// Follows the node's `device` setting: `cpu` → host, `cuda` → cuda.
    Device,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    pub name: &'static str,
    pub dir: Direction,
    pub edge: EdgeKind,
    /// The message schema (see `dynamo_protocol`).
    pub schema: &'static str,
    pub cardinality: Cardinality,
    pub memory: MemorySpec,
    pub required: bool,
    /// An output that may feed several edges (a router choosing among pools).
    pub fan_out: bool,
    /// The port used when an edge names only the node.
    pub default: bool,
    pub doc: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KindSpec {
    pub name: &'static str,
    pub doc: &'static str,
    pub ports: &'static [PortSpec],
    pub settings: &'static [Field],
    /// Runs a model: each replica gets its own process and may hold GPUs.
    pub engine: bool,
    /// At least one port of each group must be connected.
    pub require_any: &'static [&'static [&'static str]],
}

impl KindSpec {
    pub fn port(&self, name: &str) -> Option<&'static PortSpec> {
        self.ports.iter().find(|p| p.name == name)
    }

    pub fn default_port(&self, dir: Direction) -> Option<&'static PortSpec> {
        self.ports.iter().find(|p| p.dir == dir && p.default)
    }

    pub fn setting(&self, key: &str) -> Option<&'static Field> {
        self.settings.iter().find(|f| f.key == key)
    }
}

pub const CHAT: &str = "llm.chat/v1";
pub const TOKENS: &str = "llm.tokens/v1";
pub const KV_BLOCKS: &str = "kv.blocks/v2";
pub const KV_EVENTS: &str = "kv.events/v1";

const fn port(
    name: &'static str,
    dir: Direction,
    schema: &'static str,
    cardinality: Cardinality,
    required: bool,
    doc: &'static str,
) -> PortSpec {
    PortSpec {
        name,
        dir,
        edge: EdgeKind::Call,
        schema,
        cardinality,
        memory: MemorySpec::Host,
        required,
        fan_out: false,
        default: false,
        doc,
    }
}

const fn default(p: PortSpec) -> PortSpec {
    PortSpec { default: true, ..p }
}

const fn fan_out(p: PortSpec) -> PortSpec {
    PortSpec { fan_out: true, ..p }
}

const fn on_device(p: PortSpec) -> PortSpec {
    PortSpec {
        memory: MemorySpec::Device,
        ..p
    }
}

const fn feedback(name: &'static str, dir: Direction, doc: &'static str) -> PortSpec {
    PortSpec {
        name,
        dir,
        edge: EdgeKind::Feedback,
        schema: KV_EVENTS,
        cardinality: Cardinality::Stream,
        memory: MemorySpec::Host,
        required: false,
        fan_out: true,
        default: false,
        doc,
    }
}

use Cardinality::{Stream, Unary};
use Direction::{In, Out};

pub const ROUTER_MODES: &[&str] = &["round-robin", "random", "least-loaded", "kv", "kv-approx"];
pub const ENGINES: &[&str] = &[
    "mocker",
    "native",
    "llamacpp",
    "openai",
    "llamacpp-server",
    "vllm",
    "sglang",
    "trtllm",
];
/// Defaults that differ by engine: `(engine, setting, default)`. llama.cpp allocates its
/// whole KV cache (and a logits row per batch token) when it starts, where the other
/// in-process engines reserve address space and use memory as blocks fill.
pub const ENGINE_DEFAULTS: &[(&str, &str, &str)] = &[
    ("llamacpp", "num_blocks", "1024"),
    ("llamacpp", "max_num_seqs", "64"),
    ("llamacpp", "max_batched_tokens", "512"),
];
/// Engines that run as their own OpenAI-compatible server, launched or connected to.
pub const EXTERNAL_ENGINES: &[&str] = &["openai", "llamacpp-server", "vllm", "sglang", "trtllm"];
/// External engines that publish KV events over ZeroMQ (vLLM's `KVEventBatch` format).
pub const ZMQ_EVENT_ENGINES: &[&str] = &["vllm", "sglang"];
/// External engines that need a GPU when we launch them.
pub const GPU_ENGINES: &[&str] = &["vllm", "sglang", "trtllm"];
pub const DEVICES: &[&str] = &["cpu", "cuda"];

const FRONTEND_SETTINGS: &[Field] = &[
    Field::opt(
        "host",
        Ty::Str,
        Some("127.0.0.1"),
        "address the HTTP server binds",
    ),
    Field::opt(
        "port",
        int(0, 65535),
        Some("8000"),
        "HTTP port (0 picks a free one)",
    ),
    Field::opt(
        "max_body_bytes",
        POSITIVE,
        Some("4194304"),
        "largest request body accepted (413 above)",
    ),
    Field::opt(
        "max_inflight",
        POSITIVE,
        Some("4096"),
        "requests served at once before answering 503",
    ),
    Field::opt(
        "request_timeout",
        Ty::Duration,
        Some("\"600s\""),
        "longest time a request may take",
    ),
];

const PREPROCESSOR_SETTINGS: &[Field] = &[Field::req(
    "model",
    Ty::Str,
    "the model (a key of [models]) whose chat template and tokenizer to use",
)];

const ROUTER_SETTINGS: &[Field] = &[
    Field::opt(
        "mode",
        Ty::Enum(ROUTER_MODES),
        Some("\"round-robin\""),
        "how a worker is chosen",
    ),
    Field::opt(
        "overlap_weight",
        float(0.0, f64::INFINITY),
        Some("8.0"),
        "kv modes: weight of blocks to prefill against active decode blocks (higher favours cache hits, lower balance; NVIDIA Dynamo's default is 1.0)",
    ),
    Field::opt(
        "weight_queue_tokens",
        NON_NEGATIVE,
        Some("2048"),
        "kv modes: prefill queued per worker (tokens, the mean over the candidate workers) that adds overlap_weight once more to the weight in effect, so that as queues grow the prefill terms (blocks not cached, prefill queued) count for more against the blocks held for decode (0 = a fixed weight; also the prefill choice of a disaggregated router)",
    ),
    Field::opt(
        "temperature",
        float(0.0, f64::INFINITY),
        Some("0.0"),
        "kv modes: softmax temperature of the choice (0 = always the cheapest)",
    ),
    Field::opt(
        "ttl",
        Ty::Duration,
        Some("\"120s\""),
        "kv-approx: how long a routing decision is assumed cached",
    ),
    Field::opt(
        "index_shards",
        int(1, 64),
        None,
        "kv modes: shards of the KV index, split by worker, each with its own lock: events of workers in different shards apply in parallel, and a lookup visits every shard (default: the machine's cores, at most 4)",
    ),
    Field::opt(
        "migration_limit",
        NON_NEGATIVE,
        Some("3"),
        "times a request whose worker dies mid-stream moves to another worker, which continues it from the prompt plus the tokens already streamed (0: the request fails)",
    ),
    Field::opt(
        "prefill_threshold",
        NON_NEGATIVE,
        Some("0"),
        "disaggregated: prompts shorter than this many tokens are prefilled on the decode worker itself",
    ),
    Field::opt(
        "max_prefill_queue",
        NON_NEGATIVE,
        Some("0"),
        "disaggregated: when every prefill worker has this many prefills in flight, the decode worker prefills itself (0: never)",
    ),
    Field::opt(
        "enforce_disagg",
        Ty::Bool,
        Some("false"),
        "disaggregated: fail requests when no prefill worker is live instead of serving them on a decode worker alone",
    ),
];

const ENGINE_SETTINGS: &[Field] = &[
    Field::req(
        "engine",
        Ty::Enum(ENGINES),
        "the engine that runs the model",
    ),
    Field::req(
        "model",
        Ty::Str,
        "the model (a key of [models]) this worker serves",
    ),
    Field::opt(
        "block_size",
        int(1, 1024),
        Some("16"),
        "tokens per KV-cache block",
    ),
    Field::opt(
        "num_blocks",
        POSITIVE,
        Some("8192"),
        "KV-cache blocks in the pool",
    ),
    Field::opt(
        "max_num_seqs",
        POSITIVE,
        Some("256"),
        "sequences in the running batch at most",
    ),
    Field::opt(
        "max_batched_tokens",
        POSITIVE,
        Some("8192"),
        "token budget of one scheduler step",
    ),
    Field::opt(
        "enable_prefix_caching",
        Ty::Bool,
        Some("true"),
        "reuse cached blocks of equal prefixes",
    ),
    Field::opt(
        "kv_events",
        Ty::Bool,
        Some("true"),
        "publish KV events (stored/removed blocks) on the `events` port",
    ),
    Field::opt(
        "speedup",
        float(0.0, f64::INFINITY),
        Some("1.0"),
        "mocker: divide simulated times by this (inf = instant)",
    ),
    Field::opt(
        "device",
        Ty::Enum(DEVICES),
        Some("\"cpu\""),
        "where the KV cache lives; `cuda` needs gpus >= 1",
    ),
    Field::opt("threads", POSITIVE, Some("1"), "native, llamacpp: compute threads"),
    Field::opt(
        "url",
        Ty::Str,
        None,
        "external engines: base URL of an engine server already running (`http://host:port`); excludes the launch settings",
    ),
    Field::opt(
        "command",
        Ty::Str,
        None,
        "external engines: the program that launches the engine server (default per engine: `vllm`, `python3`, `trtllm-serve`)",
    ),
    Field::opt(
        "extra_args",
        Ty::Str,
        None,
        "external engines: arguments appended to the launch line, split on whitespace; `{port}` and `{model}` are replaced",
    ),
    Field::opt(
        "port",
        int(0, 65535),
        Some("0"),
        "external engines: the port the launched server listens on (0 picks a free one)",
    ),
    Field::opt(
        "ready_timeout",
        Ty::Duration,
        Some("\"600s\""),
        "external engines: how long a launched server may take to answer its health check",
    ),
    Field::opt(
        "kv_events_endpoint",
        Ty::Str,
        None,
        "vllm, sglang: the ZeroMQ endpoint the engine publishes KV events on (`tcp://127.0.0.1:5557`)",
    ),
    Field::opt(
        "kv_events_replay_endpoint",
        Ty::Str,
        None,
        "vllm, sglang: the ZeroMQ endpoint the engine replays missed KV events from (`tcp://127.0.0.1:5558`); without it a lost event clears the worker's blocks in the router",
    ),
    Field::opt(
        "seed",
        NON_NEGATIVE,
        Some("0"),
        "seed of sampling when a request gives none",
    ),
];

/// Every node kind.
pub const KINDS: &[KindSpec] = &[
    KindSpec {
        name: "frontend",
        doc: "OpenAI-compatible HTTP server",
        ports: &[default(port(
            "out",
            Out,
            CHAT,
            Stream,
            true,
            "requests to the preprocessor",
        ))],
        settings: FRONTEND_SETTINGS,
        engine: false,
        require_any: &[],
    },
    KindSpec {
        name: "preprocessor",
        doc: "chat template, tokenization, detokenization and stop strings",
        ports: &[
            default(port("in", In, CHAT, Stream, true, "chat requests")),
            default(port(
                "out",
                Out,
                TOKENS,
                Stream,
                true,
                "token requests to a router or worker",
            )),
        ],
        settings: PREPROCESSOR_SETTINGS,
        engine: false,
        require_any: &[],
    },
    KindSpec {
        name: "router",
        doc: "chooses a worker for each request",
        ports: &[
            default(port("in", In, TOKENS, Stream, true, "token requests")),
            default(fan_out(port(
                "out",
                Out,
                TOKENS,
                Stream,
                false,
                "aggregated workers",
            ))),
            fan_out(port(
                "prefill",
                Out,
                TOKENS,
                Unary,
                false,
                "prefill workers (disaggregated): one answer, the KV hand-off",
            )),
            fan_out(port(
                "decode",
                Out,
                TOKENS,
                Stream,
                false,
                "decode workers (disaggregated)",
            )),
            feedback("events", In, "KV events from the workers"),
        ],
        settings: ROUTER_SETTINGS,
        engine: false,
        require_any: &[&["out", "decode"]],
    },
    KindSpec {
        name: "worker",
        doc: "an aggregated engine: prefill and decode in one place",
        ports: &[
            default(port("in", In, TOKENS, Stream, true, "token requests")),
            feedback("events", Out, "KV events to routers"),
        ],
        settings: ENGINE_SETTINGS,
        engine: true,
        require_any: &[],
    },
    KindSpec {
        name: "prefill",
        doc: "computes a prompt's KV cache and hands it to a decode worker",
        ports: &[
            default(port(
                "in",
                In,
                TOKENS,
                Unary,
                true,
                "prefill requests: the prompt in, one answer out",
            )),
            on_device(port(
                "kv",
                Out,
                KV_BLOCKS,
                Unary,
                true,
                "KV blocks to decode workers",
            )),
            feedback("events", Out, "KV events to routers"),
        ],
        settings: ENGINE_SETTINGS,
        engine: true,
        require_any: &[],
    },
    KindSpec {
        name: "decode",
        doc: "generates tokens from a prompt whose KV cache it received",
        ports: &[
            default(port("in", In, TOKENS, Stream, true, "token requests")),
            on_device(port(
                "kv",
                In,
                KV_BLOCKS,
                Unary,
                false,
                "KV blocks from prefill workers",
            )),
            feedback("events", Out, "KV events to routers"),
        ],
        settings: ENGINE_SETTINGS,
        engine: true,
        require_any: &[],
    },
];

pub fn kind(name: &str) -> Option<&'static KindSpec> {
    KINDS.iter().find(|k| k.name == name)
}

pub fn kind_names() -> impl Iterator<Item = &'static str> + Clone {
    KINDS.iter().map(|k| k.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_is_consistent() {
        for k in KINDS {
            for dir in [In, Out] {
                let defaults = k.ports.iter().filter(|p| p.dir == dir && p.default).count();
                assert!(
                    defaults <= 1,
                    "{} has {defaults} default {dir:?} ports",
                    k.name
                );
            }
            for group in k.require_any {
                for p in *group {
                    assert!(
                        k.port(p).is_some(),
                        "{}: require_any names unknown port {p}",
                        k.name
                    );
                }
            }
            let mut names: Vec<_> = k.ports.iter().map(|p| p.name).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), k.ports.len(), "{} has duplicate ports", k.name);
        }
    }
}
