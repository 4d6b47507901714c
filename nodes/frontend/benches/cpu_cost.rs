//! CPU cost of the frontend itself, without sockets or an engine: requests go through the
//! real axum router in-process (on a current-thread runtime, so wall time is CPU time)
//! to a downstream that answers instantly.
//!
//! `cargo bench -p dynamo-frontend --bench cpu_cost`
//!
//! Budgets (the whole non-engine pipeline): ≤ 400 µs per request, ≤ 40 µs per token.
//! The last two lines are wall-clock round trips over loopback (client included).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use dynamo_frontend::openai::{parse_request, Endpoint};
use dynamo_frontend::{Frontend, FrontendConfig};
use dynamo_protocol::{ChatRequest, FinishReason, TextDelta, Usage};
use dynamo_runtime::{RequestContext, ResponseStream, Service};
use http_body_util::BodyExt;
use tower::ServiceExt;

/// Answers `max_tokens` one-token deltas at once.
struct InstantEngine;

impl Service<ChatRequest, TextDelta> for InstantEngine {
    fn call(&self, req: ChatRequest, _ctx: RequestContext) -> ResponseStream<TextDelta> {
        let n = req.max_tokens.unwrap_or(1);
        Box::pin(futures::stream::iter((0..n).map(move |i| {
            let last = i + 1 == n;
            Ok(TextDelta {
                text: " word".to_string(),
                tokens: 1,
                finish_reason: last.then_some(FinishReason::Length),
                usage: last.then_some(Usage {
                    prompt_tokens: 200,
                    completion_tokens: n,
                    cached_tokens: 0,
                }),
                logprobs: Vec::new(),
            })
        })))
    }
}

fn body(max_tokens: u32, stream: bool) -> String {
    let system = "You are a helpful assistant. ".repeat(10);
    let user = "Tell me about the history of the printing press in Europe. ".repeat(10);
    serde_json::json!({
        "model": "bench-model",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": max_tokens, "temperature": 0.7, "top_p": 0.9, "stream": stream,
        "stream_options": if stream { serde_json::json!({"include_usage": true}) } else { serde_json::Value::Null },
    })
    .to_string()
}

async fn one(router: &axum::Router, body: &str) -> usize {
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let response = router.clone().oneshot(request).await.expect("infallible");
    assert_eq!(response.status(), 200);
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    bytes.len()
}

fn report(name: &str, iterations: u32, elapsed: Duration, per: &str) {
    let micros = elapsed.as_secs_f64() * 1e6 / f64::from(iterations);
    println!("{name:<44} {micros:>9.2} µs/{per}");
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let frontend = Frontend::new(
        FrontendConfig::for_models(["bench-model"]),
        Arc::new(InstantEngine),
    )
    .expect("config");
    let router = frontend.router();
    let for_loopback = frontend.clone();
    let served = vec!["bench-model".to_string()];

    let small = body(1, false);
    let iterations = 20_000;
    let started = Instant::now();
    for _ in 0..iterations {
        let parsed = parse_request(Endpoint::ChatCompletions, small.as_bytes(), &served);
        assert!(parsed.is_ok());
    }
    report(
        &format!("parse a {}-byte chat request", small.len()),
        iterations,
        started.elapsed(),
        "request",
    );

    runtime.block_on(async {
        for (name, body, iterations, per_token) in [
            ("whole request, 1 token", body(1, false), 10_000, false),
            ("streamed request, 1 token", body(1, true), 10_000, false),
            (
                "streamed request, 1000 tokens (per token)",
                body(1000, true),
                100,
                true,
            ),
        ] {
            for _ in 0..iterations / 10 {
                one(&router, &body).await;
            }
            let started = Instant::now();
            for _ in 0..iterations {
                one(&router, &body).await;
            }
            let elapsed = started.elapsed();
            if per_token {
                report(name, iterations * 1000, elapsed, "token");
            } else {
                report(name, iterations, elapsed, "request");
            }
        }
    });
    loopback(for_loopback);
}

/// Round trips over a real loopback socket with a pooled client at concurrency 1
/// (wall clock, the client's work included): the latency a benchmark client would see
/// from the frontend alone.
fn loopback(frontend: Frontend) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let url = format!(
            "http://{}/v1/chat/completions",
            listener.local_addr().expect("address")
        );
        let shutdown = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(dynamo_frontend::serve(listener, frontend, shutdown.clone()));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        for (name, body) in [
            ("loopback round trip, whole, 1 token", body(1, false)),
            ("loopback round trip, streamed, 8 tokens", body(8, true)),
        ] {
            let iterations = 500;
            let mut worst = Duration::ZERO;
            let started = Instant::now();
            for _ in 0..iterations {
                let one = Instant::now();
                let response = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .expect("response");
                assert_eq!(response.status(), 200);
                response.bytes().await.expect("body");
                worst = worst.max(one.elapsed());
            }
            report(name, iterations, started.elapsed(), "request (mean)");
            println!("{:<44} {:>9.2} µs", "  worst", worst.as_secs_f64() * 1e6);
        }
        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    });
}
