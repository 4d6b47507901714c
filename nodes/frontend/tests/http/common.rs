//! Test harness: a real frontend on a free loopback port, and a fake downstream that
//! streams deterministic deltas and records what it was asked and whether it was cancelled.
//!
//! The fake's behaviour is chosen by the prompt's last text:
//! - `infinite`: a delta every 5 ms until cancelled;
//! - `hold`: nothing until cancelled or released with [`Fake::release`];
//! - `one-then-hold`: one delta, then nothing until cancelled;
//! - `fail-first:<kind>`: the first item is a `ServeError` of that kind;
//! - `fail-mid`: two deltas, then an internal error;
//! - `slow`: the normal answer with 100 ms between deltas;
//! - anything else: `max_tokens` (default 3) deltas `"tok0 "`, `"tok1 "`, ..., the last
//!   with `finish_reason: Length` when `max_tokens` was given, `Stop` otherwise.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dynamo_frontend::{serve_with_hook, Frontend, FrontendConfig};
use dynamo_protocol::{ChatRequest, FinishReason, Prompt, TextDelta, Usage};
use dynamo_runtime::{ErrorKind, RequestContext, ResponseStream, ServeError, Service};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const MODEL: &str = "test-model";
pub const PROMPT_TOKENS: u32 = 11;
pub const CACHED_TOKENS: u32 = 4;
/// Every wait in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Fake {
    pub requests: Mutex<Vec<ChatRequest>>,
    /// `(request_id, traceparent)` of each call's context.
    pub contexts: Mutex<Vec<(String, Option<String>)>>,
    /// Requests whose context was cancelled.
    pub cancelled: AtomicUsize,
    /// Response streams dropped before they ended.
    pub dropped_early: AtomicUsize,
    pub release: Notify,
    pub cancel_seen: Notify,
}

impl Fake {
    pub fn last_request(&self) -> Option<ChatRequest> {
        self.requests.lock().ok()?.last().cloned()
    }

    /// Waits (bounded) until `n` requests were cancelled and their streams dropped.
    pub async fn wait_cancelled(&self, n: usize) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.cancelled.load(Ordering::SeqCst) >= n
                && self.dropped_early.load(Ordering::SeqCst) >= n
            {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn prompt_text(prompt: &Prompt) -> String {
    match prompt {
        Prompt::Chat(messages) => messages
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default(),
        Prompt::Text(text) => text.clone(),
        Prompt::Tokens(ids) => format!("{} tokens", ids.len()),
    }
}

/// Sets a flag when dropped before `finished` was set.
struct DropFlag {
    fake: Arc<Fake>,
    finished: bool,
}

impl DropFlag {
    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.finished {
            self.fake.dropped_early.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn delta(text: String, finish: Option<FinishReason>, completion_tokens: u32) -> TextDelta {
    TextDelta {
        text,
        tokens: 1,
        finish_reason: finish,
        usage: finish.map(|_| Usage {
            prompt_tokens: PROMPT_TOKENS,
            completion_tokens,
            cached_tokens: CACHED_TOKENS,
        }),
        logprobs: Vec::new(),
    }
}

/// The text the fake generates for `n` tokens.
pub fn expected_text(n: u32) -> String {
    (0..n).map(|i| format!("tok{i} ")).collect()
}

pub struct FakeService(pub Arc<Fake>);

impl Service<ChatRequest, TextDelta> for FakeService {
    fn call(&self, req: ChatRequest, ctx: RequestContext) -> ResponseStream<TextDelta> {
        let fake = self.0.clone();
        let text = prompt_text(&req.prompt);
        let max_tokens = req.max_tokens;
        if let Ok(mut requests) = fake.requests.lock() {
            requests.push(req);
        }
        if let Ok(mut contexts) = fake.contexts.lock() {
            contexts.push((ctx.request_id.clone(), ctx.traceparent.clone()));
        }
        // Record the context's cancellation (bounded, so no task outlives the test long).
        let watcher = fake.clone();
        let token = ctx.cancellation_token();
        tokio::spawn(async move {
            if tokio::time::timeout(Duration::from_secs(30), token.cancelled())
                .await
                .is_ok()
            {
                watcher.cancelled.fetch_add(1, Ordering::SeqCst);
                watcher.cancel_seen.notify_waiters();
            }
        });
        let flag = DropFlag {
            fake: fake.clone(),
            finished: false,
        };

        if let Some(kind) = text.strip_prefix("fail-first:") {
            let kind = match kind {
                "invalid" => ErrorKind::InvalidRequest,
                "notfound" => ErrorKind::NotFound,
                "overloaded" => ErrorKind::Overloaded,
                "unavailable" => ErrorKind::Unavailable,
                _ => ErrorKind::Internal,
            };
            let mut flag = flag;
            flag.finish();
            return Box::pin(futures::stream::once(async move {
                drop(flag);
                Err(ServeError::new(kind, format!("fake refused: {kind:?}")))
            }));
        }

        let mode = text;
        let n = max_tokens.unwrap_or(3);
        let finish = if max_tokens.is_some() {
            FinishReason::Length
        } else {
            FinishReason::Stop
        };
        Box::pin(futures::stream::unfold(
            (0u32, flag, fake, ctx),
            move |(i, mut flag, fake, ctx)| {
                let mode = mode.clone();
                async move {
                    match mode.as_str() {
                        _ if i == u32::MAX => None,
                        "infinite" => {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            let item = Ok(delta(format!("tok{i} "), None, 0));
                            Some((item, (i + 1, flag, fake, ctx)))
                        }
                        "one-then-hold" if i == 0 => {
                            let item = Ok(delta("first ".into(), None, 0));
                            Some((item, (1, flag, fake, ctx)))
                        }
                        "one-then-hold" => {
                            ctx.cancelled().await;
                            None
                        }
                        "hold" => {
                            tokio::select! {
                                () = fake.release.notified() => {}
                                () = ctx.cancelled() => return None,
                            }
                            flag.finish();
                            let item = Ok(delta("held".into(), Some(FinishReason::Stop), 1));
                            Some((item, (u32::MAX, flag, fake, ctx)))
                        }
                        _ if i >= n => {
                            flag.finish();
                            None
                        }
                        "fail-mid" if i == 2 => {
                            flag.finish();
                            let item = Err(ServeError::internal("fake broke mid-stream"));
                            Some((item, (u32::MAX, flag, fake, ctx)))
                        }
                        other => {
                            if other == "slow" {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            let last = i + 1 == n;
                            if last {
                                flag.finish();
                            }
                            let item = Ok(delta(format!("tok{i} "), last.then_some(finish), i + 1));
                            Some((item, (i + 1, flag, fake, ctx)))
                        }
                    }
                }
            },
        ))
    }
}

pub struct Server {
    pub base: String,
    pub address: SocketAddr,
    pub fake: Arc<Fake>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), dynamo_frontend::FrontendError>>,
    /// TCP_NODELAY as seen on each accepted socket.
    pub nodelay: Arc<Mutex<Vec<bool>>>,
    pub ready: Arc<AtomicBool>,
    pub client: reqwest::Client,
}

pub fn config() -> FrontendConfig {
    FrontendConfig {
        max_body_bytes: 64 * 1024,
        ..FrontendConfig::for_models([MODEL, "other-model"])
    }
}

pub async fn start(config: FrontendConfig) -> Server {
    let fake = Arc::new(Fake::default());
    let ready = Arc::new(AtomicBool::new(true));
    let readiness = ready.clone();
    let frontend = Frontend::new(config, Arc::new(FakeService(fake.clone())))
        .expect("test config is valid")
        .with_readiness(move || readiness.load(Ordering::SeqCst));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let address = listener.local_addr().expect("local address");
    let shutdown = CancellationToken::new();
    let nodelay = Arc::new(Mutex::new(Vec::new()));
    let seen = nodelay.clone();
    let hook: dynamo_frontend::AcceptHook = Arc::new(move |tcp: &tokio::net::TcpStream| {
        if let (Ok(flag), Ok(mut seen)) = (tcp.nodelay(), seen.lock()) {
            seen.push(flag);
        }
    });
    let task = tokio::spawn(serve_with_hook(
        listener,
        frontend,
        shutdown.clone(),
        Some(hook),
    ));
    Server {
        base: format!("http://{address}"),
        address,
        fake,
        shutdown,
        task,
        nodelay,
        ready,
        client: reqwest::Client::builder()
            .timeout(WAIT)
            .build()
            .expect("build the HTTP client"),
    }
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Vec<u8>) {
        let response = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request sent");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.expect("response body");
        (status, bytes.to_vec())
    }

    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let (status, bytes) = self.post(path, body.to_string()).await;
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            panic!(
                "{path} answered non-JSON: {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, value)
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let response = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent");
        let status = response.status().as_u16();
        (status, response.text().await.expect("response text"))
    }

    /// Sum of `dynamo_frontend_requests_total` over models for one endpoint and status.
    pub async fn requests_total(&self, endpoint: &str, status: u16) -> u64 {
        let (_, text) = self.get_text("/metrics").await;
        let needle_endpoint = format!("endpoint=\"{endpoint}\"");
        let needle_status = format!("status=\"{status}\"");
        text.lines()
            .filter(|line| line.starts_with("dynamo_frontend_requests_total{"))
            .filter(|line| line.contains(&needle_endpoint) && line.contains(&needle_status))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The value of a metric line starting with `prefix` (name and labels).
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        let (_, text) = self.get_text("/metrics").await;
        text.lines()
            .find(|line| line.starts_with(prefix))
            .and_then(|line| line.rsplit(' ').next()?.parse().ok())
    }

    /// Polls `/metrics` until `prefix` reads `value` (bounded).
    pub async fn wait_metric(&self, prefix: &str, value: f64) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            if self.metric(prefix).await == Some(value) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

/// Splits an SSE body into its events' `(event name, data)` pairs.
pub fn sse_events(body: &str) -> Vec<(Option<String>, String)> {
    body.split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| {
            let mut name = None;
            let mut data = String::new();
            for line in event.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = Some(value.to_string());
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data.push_str(value);
                }
            }
            (name, data)
        })
        .collect()
}

/// Consumes a stream of bytes until `n` complete SSE events arrived (bounded).
pub async fn read_events(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    n: usize,
) -> String {
    let mut text = String::new();
    let read = async {
        while text.matches("\n\n").count() < n {
            match stream.next().await {
                Some(Ok(chunk)) => text.push_str(&String::from_utf8_lossy(&chunk)),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(WAIT, read).await;
    text
}
