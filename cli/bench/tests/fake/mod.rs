//! A tiny OpenAI-like SSE server with known delays, run inside the test process on a free
//! loopback port.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

/// How the fake answers generation requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Streams `max_tokens` one-word chunks: the first after `ttft`, then one per `itl`,
    /// then a usage chunk and `[DONE]`.
    Stream { ttft: Duration, itl: Duration },
    /// Every request gets a 400 with an OpenAI error body.
    BadRequest,
    /// Waits this long before answering at all.
    Stall(Duration),
    /// Sends two content chunks, then `event: error`.
    ErrorMidStream,
    /// Sends two content chunks and ends without `[DONE]`.
    Truncated,
    /// Streams like `Stream` (5 ms delays), then holds the body open for 30 s after `[DONE]`.
    HangAfterDone,
}

/// What the fake saw.
#[derive(Default)]
pub struct Seen {
    pub requests: AtomicU64,
    pub bodies: Mutex<Vec<Value>>,
}

struct App {
    mode: Mode,
    seen: Arc<Seen>,
}

/// Starts the fake; returns its base URL and what it records.
pub async fn start(mode: Mode) -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = Arc::new(App {
        mode,
        seen: seen.clone(),
    });
    let router = Router::new()
        .route(
            "/v1/models",
            get(|| async {
                json_response(
                    StatusCode::OK,
                    json!({"object": "list", "data": [{"id": "fake"}, {"id": "other"}]}),
                )
            }),
        )
        .route("/v1/chat/completions", post(generate))
        .route("/v1/completions", post(generate))
        .with_state(app);
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => panic!("cannot bind a loopback port: {e}"),
    };
    let url = match listener.local_addr() {
        Ok(a) => format!("http://{a}"),
        Err(e) => panic!("no local address: {e}"),
    };
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (url, seen)
}

fn json_response(status: StatusCode, v: Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn chunk(chat: bool, text: &str) -> String {
    let v = if chat {
        json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
    } else {
        json!({"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": null}]})
    };
    format!("data: {v}\n\n")
}

async fn generate(State(app): State<Arc<App>>, uri: axum::http::Uri, body: Bytes) -> Response {
    app.seen.requests.fetch_add(1, Ordering::SeqCst);
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Ok(mut bodies) = app.seen.bodies.lock() {
        bodies.push(req.clone());
    }
    let chat = uri.path().contains("chat");
    let n = req["max_tokens"].as_u64().unwrap_or(16).min(256);
    let stream = req["stream"].as_bool().unwrap_or(false);
    let (ttft, itl) = match app.mode {
        Mode::BadRequest => {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({"error": {"message": "temperature must be at most 2", "type": "invalid_request_error", "param": "temperature", "code": null}}),
            )
        }
        Mode::Stall(d) => {
            tokio::time::sleep(d).await;
            return json_response(StatusCode::OK, json!({}));
        }
        Mode::Stream { ttft, itl } => (ttft, itl),
        Mode::ErrorMidStream | Mode::Truncated | Mode::HangAfterDone => {
            (Duration::from_millis(5), Duration::from_millis(5))
        }
    };
    if !stream {
        tokio::time::sleep(ttft + itl * (n.saturating_sub(1) as u32)).await;
        let text = vec!["word"; n as usize].join(" ");
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
        } else {
            json!({"index": 0, "text": text, "finish_reason": "length"})
        };
        return json_response(
            StatusCode::OK,
            json!({"choices": [choice], "usage": {"prompt_tokens": 11, "completion_tokens": n, "total_tokens": 11 + n}}),
        );
    }
    let mode = app.mode;
    // Each step: (delay before it, the bytes to send). Ends with None.
    let mut steps: Vec<(Duration, String)> = Vec::new();
    if chat {
        steps.push((
            Duration::ZERO,
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n".into(),
        ));
    }
    match mode {
        Mode::ErrorMidStream | Mode::Truncated => {
            steps.push((ttft, chunk(chat, "a")));
            steps.push((itl, chunk(chat, " b")));
            if mode == Mode::ErrorMidStream {
                steps.push((itl, "event: error\ndata: {\"error\":{\"message\":\"engine went away\",\"type\":\"internal_error\"}}\n\n".into()));
            }
        }
        _ => {
            for i in 0..n {
                steps.push((if i == 0 { ttft } else { itl }, chunk(chat, " word")));
            }
            let usage = json!({"choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}});
            steps.push((Duration::ZERO, format!("data: {usage}\n\n")));
            steps.push((Duration::ZERO, "data: [DONE]\n\n".into()));
            if mode == Mode::HangAfterDone {
                steps.push((Duration::from_secs(30), String::new()));
            }
        }
    }
    let stream = futures::stream::unfold(steps.into_iter(), |mut steps| async move {
        let (delay, bytes) = steps.next()?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok::<_, Infallible>(Bytes::from(bytes)), steps))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
