//! An external engine as a worker: `llm.tokens/v1` in, the engine's `/v1/completions`
//! stream out as token ids. A launched engine runs under the runtime's supervisor
//! (restarted when it dies); the worker only takes requests while the engine's
//! `/v1/models` answers.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dynamo_preprocessor::tokenizer::Tokenizer;
use dynamo_protocol::{FinishReason, TokenDelta, TokenRequest};
use dynamo_runtime::supervisor::{
    EventKind, ProcessSpec, RestartPolicy, StartError, Supervisor, TracingSink,
};
use dynamo_runtime::{error_stream, RequestContext, ResponseStream, ServeError, Service};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use dynamo_runtime::supervisor::cuda_visible;

use crate::config::{ExternalConfig, Where};
use crate::kv_events::hub::{EventsPort, KvEventHub};
use crate::launch::{command_line, LaunchError};
use crate::openai::{self, Prompt, SseBuffer};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("cannot start the engine: {0}")]
    Start(#[from] StartError),
    #[error("no free port on 127.0.0.1: {0}")]
    Port(std::io::Error),
    #[error("the {engine} engine at {url} was not ready after {waited:?} (last: {last})")]
    NotReady {
        engine: &'static str,
        url: String,
        waited: Duration,
        last: String,
    },
    #[error("the {0} engine takes text prompts, but no tokenizer was given for the model")]
    NeedsTokenizer(&'static str),
    #[error("HTTP client: {0}")]
    Client(String),
}

pub struct ExternalEngine {
    cfg: ExternalConfig,
    base: String,
    model: String,
    http: reqwest::Client,
    tokenizer: Option<Arc<Tokenizer>>,
    ready: Arc<AtomicBool>,
    /// Requests streaming now: while any is, the engine is alive and is not polled
    /// (llama-cpp-python's server, by default, cuts a stream off at any new request).
    inflight: Arc<AtomicUsize>,
    hub: Arc<KvEventHub>,
    supervisor: Option<Supervisor>,
    stop: CancellationToken,
}

fn free_port() -> Result<u16, EngineError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(EngineError::Port)?;
    Ok(l.local_addr().map_err(EngineError::Port)?.port())
}

/// The id of the first model `/v1/models` lists: the name requests must carry.
async fn served_model(http: &reqwest::Client, base: &str) -> Result<String, String> {
    let resp = http
        .get(format!("{base}/v1/models"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("/v1/models answered {}", resp.status()));
    }
    let v: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| "/v1/models lists no model".to_string())
}

impl ExternalEngine {
    /// Connects to, or launches and waits for, the engine; resolves once it serves.
    pub async fn start(
        cfg: ExternalConfig,
        tokenizer: Option<Arc<Tokenizer>>,
    ) -> Result<Arc<Self>, EngineError> {
        let text_in = !cfg.kind.accepts_token_ids();
        if tokenizer.is_none() && (text_in || cfg.kind != crate::EngineKind::Vllm) {
            return Err(EngineError::NeedsTokenizer(cfg.kind.name()));
        }
        let http = reqwest::Client::builder()
            .build()
            .map_err(|e| EngineError::Client(e.to_string()))?;
        let stop = CancellationToken::new();
        let (base, supervisor) = match &cfg.place {
            Where::Connect(url) => (url.trim_end_matches('/').to_string(), None),
            Where::Launch(launch) => {
                let port = if launch.port == 0 {
                    free_port()?
                } else {
                    launch.port
                };
                let line = command_line(
                    cfg.kind,
                    launch,
                    &cfg.model_path,
                    port,
                    cfg.block_size,
                    cfg.kv_events.as_deref(),
                    cfg.kv_events_replay.as_deref(),
                )?
                .seen_through(&launch.gpus, cuda_visible::from_env().as_deref())?;
                tracing::info!(engine = cfg.kind.name(), program = %line.program, args = ?line.args, "launching engine");
                let mut spec = ProcessSpec::new(format!("{}-engine", cfg.name), &line.program)
                    .args(line.args)
                    .restart(
                        RestartPolicy::always(1000)
                            .with_backoff(Duration::from_millis(500), Duration::from_secs(30)),
                    );
                for (k, v) in line.env {
                    spec = spec.env(k, v);
                }
                let (sup, mut events) = Supervisor::new(Arc::new(TracingSink));
                sup.start(spec).await?;
                tokio::spawn(async move {
                    while let Some(ev) = events.recv().await {
                        match &ev.kind {
                            EventKind::Exited {
                                status,
                                stderr_tail,
                            } => {
                                tracing::warn!(process = %ev.process, %status, stderr = ?stderr_tail, "engine exited")
                            }
                            other => {
                                tracing::info!(process = %ev.process, event = ?other, "engine")
                            }
                        }
                    }
                });
                (format!("http://127.0.0.1:{port}"), Some(sup))
            }
        };
        let model = wait_ready(&http, &base, &cfg, &stop).await?;
        let hub = KvEventHub::new(cfg.worker_id, cfg.block_size, cfg.block_hash_seed);
        if let Some(ep) = cfg.kv_events.clone() {
            tokio::spawn(crate::kv_events::subscriber::follow(
                ep,
                cfg.kv_events_replay.clone(),
                hub.clone(),
                stop.clone(),
            ));
        }
        let ready = Arc::new(AtomicBool::new(true));
        let inflight = Arc::new(AtomicUsize::new(0));
        tokio::spawn(health(
            http.clone(),
            base.clone(),
            ready.clone(),
            inflight.clone(),
            stop.clone(),
        ));
        Ok(Arc::new(ExternalEngine {
            cfg,
            base,
            model,
            http,
            tokenizer,
            ready,
            inflight,
            hub,
            supervisor,
            stop,
        }))
    }

    /// The worker's `events` port.
    pub fn events(&self) -> EventsPort {
        EventsPort(self.hub.clone())
    }

    pub fn hub(&self) -> &Arc<KvEventHub> {
        &self.hub
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Stops the engine (SIGTERM, then SIGKILL after `grace`) and the worker's tasks.
    pub async fn shutdown(&self, grace: Duration) {
        self.stop.cancel();
        if let Some(s) = &self.supervisor {
            s.shutdown(grace).await;
        }
    }

    fn prompt(&self, ids: &[u32]) -> Result<Prompt, ServeError> {
        if self.cfg.kind.accepts_token_ids() {
            return Ok(Prompt::Ids(ids.to_vec()));
        }
        let tok = self
            .tokenizer
            .as_ref()
            .ok_or_else(|| ServeError::internal("no tokenizer for a text-prompt engine"))?;
        // Special tokens stay as text (`<|im_start|>`): the engine parses them back.
        tok.decode(ids, false)
            .map(Prompt::Text)
            .map_err(|e| ServeError::invalid(format!("prompt ids do not decode: {e}")))
    }
}

async fn wait_ready(
    http: &reqwest::Client,
    base: &str,
    cfg: &ExternalConfig,
    stop: &CancellationToken,
) -> Result<String, EngineError> {
    let start = tokio::time::Instant::now();
    let mut last = String::from("no answer yet");
    while start.elapsed() < cfg.ready_timeout && !stop.is_cancelled() {
        match served_model(http, base).await {
            Ok(model) => {
                tracing::info!(engine = cfg.kind.name(), %base, %model, waited = ?start.elapsed(), "engine ready");
                return Ok(model);
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(EngineError::NotReady {
        engine: cfg.kind.name(),
        url: base.to_string(),
        waited: start.elapsed(),
        last,
    })
}

/// Polls `/v1/models`; while it fails the worker answers `Unavailable`, which the router
/// retries on another worker.
async fn health(
    http: reqwest::Client,
    base: String,
    ready: Arc<AtomicBool>,
    inflight: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        if inflight.load(Ordering::Relaxed) > 0 {
            continue;
        }
        let ok = served_model(&http, &base).await.is_ok();
        if ready.swap(ok, Ordering::Relaxed) != ok {
            tracing::warn!(%base, ready = ok, "engine readiness changed");
        }
    }
}

impl Drop for ExternalEngine {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Service<TokenRequest, TokenDelta> for ExternalEngine {
    fn call(&self, req: TokenRequest, ctx: RequestContext) -> ResponseStream<TokenDelta> {
        if !self.is_ready() {
            return error_stream(ServeError::unavailable(format!(
                "the {} engine at {} is not ready",
                self.cfg.kind.name(),
                self.base
            )));
        }
        let prompt = match self.prompt(&req.token_ids) {
            Ok(p) => p,
            Err(e) => return error_stream(e),
        };
        let body = openai::body(self.cfg.kind, &self.model, &req, prompt);
        let send = self
            .http
            .post(format!("{}/v1/completions", self.base))
            .json(&body)
            .send();
        let (tx, rx) = mpsc::channel(64);
        let tokenizer = self.tokenizer.clone();
        let inflight = InFlight::new(self.inflight.clone());
        tokio::spawn(async move {
            let _inflight = inflight;
            tokio::select! {
                // Cancellation drops the HTTP response, which closes the engine request.
                _ = ctx.cancelled() => {}
                _ = tx.closed() => {}
                _ = relay(send, tokenizer, &tx) => {}
            }
        });
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
            .boxed()
    }
}

/// Counts a request in flight until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(n: Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        InFlight(n)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

type Out = mpsc::Sender<Result<TokenDelta, ServeError>>;

async fn relay(
    send: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
    tokenizer: Option<Arc<Tokenizer>>,
    tx: &Out,
) {
    let resp = match send.await {
        Ok(r) => r,
        Err(e) => {
            let _ = tx
                .send(Err(ServeError::unavailable(format!(
                    "engine unreachable: {e}"
                ))))
                .await;
            return;
        }
    };
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        let _ = tx
            .send(Err(openai::http_error(status.as_u16(), &text)))
            .await;
        return;
    }
    let mut sse = SseBuffer::default();
    let mut body = resp.bytes_stream();
    let mut finished = false;
    while let Some(bytes) = body.next().await {
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => {
                let _ = tx
                    .send(Err(ServeError::unavailable(format!(
                        "engine stream broke: {e}"
                    ))))
                    .await;
                return;
            }
        };
        for data in sse.push(&bytes) {
            if data.trim() == "[DONE]" {
                continue;
            }
            let delta = openai::chunk(&data).and_then(|c| {
                let ids = match c.token_ids {
                    Some(ids) => ids,
                    None if c.text.is_empty() => Vec::new(),
                    None => retokenize(tokenizer.as_deref(), &c.text)?,
                };
                Ok(TokenDelta {
                    token_ids: ids,
                    finish_reason: c.finish,
                    ..TokenDelta::default()
                })
            });
            let last = matches!(&delta, Ok(d) if d.finish_reason.is_some()) || delta.is_err();
            if matches!(&delta, Ok(d) if d.token_ids.is_empty() && d.finish_reason.is_none()) {
                continue;
            }
            if tx.send(delta).await.is_err() {
                return;
            }
            if last {
                finished = true;
            }
        }
    }
    if !finished {
        let _ = tx
            .send(Ok(TokenDelta {
                finish_reason: Some(FinishReason::Stop),
                ..TokenDelta::default()
            }))
            .await;
    }
}

/// Ids for a text delta of an engine that returns only text. Each delta is tokenized on
/// its own: the text is exact (byte-level BPE decodes what it encodes), the ids may split
/// a word differently from the engine's, so the completion token count can differ.
fn retokenize(tokenizer: Option<&Tokenizer>, text: &str) -> Result<Vec<u32>, ServeError> {
    let tok = tokenizer.ok_or_else(|| ServeError::internal("no tokenizer to read engine text"))?;
    tok.encode(text, false)
        .map_err(|e| ServeError::internal(format!("engine text does not tokenize: {e}")))
}
