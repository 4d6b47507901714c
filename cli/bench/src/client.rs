//! One HTTP client for the run and one measured request at a time.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use crate::args::Endpoint;
use crate::sse::{error_message, usage_of, SseParser, StreamEvent};
use crate::{BenchError, ErrorKind};

/// What every request of a run shares.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub client: reqwest::Client,
    pub url: String,
    pub model: String,
    pub endpoint: Endpoint,
    pub stream: bool,
    pub timeout: Duration,
}

/// The prompt of one request: text, or token ids (`/v1/completions` only).
#[derive(Debug, Clone, Copy)]
pub(crate) enum PromptInput<'a> {
    Text(&'a str),
    TokenIds(&'a [u32]),
}

/// What varies between the requests of a run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request<'a> {
    pub prompt: PromptInput<'a>,
    /// Sent as `max_tokens` (with `ignore_eos: true`).
    pub max_tokens: u32,
    /// Prompt tokens to report when the server's usage gives none.
    pub approx_input: u64,
}

/// The measurement of one request.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outcome {
    /// Set when the request failed; the rest is then not reported.
    pub error: Option<(ErrorKind, String)>,
    pub ttft: Option<Duration>,
    /// Gaps between consecutive content chunks.
    pub itl: Vec<Duration>,
    pub e2e: Duration,
    pub output_tokens: u64,
    /// From the server's usage when it reports a non-zero count, else the prompt's
    /// approximate length.
    pub input_tokens: u64,
}

/// A pooled keep-alive HTTP/1.1 client sized for `max_in_flight` connections.
pub(crate) fn build_client(
    max_in_flight: usize,
    timeout: Duration,
) -> Result<reqwest::Client, BenchError> {
    reqwest::Client::builder()
        .http1_only()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(max_in_flight.max(1))
        .pool_idle_timeout(Duration::from_secs(90))
        .connect_timeout(timeout)
        .build()
        .map_err(BenchError::Client)
}

/// The base URL without a trailing slash.
pub(crate) fn base(url: &str) -> &str {
    url.trim_end_matches('/')
}

/// The first model of `GET /v1/models`.
pub(crate) async fn first_model(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<String, BenchError> {
    let models_url = format!("{}/v1/models", base(url));
    let fail = |reason: String| BenchError::Models {
        url: models_url.clone(),
        reason,
    };
    let fetch = async {
        let resp = client
            .get(&models_url)
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| fail(e.to_string()))?;
        if !status.is_success() {
            return Err(fail(format!(
                "status {status}: {}",
                error_message(&String::from_utf8_lossy(&body))
            )));
        }
        let value: Value =
            serde_json::from_slice(&body).map_err(|e| fail(format!("bad JSON: {e}")))?;
        value
            .get("data")
            .and_then(|d| d.get(0))
            .and_then(|m| m.get("id"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| fail("the server lists no model; pass --model".into()))
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| fail(format!("no answer within {timeout:?}")))?
}

/// The JSON body of one request. Token ids go to a chat route as their decimal text
/// (callers send them to `/v1/completions`).
pub(crate) fn request_body(t: &Target, r: &Request<'_>) -> Value {
    let prompt = match r.prompt {
        PromptInput::Text(text) => json!(text),
        PromptInput::TokenIds(ids) => json!(ids),
    };
    let mut body = match (t.endpoint, r.prompt) {
        (Endpoint::Chat, PromptInput::Text(_)) => json!({
            "model": t.model,
            "messages": [{"role": "user", "content": prompt}],
        }),
        (Endpoint::Chat, PromptInput::TokenIds(_)) => json!({
            "model": t.model,
            "messages": [{"role": "user", "content": prompt.to_string()}],
        }),
        (Endpoint::Completions, _) => json!({"model": t.model, "prompt": prompt}),
    };
    if let Some(map) = body.as_object_mut() {
        map.insert("max_tokens".into(), json!(r.max_tokens));
        map.insert("ignore_eos".into(), json!(true));
        map.insert("stream".into(), json!(t.stream));
        if t.stream {
            map.insert("stream_options".into(), json!({"include_usage": true}));
        }
    }
    body
}

/// Sends one request and measures it; never fails: errors are in the outcome.
pub(crate) async fn measure(t: &Target, r: &Request<'_>) -> Outcome {
    let start = Instant::now();
    let mut outcome = Outcome {
        input_tokens: r.approx_input,
        ..Outcome::default()
    };
    let result = tokio::time::timeout(t.timeout, exchange(t, r, start, &mut outcome)).await;
    let error = match result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some((
            ErrorKind::Timeout,
            format!("no complete answer within {:?}", t.timeout),
        )),
    };
    if outcome.e2e.is_zero() {
        outcome.e2e = start.elapsed();
    }
    outcome.error = error;
    outcome
}

type Failure = (ErrorKind, String);

/// How long the rest of a body may take to arrive after `data: [DONE]`.
const AFTER_DONE: Duration = Duration::from_secs(1);

fn transport(e: reqwest::Error) -> Failure {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_connect() {
        ErrorKind::Connect
    } else {
        ErrorKind::Transport
    };
    (kind, e.to_string())
}

async fn exchange(
    t: &Target,
    r: &Request<'_>,
    start: Instant,
    out: &mut Outcome,
) -> Result<(), Failure> {
    let url = format!("{}{}", base(&t.url), t.endpoint.path());
    let body = request_body(t, r).to_string();
    let resp = t
        .client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(transport)?;
    let status = resp.status();
    if status != reqwest::StatusCode::OK {
        let text = resp
            .bytes()
            .await
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let message = text.map(|t| error_message(&t)).unwrap_or_default();
        return Err((ErrorKind::Status(status.as_u16()), message));
    }
    if t.stream {
        read_stream(resp, start, out).await
    } else {
        read_whole(resp, start, out).await
    }
}

async fn read_stream(
    resp: reqwest::Response,
    start: Instant,
    out: &mut Outcome,
) -> Result<(), Failure> {
    let mut parser = SseParser::new();
    let mut events = Vec::new();
    let mut body = resp.bytes_stream();
    let mut state = StreamState::default();
    while let Some(bytes) = body.next().await {
        let bytes = bytes.map_err(transport)?;
        let now = Instant::now();
        parser.push(&bytes, &mut events);
        state.apply(events.drain(..), now, start, out)?;
        if state.done {
            // Read the end of the body so the connection goes back to the pool; a server
            // that keeps it open after [DONE] only loses the connection, not the request.
            let rest = async { while let Some(Ok(_)) = body.next().await {} };
            let _ = tokio::time::timeout(AFTER_DONE, rest).await;
            break;
        }
    }
    parser.finish(&mut events);
    state.apply(events.drain(..), Instant::now(), start, out)?;
    if !state.done {
        return Err((
            ErrorKind::Truncated,
            "the stream ended without data: [DONE]".into(),
        ));
    }
    out.output_tokens = state.usage_tokens.unwrap_or(state.content_chunks);
    Ok(())
}

#[derive(Default)]
struct StreamState {
    last_content: Option<Instant>,
    content_chunks: u64,
    usage_tokens: Option<u64>,
    done: bool,
}

impl StreamState {
    fn apply(
        &mut self,
        events: impl Iterator<Item = StreamEvent>,
        now: Instant,
        start: Instant,
        out: &mut Outcome,
    ) -> Result<(), Failure> {
        for event in events {
            if self.done {
                continue;
            }
            match event {
                StreamEvent::Content(text) if text.is_empty() => {}
                StreamEvent::Content(_) => {
                    match self.last_content {
                        None => out.ttft = Some(now - start),
                        Some(prev) => out.itl.push(now - prev),
                    }
                    self.last_content = Some(now);
                    self.content_chunks += 1;
                }
                StreamEvent::Usage(u) => {
                    self.usage_tokens = Some(u.completion_tokens);
                    if u.prompt_tokens > 0 {
                        out.input_tokens = u.prompt_tokens;
                    }
                }
                StreamEvent::Done => {
                    self.done = true;
                    out.e2e = now - start;
                }
                StreamEvent::Error(message) => return Err((ErrorKind::SseError, message)),
                StreamEvent::Malformed(message) => return Err((ErrorKind::BadResponse, message)),
            }
        }
        Ok(())
    }
}

async fn read_whole(
    resp: reqwest::Response,
    start: Instant,
    out: &mut Outcome,
) -> Result<(), Failure> {
    let bytes = resp.bytes().await.map_err(transport)?;
    out.e2e = start.elapsed();
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| (ErrorKind::BadResponse, format!("bad JSON: {e}")))?;
    if value.get("error").is_some() {
        return Err((
            ErrorKind::BadResponse,
            error_message(&String::from_utf8_lossy(&bytes)),
        ));
    }
    let choice = value.get("choices").and_then(|c| c.get(0));
    let text = choice
        .and_then(|c| {
            c.get("message")
                .and_then(|m| m.get("content"))
                .or_else(|| c.get("text"))
        })
        .and_then(Value::as_str)
        .ok_or_else(|| {
            (
                ErrorKind::BadResponse,
                "the answer has no choices[0] text".to_string(),
            )
        })?;
    let usage = usage_of(&value);
    if let Some(u) = usage.filter(|u| u.prompt_tokens > 0) {
        out.input_tokens = u.prompt_tokens;
    }
    // Without usage, whitespace-separated words stand in for tokens.
    out.output_tokens = usage.map_or(text.split_whitespace().count() as u64, |u| {
        u.completion_tokens
    });
    Ok(())
}
