//! The command line that launches each engine's own OpenAI-compatible server, built from
//! the typed settings (pure, so every engine's line is unit-tested even where the engine
//! cannot run).

use std::path::Path;

use dynamo_runtime::supervisor::cuda_visible::{self, NotVisible};

use crate::config::{EngineKind, Launch};

/// A program, its arguments and its extra environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LaunchError {
    #[error("the openai engine has no default launch line: set `command` (and `extra_args` with {{port}} and {{model}})")]
    NoCommand,
    #[error("KV events endpoint `{0}` is not tcp://host:port")]
    BadEndpoint(String),
    #[error(transparent)]
    Gpus(#[from] NotVisible),
}

fn port_of(endpoint: &str) -> Result<u16, LaunchError> {
    endpoint
        .strip_prefix("tcp://")
        .and_then(|rest| rest.rsplit_once(':'))
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .ok_or_else(|| LaunchError::BadEndpoint(endpoint.to_string()))
}

/// vLLM's `--kv-events-config`: publish over ZeroMQ (and serve replays, when asked),
/// binding the endpoints' ports on all interfaces (vLLM binds when the address holds `*`,
/// and connects otherwise).
fn kv_events_config(endpoint: &str, replay: Option<&str>) -> Result<String, LaunchError> {
    let port = port_of(endpoint)?;
    let replay = match replay {
        Some(r) => format!(r#","replay_endpoint":"tcp://*:{}""#, port_of(r)?),
        None => String::new(),
    };
    Ok(format!(
        r#"{{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:{port}"{replay}}}"#
    ))
}

/// The launch line of `kind` serving `model` on 127.0.0.1:`port`.
pub fn command_line(
    kind: EngineKind,
    launch: &Launch,
    model: &Path,
    port: u16,
    block_size: usize,
    kv_events: Option<&str>,
    kv_events_replay: Option<&str>,
) -> Result<CommandLine, LaunchError> {
    let model_s = model.display().to_string();
    let port_s = port.to_string();
    let s = |v: &str| v.to_string();
    let (default_program, mut args): (&str, Vec<String>) = match kind {
        EngineKind::OpenAi => ("", Vec::new()),
        EngineKind::LlamaCppServer => (
            "python3",
            vec![
                s("-m"),
                s("llama_cpp.server"),
                s("--model"),
                model_s.clone(),
                s("--host"),
                s("127.0.0.1"),
                s("--port"),
                port_s.clone(),
                // Its default lets any new request (even `GET /v1/models`) cut off the
                // completion in progress; a worker gets concurrent requests.
                s("--interrupt_requests"),
                s("False"),
            ],
        ),
        EngineKind::Vllm => (
            "vllm",
            vec![
                s("serve"),
                model_s.clone(),
                s("--host"),
                s("127.0.0.1"),
                s("--port"),
                port_s.clone(),
                s("--block-size"),
                block_size.to_string(),
            ],
        ),
        EngineKind::Sglang => (
            "python3",
            vec![
                s("-m"),
                s("sglang.launch_server"),
                s("--model-path"),
                model_s.clone(),
                s("--host"),
                s("127.0.0.1"),
                s("--port"),
                port_s.clone(),
                s("--page-size"),
                block_size.to_string(),
            ],
        ),
        EngineKind::TrtLlm => (
            "trtllm-serve",
            vec![
                model_s.clone(),
                s("--host"),
                s("127.0.0.1"),
                s("--port"),
                port_s.clone(),
            ],
        ),
    };
    if let (Some(ep), true) = (kv_events, kind.publishes_zmq_events()) {
        args.push(s("--kv-events-config"));
        args.push(kv_events_config(ep, kv_events_replay)?);
    }
    if let Some(extra) = &launch.extra_args {
        args.extend(
            extra
                .split_whitespace()
                .map(|a| a.replace("{port}", &port_s).replace("{model}", &model_s)),
        );
    }
    let program = match (&launch.command, kind) {
        (Some(c), _) => c.clone(),
        (None, EngineKind::OpenAi) => return Err(LaunchError::NoCommand),
        (None, _) => default_program.to_string(),
    };
    let mut env = Vec::new();
    if !launch.gpus.is_empty() {
        // The plan's ids; [`CommandLine::seen_through`] maps them through what the
        // launching process itself sees.
        let value = cuda_visible::for_child(&launch.gpus, None)?;
        env.push((s(cuda_visible::CUDA_VISIBLE_DEVICES), value));
    }
    Ok(CommandLine { program, args, env })
}

impl CommandLine {
    /// The plan's GPU ids number the GPUs the launching process sees: when its own
    /// `CUDA_VISIBLE_DEVICES` lists `visible`, the engine gets the entries its ids number.
    pub fn seen_through(
        mut self,
        gpus: &[u32],
        visible: Option<&[String]>,
    ) -> Result<CommandLine, LaunchError> {
        for (key, value) in &mut self.env {
            if key == cuda_visible::CUDA_VISIBLE_DEVICES {
                *value = cuda_visible::for_child(gpus, visible)?;
            }
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(gpus: Vec<u32>, extra: Option<&str>) -> Launch {
        Launch {
            command: None,
            extra_args: extra.map(str::to_string),
            port: 0,
            gpus,
        }
    }

    #[test]
    fn vllm_line_has_model_port_block_size_events_and_gpus() {
        let l = launch(
            vec![2, 3],
            Some("--tensor-parallel-size 2 --max-model-len 4096"),
        );
        let c = command_line(
            EngineKind::Vllm,
            &l,
            Path::new("/m/Qwen3-0.6B"),
            8101,
            16,
            Some("tcp://127.0.0.1:5557"),
            None,
        )
        .expect("builds");
        assert_eq!(c.program, "vllm");
        assert_eq!(
            c.args.join(" "),
            "serve /m/Qwen3-0.6B --host 127.0.0.1 --port 8101 --block-size 16 \
             --kv-events-config {\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"tcp://*:5557\"} \
             --tensor-parallel-size 2 --max-model-len 4096"
        );
        assert_eq!(
            c.env,
            vec![("CUDA_VISIBLE_DEVICES".to_string(), "2,3".to_string())]
        );
        // Launched by an agent that sees only some GPUs: the ids number those.
        let visible = cuda_visible::parse("4,5,6,7");
        let seen = c
            .clone()
            .seen_through(&[2, 3], Some(&visible))
            .expect("visible");
        assert_eq!(seen.env[0].1, "6,7");
        let narrow = cuda_visible::parse("4");
        assert!(matches!(
            c.seen_through(&[2, 3], Some(&narrow)),
            Err(LaunchError::Gpus(NotVisible {
                id: 2,
                count: 1,
                ..
            }))
        ));
    }

    #[test]
    fn vllm_is_told_where_to_serve_replays() {
        let c = command_line(
            EngineKind::Vllm,
            &launch(vec![0], None),
            Path::new("/m/x"),
            1,
            16,
            Some("tcp://127.0.0.1:5557"),
            Some("tcp://127.0.0.1:5558"),
        )
        .expect("builds");
        assert!(
            c.args.join(" ").contains(
                r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558"}"#
            ),
            "{:?}",
            c.args
        );
        let bad = command_line(
            EngineKind::Vllm,
            &launch(vec![0], None),
            Path::new("/m/x"),
            1,
            16,
            Some("tcp://127.0.0.1:5557"),
            Some("ipc:///tmp/replay"),
        );
        assert!(matches!(bad, Err(LaunchError::BadEndpoint(e)) if e == "ipc:///tmp/replay"));
    }

    #[test]
    fn sglang_uses_page_size_and_model_path() {
        let c = command_line(
            EngineKind::Sglang,
            &launch(vec![0], None),
            Path::new("/m/x"),
            9000,
            32,
            None,
            None,
        )
        .expect("builds");
        assert_eq!(c.program, "python3");
        assert_eq!(
            c.args.join(" "),
            "-m sglang.launch_server --model-path /m/x --host 127.0.0.1 --port 9000 --page-size 32"
        );
    }

    #[test]
    fn trtllm_and_llamacpp_server_lines() {
        let t = command_line(
            EngineKind::TrtLlm,
            &launch(vec![0], None),
            Path::new("/m/x"),
            1,
            16,
            Some("tcp://127.0.0.1:5557"),
            None,
        )
        .expect("builds");
        assert_eq!(
            t.args.join(" "),
            "/m/x --host 127.0.0.1 --port 1",
            "no events flag"
        );
        let mut l = launch(vec![], Some("--n_ctx 4096"));
        l.command = Some("/venv/bin/python".to_string());
        let c = command_line(
            EngineKind::LlamaCppServer,
            &l,
            Path::new("/m/s.gguf"),
            7,
            16,
            None,
            None,
        )
        .expect("builds");
        assert_eq!(c.program, "/venv/bin/python");
        assert_eq!(
            c.args.join(" "),
            "-m llama_cpp.server --model /m/s.gguf --host 127.0.0.1 --port 7 \
             --interrupt_requests False --n_ctx 4096"
        );
        assert!(c.env.is_empty(), "no GPUs, no CUDA_VISIBLE_DEVICES");
    }

    #[test]
    fn openai_needs_a_command_and_fills_placeholders() {
        let l = launch(vec![], Some("serve --port={port} {model}"));
        assert_eq!(
            command_line(EngineKind::OpenAi, &l, Path::new("/m"), 5, 16, None, None),
            Err(LaunchError::NoCommand)
        );
        let mut l = l;
        l.command = Some("my-server".to_string());
        let c = command_line(EngineKind::OpenAi, &l, Path::new("/m"), 5, 16, None, None)
            .expect("builds");
        assert_eq!(c.args, vec!["serve", "--port=5", "/m"]);
    }

    #[test]
    fn a_bad_events_endpoint_is_an_error() {
        let r = command_line(
            EngineKind::Vllm,
            &launch(vec![0], None),
            Path::new("/m"),
            5,
            16,
            Some("ipc:///tmp/x"),
            None,
        );
        assert!(matches!(r, Err(LaunchError::BadEndpoint(_))));
    }
}
