//! An external engine replica (vLLM, SGLang, TensorRT-LLM, llama.cpp's server, any
//! OpenAI-compatible server) from its planned settings.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dynamo_engines::{EngineKind, ExternalConfig, ExternalEngine, Launch, Where};
use dynamo_graph::plan::{PlannedNode, PlannedReplica};
use dynamo_preprocessor::gguf::GgufFile;
use dynamo_preprocessor::tokenizer::Tokenizer;
use dynamo_protocol::DEFAULT_BLOCK_HASH_SEED;

use crate::endpoints::instance_id;
use crate::nodes::{invalid, BuildError};

/// The tokenizer of a GGUF model file; `None` for other model sources (a vLLM model
/// directory), where only engines that take and return token ids can serve.
fn tokenizer(model_file: &Path) -> Option<Arc<Tokenizer>> {
    let gguf = GgufFile::open(model_file).ok()?;
    Tokenizer::from_gguf(&gguf).ok().map(Arc::new)
}

pub async fn start(
    node: &PlannedNode,
    replica: &PlannedReplica,
    model_file: &Path,
) -> Result<Arc<ExternalEngine>, BuildError> {
    let kind: EngineKind = node
        .str("engine")
        .unwrap_or_default()
        .parse()
        .map_err(|e| invalid(node, e))?;
    let place = match node.str("url") {
        Some(url) => Where::Connect(url.to_string()),
        None => Where::Launch(Launch {
            command: node.str("command").map(str::to_string),
            extra_args: node.str("extra_args").map(str::to_string),
            port: node
                .u64("port")
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(0),
            gpus: replica.gpus.clone(),
        }),
    };
    let kv_events = node
        .str("kv_events_endpoint")
        .filter(|_| node.bool("kv_events").unwrap_or(true) && kind.publishes_zmq_events())
        .map(str::to_string);
    let kv_events_replay = node
        .str("kv_events_replay_endpoint")
        .filter(|_| kv_events.is_some())
        .map(str::to_string);
    let config = ExternalConfig {
        name: replica.id.to_string(),
        kind,
        place,
        model_path: model_file.to_path_buf(),
        worker_id: instance_id(&replica.id),
        block_size: node
            .u64("block_size")
            .and_then(|v| usize::try_from(v).ok())
            .unwrap_or(16),
        block_hash_seed: DEFAULT_BLOCK_HASH_SEED,
        kv_events,
        kv_events_replay,
        ready_timeout: node
            .str("ready_timeout")
            .and_then(|s| humantime::parse_duration(s).ok())
            .unwrap_or(Duration::from_secs(600)),
    };
    ExternalEngine::start(config, tokenizer(model_file))
        .await
        .map_err(|e| invalid(node, e))
}
