//! External engines (vLLM, SGLang, TensorRT-LLM, llama.cpp's server, any OpenAI-compatible
//! server): either connected to (`url`) or launched (`command`, `extra_args`, `port`), never
//! both; launched GPU engines need GPUs; KV routing over them needs their ZeroMQ events.

use crate::diagnostic::{Code, Diagnostic};
use crate::kinds::{EXTERNAL_ENGINES, GPU_ENGINES, ZMQ_EVENT_ENGINES};
use crate::source::Span;
use crate::spec::NodeSpec;
use crate::validate::resolve::Resolved;

/// Settings only the in-process engines (mocker, native, llamacpp) read.
pub const IN_PROCESS_ONLY: &[&str] = &[
    "speedup",
    "threads",
    "num_blocks",
    "max_num_seqs",
    "max_batched_tokens",
    "enable_prefix_caching",
];

/// What a binary built without llama.cpp says about `engine = "llamacpp"`.
pub const LLAMACPP_MISSING: &str = "this dynamo was built without llama.cpp: rebuild it with `cargo build --release -p dynamo-cli --features llamacpp` (needs cmake and libclang), or use `engine = \"native\"`";

/// E0306 for every engine node asking for an engine the binary lacks.
pub fn compiled_in(spec: &crate::spec::GraphSpec, missing: &[String], diags: &mut Vec<Diagnostic>) {
    for node in &spec.nodes {
        let Some(engine) = node.setting_str("engine") else {
            continue;
        };
        if !missing.iter().any(|m| m == engine) {
            continue;
        }
        let help = if engine == "llamacpp" {
            LLAMACPP_MISSING.to_string()
        } else {
            format!("this dynamo was built without the {engine} engine")
        };
        diags.push(
            Diagnostic::at(
                Code::E0306,
                node.setting_span("engine").unwrap_or(node.name.span),
                format!(
                    "`{}` asks for the {engine} engine, which this dynamo binary does not contain",
                    node.name.value
                ),
            )
            .label("not compiled in")
            .help(help),
        );
    }
}

/// Settings only external engines read.
const EXTERNAL_ONLY: &[&str] = &[
    "url",
    "command",
    "extra_args",
    "port",
    "ready_timeout",
    "kv_events_endpoint",
    "kv_events_replay_endpoint",
];

/// The settings that launch an engine (and so exclude `url`).
const LAUNCH: &[&str] = &["command", "extra_args", "port", "ready_timeout"];

pub fn is_external(node: &NodeSpec) -> bool {
    node.setting_str("engine")
        .is_some_and(|e| EXTERNAL_ENGINES.contains(&e))
}

/// The E0301 a `kv` router over an external engine earns when that engine's events are
/// not wired: the silent fallback to load-only routing Dynamo users hit.
pub fn kv_router_over_external(
    router: &NodeSpec,
    mode_span: Span,
    node: &NodeSpec,
) -> Option<Diagnostic> {
    if !is_external(node) {
        return None;
    }
    let engine = node.setting_str("engine").unwrap_or_default();
    let off = node
        .settings
        .get("kv_events")
        .and_then(|v| v.value.as_bool())
        == Some(false);
    let d = if !ZMQ_EVENT_ENGINES.contains(&engine) {
        Diagnostic::at(
            Code::E0301,
            node.setting_span("engine").unwrap_or(node.name.span),
            format!(
                "router `{}` routes by KV events, but the {engine} engine of `{}` publishes none we can read",
                router.name.value, node.name.value
            ),
        )
        .label(format!("`engine = \"{engine}\"`"))
        .with_label(mode_span, "`mode = \"kv\"` needs KV events")
        .help("use `mode = \"kv-approx\"` (it predicts the cache from its own decisions), or an engine that publishes KV events over ZeroMQ (`vllm`, `sglang`)")
    } else if node.setting_str("kv_events_endpoint").is_none() || off {
        Diagnostic::at(
            Code::E0301,
            node.name.span,
            format!(
                "router `{}` routes by KV events, but `{}` names no `kv_events_endpoint` to read them from",
                router.name.value, node.name.value
            ),
        )
        .label(format!("a {engine} worker without KV events"))
        .with_label(mode_span, "`mode = \"kv\"` needs KV events")
        .help("set `kv_events_endpoint = \"tcp://127.0.0.1:5557\"` (a launched engine is told to publish there), or use `mode = \"kv-approx\"`")
    } else {
        return None;
    };
    Some(d)
}

pub fn check(r: &Resolved<'_>, diags: &mut Vec<Diagnostic>) {
    for (i, node) in r.spec.nodes.iter().enumerate() {
        let Some(kind) = r.kind(i) else { continue };
        if !kind.engine {
            continue;
        }
        if is_external(node) {
            external(node, kind.name, diags);
        } else {
            let engine = node.setting_str("engine").unwrap_or("mocker");
            for key in EXTERNAL_ONLY {
                if let Some(span) = node.setting_span(key) {
                    diags.push(
                        Diagnostic::at(
                            Code::W0002,
                            span,
                            format!("`{key}` has no effect on the {engine} engine"),
                        )
                        .label("ignored")
                        .help("it applies to external engines (`openai`, `llamacpp-server`, `vllm`, `sglang`, `trtllm`)"),
                    );
                }
            }
        }
    }
}

fn external(node: &NodeSpec, kind: &str, diags: &mut Vec<Diagnostic>) {
    let engine = node.setting_str("engine").unwrap_or_default();
    let engine_span = node.setting_span("engine").unwrap_or(node.name.span);
    if kind != "worker" {
        diags.push(
            Diagnostic::at(
                Code::E0305,
                engine_span,
                format!(
                    "`{}` is a {kind} node, but the {engine} engine can only be an aggregated worker here",
                    node.name.value
                ),
            )
            .label(format!("`engine = \"{engine}\"`"))
            .with_label(node.name.span, format!("kind `{kind}`"))
            .help("use `kind = \"worker\"`; disaggregated serving needs KV hand-off, which only the in-process engines do"),
        );
    }
    let launch: Vec<&str> = LAUNCH
        .iter()
        .copied()
        .filter(|k| node.setting_span(k).is_some())
        .collect();
    if let Some(url_span) = node.setting_span("url") {
        if let Some(first) = launch.first() {
            let mut d = Diagnostic::at(
                Code::E0008,
                url_span,
                format!(
                    "`{}` both connects to a running engine and launches one",
                    node.name.value
                ),
            )
            .label("connects here");
            for key in &launch {
                if let Some(span) = node.setting_span(key) {
                    d = d.with_label(span, format!("`{key}` is a launch setting"));
                }
            }
            diags.push(d.help(format!(
                "remove `url` to launch the engine, or remove `{first}` to connect to the one at the URL"
            )));
        }
        return;
    }
    if engine == "openai" && node.setting_span("command").is_none() {
        diags.push(
            Diagnostic::at(
                Code::E0008,
                engine_span,
                format!(
                    "`{}` neither connects to an OpenAI-compatible server nor says how to launch one",
                    node.name.value
                ),
            )
            .label("`engine = \"openai\"` has no default launch line")
            .help("set `url = \"http://host:port\"`, or `command` and `extra_args` (with `{port}` and `{model}`)"),
        );
    }
    if GPU_ENGINES.contains(&engine) && node.gpus.value == 0 {
        diags.push(
            Diagnostic::at(
                Code::E0305,
                engine_span,
                format!(
                    "`{}` launches {engine}, which needs a GPU, but asks for none",
                    node.name.value
                ),
            )
            .label(format!("`engine = \"{engine}\"`"))
            .with_label(node.gpus.span, "gpus is 0")
            .help("set `gpus = 1` (or more; the plan's GPU ids reach the engine as CUDA_VISIBLE_DEVICES), or connect to a running server with `url`"),
        );
    }
    for key in ["kv_events_endpoint", "kv_events_replay_endpoint"] {
        let Some(span) = node.setting_span(key) else {
            continue;
        };
        if !ZMQ_EVENT_ENGINES.contains(&engine) {
            diags.push(
                Diagnostic::at(
                    Code::E0305,
                    span,
                    format!("the {engine} engine publishes no ZeroMQ KV events"),
                )
                .label("nothing will be published here")
                .help("remove it; only `vllm` and `sglang` publish KV events over ZeroMQ"),
            );
        }
    }
    if let (Some(span), None) = (
        node.setting_span("kv_events_replay_endpoint"),
        node.setting_str("kv_events_endpoint"),
    ) {
        if ZMQ_EVENT_ENGINES.contains(&engine) {
            diags.push(
                Diagnostic::at(
                    Code::E0305,
                    span,
                    "a replay endpoint without `kv_events_endpoint`: there are no events to replay",
                )
                .label("replays of what?")
                .help("set `kv_events_endpoint` too, or remove this"),
            );
        }
    }
}
