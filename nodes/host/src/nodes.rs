//! Building one replica of each node kind from its planned settings.

use std::path::Path;
use std::sync::Arc;

use dynamo_frontend::{Frontend, FrontendConfig};
use dynamo_graph::plan::{PlannedModel, PlannedNode, PlannedReplica};
use dynamo_mocker::{MockerConfig, MockerEngine};
use dynamo_preprocessor::gguf::GgufFile;
use dynamo_preprocessor::{Preprocessor, PreprocessorConfig, PreprocessorService};
use dynamo_protocol::{ChatRequest, TextDelta, TokenDelta, TokenRequest};
use dynamo_protocol::{PrefillRequest, PrefillResult};
use dynamo_router::{
    DisaggConfig, DisaggRouter, KvConfig, KvMode, KvRouterHandle, LeastLoaded, Policy, RouterMode,
    RouterService, DEFAULT_MIGRATION_LIMIT,
};
use dynamo_runtime::{InstanceSet, Service};

use dynamo_engines::EngineKind;
use dynamo_protocol::{KvStreamItem, KvSubscribe};

use crate::endpoints::instance_id;
use crate::events::EventsService;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{node}: {what} is not implemented yet ({issue})")]
    NotYet {
        node: String,
        what: String,
        issue: &'static str,
    },
    #[error("{node}: {message}")]
    Invalid { node: String, message: String },
}

pub(crate) fn invalid(node: &PlannedNode, message: impl std::fmt::Display) -> BuildError {
    BuildError::Invalid {
        node: node.name.clone(),
        message: message.to_string(),
    }
}

/// The model a node names, with its file resolved by the controller.
pub fn model_of<'p>(
    node: &PlannedNode,
    models: &'p [PlannedModel],
) -> Result<&'p PlannedModel, BuildError> {
    let name = node
        .str("model")
        .ok_or_else(|| invalid(node, "no `model` setting"))?;
    models
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| invalid(node, format!("unknown model `{name}`")))
}

pub fn model_path<'p>(node: &PlannedNode, model: &'p PlannedModel) -> Result<&'p Path, BuildError> {
    match &model.source {
        Some(dynamo_graph::spec::ModelSource::Path(p)) => Ok(Path::new(p)),
        _ => Err(invalid(
            node,
            format!("model `{}` was not resolved to a file", model.name),
        )),
    }
}

/// A mocker worker. Its vocabulary comes from the model file, so its output tokens are
/// real ids of the model.
pub fn mocker(
    node: &PlannedNode,
    replica: &PlannedReplica,
    model_file: &Path,
) -> Result<MockerEngine, BuildError> {
    let gguf = GgufFile::open(model_file)
        .map_err(|e| invalid(node, format!("reading {}: {e}", model_file.display())))?;
    let types = gguf
        .opt_int_array("tokenizer.ggml.token_type")
        .map_err(|e| invalid(node, e))?
        .unwrap_or_default();
    let vocab = gguf
        .str_array("tokenizer.ggml.tokens")
        .map_err(|e| invalid(node, e))?
        .len();
    // Control tokens (type 3) are never ordinary output.
    let special: Vec<u32> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == 3)
        .filter_map(|(i, _)| u32::try_from(i).ok())
        .collect();
    let usize_of = |key: &str, default: usize| {
        node.u64(key)
            .and_then(|v| usize::try_from(v).ok())
            .unwrap_or(default)
    };
    let config = MockerConfig {
        worker_id: instance_id(&replica.id),
        kv_layout: kv_layout(&gguf),
        block_size: usize_of("block_size", 16),
        num_blocks: usize_of("num_blocks", 8192),
        max_num_seqs: usize_of("max_num_seqs", 256),
        max_batched_tokens: usize_of("max_batched_tokens", 8192),
        enable_prefix_caching: node.bool("enable_prefix_caching").unwrap_or(true),
        speedup: node.f64("speedup").unwrap_or(1.0),
        vocab_size: u32::try_from(vocab).map_err(|_| invalid(node, "vocabulary too large"))?,
        special_token_ids: special,
        seed: node.u64("seed").unwrap_or(0),
        // The KV pool on the replica's GPU (its plan GPU ids arrive as CUDA_VISIBLE_DEVICES).
        kv_on_gpu: node.str("device") == Some("cuda"),
        ..MockerConfig::default()
    };
    MockerEngine::start(config).map_err(|e| invalid(node, e))
}

/// The settings the in-process engines with a real model share (native, llamacpp).
fn model_engine_config(
    node: &PlannedNode,
    replica: &PlannedReplica,
    model_file: &Path,
) -> dynamo_native::NativeConfig {
    let mut config = dynamo_native::NativeConfig::new(model_file);
    let usize_of = |key: &str| node.u64(key).and_then(|v| usize::try_from(v).ok());
    config.worker_id = instance_id(&replica.id);
    config.threads = usize_of("threads").unwrap_or(1);
    if let Some(v) = usize_of("block_size") {
        config.block_size = v;
    }
    if let Some(v) = usize_of("num_blocks") {
        config.num_blocks = v;
    }
    if let Some(v) = usize_of("max_num_seqs") {
        config.max_num_seqs = v;
    }
    if let Some(v) = usize_of("max_batched_tokens") {
        config.max_batched_tokens = v;
    }
    config.enable_prefix_caching = node.bool("enable_prefix_caching").unwrap_or(true);
    config.seed = node.u64("seed").unwrap_or(0);
    config
}

/// A native worker: the model computed in this process over a paged KV pool, scheduled by
/// the same engine shell as the mocker.
pub fn native(
    node: &PlannedNode,
    replica: &PlannedReplica,
    model_file: &Path,
) -> Result<MockerEngine, BuildError> {
    dynamo_native::start(&model_engine_config(node, replica, model_file))
        .map_err(|e| invalid(node, e))
}

/// The engines of the graph format this binary was built without (cargo features).
pub fn missing_engines() -> Vec<String> {
    if cfg!(feature = "llamacpp") {
        Vec::new()
    } else {
        vec!["llamacpp".to_string()]
    }
}

/// A llama.cpp worker: the model computed in this process by llama.cpp, scheduled by the
/// same engine shell as the mocker and the native engine.
#[cfg(feature = "llamacpp")]
pub fn llamacpp(
    node: &PlannedNode,
    replica: &PlannedReplica,
    model_file: &Path,
) -> Result<MockerEngine, BuildError> {
    dynamo_llamacpp::start(&model_engine_config(node, replica, model_file))
        .map_err(|e| invalid(node, e))
}

/// Without the `llamacpp` feature there is no llama.cpp in this binary (validation says
/// so before anything starts; this is the check at build time).
#[cfg(not(feature = "llamacpp"))]
pub fn llamacpp(
    node: &PlannedNode,
    _replica: &PlannedReplica,
    _model_file: &Path,
) -> Result<MockerEngine, BuildError> {
    Err(invalid(node, dynamo_graph::LLAMACPP_MISSING))
}

/// The KV layout of a llama-family GGUF (f16 KV), for the size of handed-over blocks.
fn kv_layout(gguf: &GgufFile) -> dynamo_protocol::KvLayout {
    let arch = gguf
        .opt_str("general.architecture")
        .ok()
        .flatten()
        .unwrap_or("llama")
        .to_string();
    let get = |key: &str| {
        gguf.opt_u64(&format!("{arch}.{key}"))
            .ok()
            .flatten()
            .and_then(|v| u32::try_from(v).ok())
    };
    let mut layout = dynamo_mocker::SMOLLM2_135M_KV_LAYOUT;
    if let (Some(layers), Some(heads), Some(embd)) = (
        get("block_count"),
        get("attention.head_count"),
        get("embedding_length"),
    ) {
        layout.layers = layers;
        layout.kv_heads = get("attention.head_count_kv").unwrap_or(heads);
        layout.head_dim = embd.checked_div(heads).unwrap_or(layout.head_dim);
    }
    layout.block_size = 0; // follows the engine's block_size
    layout
}

/// An input port that takes token requests.
pub type TokenService = Arc<dyn Service<TokenRequest, TokenDelta>>;

/// An engine replica, built: its `in` and `events` ports, and the in-process engine behind
/// them when there is one (prefill hand-off, KV import and metrics need it).
pub struct BuiltEngine {
    pub svc: TokenService,
    pub events: Arc<dyn Service<KvSubscribe, KvStreamItem>>,
    pub in_process: Option<Arc<MockerEngine>>,
}

impl BuiltEngine {
    fn in_process(engine: Arc<MockerEngine>) -> Self {
        BuiltEngine {
            svc: engine.clone(),
            events: Arc::new(EventsService::new(engine.clone())),
            in_process: Some(engine),
        }
    }

    /// The in-process engine a prefill or decode role needs (validation keeps external
    /// engines out of those roles; this is the check at build time).
    pub fn engine_for(&self, node: &PlannedNode) -> Result<Arc<MockerEngine>, BuildError> {
        self.in_process.clone().ok_or_else(|| {
            invalid(
                node,
                "an external engine can only be an aggregated worker (kind = \"worker\")",
            )
        })
    }
}

/// An engine replica of any kind (worker, prefill, decode): the mocker, the native engine,
/// or an external engine server (launched, or connected to; waits until it serves).
pub async fn engine(
    node: &PlannedNode,
    replica: &PlannedReplica,
    model_file: &Path,
) -> Result<BuiltEngine, BuildError> {
    match node.str("engine") {
        Some("mocker") => Ok(BuiltEngine::in_process(Arc::new(mocker(
            node, replica, model_file,
        )?))),
        Some("native") => Ok(BuiltEngine::in_process(Arc::new(native(
            node, replica, model_file,
        )?))),
        Some("llamacpp") => Ok(BuiltEngine::in_process(Arc::new(llamacpp(
            node, replica, model_file,
        )?))),
        Some(name) if name.parse::<EngineKind>().is_ok() => {
            let engine = crate::external::start(node, replica, model_file).await?;
            Ok(BuiltEngine {
                svc: engine.clone(),
                events: Arc::new(engine.events()),
                in_process: None,
            })
        }
        other => Err(invalid(
            node,
            format!("unknown engine `{}`", other.unwrap_or("?")),
        )),
    }
}

/// A router; KV-aware modes also return the state their workers' events feed.
pub fn router(
    node: &PlannedNode,
    worker_block_size: Option<usize>,
    workers: Arc<InstanceSet<TokenRequest, TokenDelta>>,
) -> Result<(TokenService, Option<KvRouterHandle>), BuildError> {
    let mode_name = node.str("mode").unwrap_or("round-robin");
    let mode: RouterMode = mode_name.parse().map_err(|e| invalid(node, e))?;
    let migration = migration_limit(node);
    let Some(kv) = mode.kv_mode() else {
        return Ok((
            Arc::new(
                RouterService::new(mode, workers)
                    .named(node.name.clone())
                    .migration_limit(migration),
            ),
            None,
        ));
    };
    let mut config = KvConfig::for_mode(kv);
    if let Some(b) = worker_block_size {
        config.block_size = b;
    }
    kv_settings(node, &mut config);
    // `ttl` is the graph's knob for kv-approx; `kv` keeps its short prediction window.
    if kv == KvMode::Approx {
        if let Some(d) = node
            .str("ttl")
            .and_then(|s| humantime::parse_duration(s).ok())
        {
            config.ttl = d;
        }
    }
    let svc = RouterService::with_kv(kv, config, workers)
        .map_err(|e| invalid(node, e))?
        .named(node.name.clone())
        .migration_limit(migration);
    let handle = svc.kv_handle();
    Ok((Arc::new(svc), handle))
}

/// A disaggregated router: decode workers by load, prefill workers by KV overlap (`kv`,
/// `kv-approx`) or round-robin; prompts shorter than `prefill_threshold` stay on the
/// decode worker; with no live prefill worker it serves aggregated unless `enforce_disagg`.
pub fn disagg_router(
    node: &PlannedNode,
    block_size: Option<usize>,
    prefill: Arc<InstanceSet<PrefillRequest, PrefillResult>>,
    decode: Arc<InstanceSet<TokenRequest, TokenDelta>>,
    hub: &Arc<crate::metrics::MetricsHub>,
    id: &dynamo_graph::plan::ReplicaId,
) -> Result<(TokenService, Option<KvRouterHandle>), BuildError> {
    let mode_name = node.str("mode").unwrap_or("round-robin");
    let mode: RouterMode = mode_name.parse().map_err(|e| invalid(node, e))?;
    let (prefill_policy, kv): (Arc<dyn Policy>, Option<KvRouterHandle>) = match mode.kv_mode() {
        Some(kv_mode) => {
            let mut config = KvConfig::for_mode(kv_mode);
            if let Some(b) = block_size {
                config.block_size = b;
            }
            kv_settings(node, &mut config);
            let handle = KvRouterHandle::new(kv_mode, config).map_err(|e| invalid(node, e))?;
            (handle.policy(), Some(handle))
        }
        None => (mode.policy(), None),
    };
    let config = DisaggConfig {
        prefill_threshold: node
            .u64("prefill_threshold")
            .and_then(|v| usize::try_from(v).ok())
            .unwrap_or(0),
        enforce: node.bool("enforce_disagg").unwrap_or(false),
        max_prefill_queue: node
            .u64("max_prefill_queue")
            .and_then(|v| usize::try_from(v).ok())
            .unwrap_or(0),
    };
    let router = Arc::new(
        DisaggRouter::new(
            config,
            prefill,
            prefill_policy,
            decode,
            Arc::new(LeastLoaded::default()),
        )
        .named(node.name.clone())
        .migration_limit(migration_limit(node)),
    );
    hub.add_disagg(id.clone(), router.clone());
    Ok((router, kv))
}

/// The KV settings both router kinds share, where the graph sets them (validated with
/// the graph): `overlap_weight`, `weight_queue_tokens`, `temperature`, `index_shards`.
fn kv_settings(node: &PlannedNode, config: &mut KvConfig) {
    if let Some(w) = node.f64("overlap_weight") {
        config.overlap_weight = w;
    }
    if let Some(n) = node.u64("weight_queue_tokens") {
        config.weight_queue_tokens = n;
    }
    if let Some(t) = node.f64("temperature") {
        config.temperature = t;
    }
    if let Some(n) = node
        .u64("index_shards")
        .and_then(|v| usize::try_from(v).ok())
    {
        config.index_shards = n;
    }
}

/// The router's `migration_limit` (default [`DEFAULT_MIGRATION_LIMIT`]).
fn migration_limit(node: &PlannedNode) -> u32 {
    node.u64("migration_limit")
        .map_or(DEFAULT_MIGRATION_LIMIT, |v| {
            u32::try_from(v).unwrap_or(u32::MAX)
        })
}

pub fn preprocessor(
    node: &PlannedNode,
    model: &PlannedModel,
    downstream: Arc<dyn Service<TokenRequest, TokenDelta>>,
) -> Result<Arc<dyn Service<ChatRequest, TextDelta>>, BuildError> {
    let file = model_path(node, model)?;
    let mut config = PreprocessorConfig::gguf(file);
    config.system_prompt = model.system_prompt.clone();
    config.chat_template = model.chat_template.clone();
    config.context_length = model.context_length;
    let pre = Preprocessor::new(config).map_err(|e| invalid(node, e))?;
    Ok(Arc::new(PreprocessorService::new(
        Arc::new(pre),
        downstream,
    )))
}

pub fn frontend(
    node: &PlannedNode,
    served: Vec<String>,
    downstream: Arc<dyn Service<ChatRequest, TextDelta>>,
) -> Result<Frontend, BuildError> {
    let mut config = FrontendConfig::for_models(served);
    if let Some(n) = node
        .u64("max_body_bytes")
        .and_then(|v| usize::try_from(v).ok())
    {
        config.max_body_bytes = n;
    }
    if let Some(n) = node
        .u64("max_inflight")
        .and_then(|v| usize::try_from(v).ok())
    {
        config.max_inflight = n;
    }
    if let Some(d) = node
        .str("request_timeout")
        .and_then(|s| humantime::parse_duration(s).ok())
    {
        config.request_timeout = d;
    }
    Frontend::new(config, downstream).map_err(|e| invalid(node, e))
}

#[cfg(test)]
mod tests {
    /// The graph catalogue documents the router's KV defaults; they must be the ones the
    /// router uses when the file says nothing.
    #[test]
    fn the_catalogue_states_the_routers_kv_defaults() {
        let router = dynamo_graph::kinds::kind("router").map(|k| k.settings);
        let default = |key: &str| {
            (router.unwrap_or_default().iter())
                .find(|f| f.key == key)
                .and_then(|f| f.default)
        };
        let weight = default("overlap_weight").and_then(|d| d.parse::<f64>().ok());
        assert_eq!(weight, Some(dynamo_router::kv::DEFAULT_OVERLAP_WEIGHT));
        assert_eq!(
            dynamo_router::KvConfig::default().overlap_weight,
            dynamo_router::kv::DEFAULT_OVERLAP_WEIGHT
        );
        let queue = default("weight_queue_tokens").and_then(|d| d.parse::<u64>().ok());
        assert_eq!(queue, Some(dynamo_router::kv::DEFAULT_WEIGHT_QUEUE_TOKENS));
        assert_eq!(
            dynamo_router::KvConfig::default().weight_queue_tokens,
            dynamo_router::kv::DEFAULT_WEIGHT_QUEUE_TOKENS
        );
    }
}
