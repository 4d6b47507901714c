//! What an external-engine worker needs to know, typed: which engine, where it is (or how
//! to launch it), and where its KV events come from.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// The external engines we know how to launch and talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// Any OpenAI-compatible server; no default launch line.
    OpenAi,
    /// llama-cpp-python's server (`python3 -m llama_cpp.server`).
    LlamaCppServer,
    Vllm,
    Sglang,
    TrtLlm,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown external engine `{0}` (openai, llamacpp-server, vllm, sglang, trtllm)")]
pub struct UnknownEngine(pub String);

impl FromStr for EngineKind {
    type Err = UnknownEngine;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "openai" => EngineKind::OpenAi,
            "llamacpp-server" => EngineKind::LlamaCppServer,
            "vllm" => EngineKind::Vllm,
            "sglang" => EngineKind::Sglang,
            "trtllm" => EngineKind::TrtLlm,
            other => return Err(UnknownEngine(other.to_string())),
        })
    }
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::OpenAi => "openai",
            EngineKind::LlamaCppServer => "llamacpp-server",
            EngineKind::Vllm => "vllm",
            EngineKind::Sglang => "sglang",
            EngineKind::TrtLlm => "trtllm",
        }
    }

    /// Whether `/v1/completions` takes a prompt of token ids. vLLM and SGLang do;
    /// llama-cpp-python 0.3.36 types its prompt `str | list[str]`
    /// (`llama_cpp/server/types.py`), so it gets text.
    pub fn accepts_token_ids(self) -> bool {
        matches!(self, EngineKind::Vllm | EngineKind::Sglang)
    }

    /// Whether it publishes vLLM-format KV events over ZeroMQ.
    pub fn publishes_zmq_events(self) -> bool {
        matches!(self, EngineKind::Vllm | EngineKind::Sglang)
    }
}

/// How the worker launches its engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// Overrides the engine's default program.
    pub command: Option<String>,
    /// Whitespace-split, `{port}` and `{model}` replaced.
    pub extra_args: Option<String>,
    /// 0 picks a free one.
    pub port: u16,
    /// The plan's GPU ids for this replica, as `CUDA_VISIBLE_DEVICES`.
    pub gpus: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Where {
    /// A server already running at this base URL.
    Connect(String),
    Launch(Launch),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExternalConfig {
    /// The graph's name for this replica, for logs and the supervised process.
    pub name: String,
    pub kind: EngineKind,
    pub place: Where,
    /// The model file handed to a launched engine.
    pub model_path: PathBuf,
    /// The worker's instance id (KV events carry it).
    pub worker_id: u64,
    /// Tokens per block the router counts in; a launched vLLM/SGLang is given it.
    pub block_size: usize,
    pub block_hash_seed: u64,
    /// Where the engine publishes KV events (`tcp://host:port`); `None`: no events.
    pub kv_events: Option<String>,
    /// Where it replays missed ones (vLLM's `replay_endpoint`); `None`: a gap clears the
    /// worker's blocks instead.
    pub kv_events_replay: Option<String>,
    /// How long a launched engine may take to answer its health check.
    pub ready_timeout: Duration,
}
