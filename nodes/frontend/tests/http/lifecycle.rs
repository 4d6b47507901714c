//! Everything around generation: TCP_NODELAY, health and liveness, the model list,
//! request ids, the in-flight limit, the request timeout and graceful shutdown.

use std::sync::atomic::Ordering;
use std::time::Duration;

use dynamo_frontend::FrontendConfig;
use serde_json::{json, Value};

use crate::common::{config, read_events, sse_events, start, MODEL, WAIT};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn chat(content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}]})
}

#[tokio::test]
async fn every_accepted_socket_has_tcp_nodelay() {
    let server = start(config()).await;
    for _ in 0..3 {
        // A fresh client each time: a new connection to accept.
        let client = reqwest::Client::builder()
            .timeout(WAIT)
            .build()
            .expect("client");
        let response = client
            .get(server.url("/live"))
            .send()
            .await
            .expect("request sent");
        assert_eq!(response.status().as_u16(), 200);
    }
    let seen = server.nodelay.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(seen.len() >= 3, "accept hook saw {} sockets", seen.len());
    assert!(
        seen.iter().all(|on| *on),
        "TCP_NODELAY off on some socket: {seen:?}"
    );
}

#[tokio::test]
async fn health_follows_readiness_and_live_is_always_up() {
    let server = start(config()).await;
    let (status, text) = server.get_text("/health").await;
    assert_eq!(status, 200, "{text}");
    let value: Value = serde_json::from_str(&text).expect("health is JSON");
    assert_eq!(value["status"], "healthy");

    server.ready.store(false, Ordering::SeqCst);
    let (status, text) = server.get_text("/health").await;
    assert_eq!(status, 503, "{text}");
    let value: Value = serde_json::from_str(&text).expect("health is JSON");
    assert_eq!(value["status"], "unhealthy");

    let (status, text) = server.get_text("/live").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&text).ok(),
        Some(json!({"status": "live"}))
    );
}

#[tokio::test]
async fn models_lists_the_served_names() {
    let server = start(config()).await;
    let (status, text) = server.get_text("/v1/models").await;
    assert_eq!(status, 200);
    let value: Value = serde_json::from_str(&text).expect("models is JSON");
    assert_eq!(value["object"], "list");
    let ids: Vec<&str> = value["data"]
        .as_array()
        .map(|d| d.iter().filter_map(|m| m["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, config().served_models);
    assert!(value["data"]
        .as_array()
        .is_some_and(|d| d.iter().all(|m| m["object"] == "model")));

    let (status, text) = server.get_text(&format!("/v1/models/{MODEL}")).await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = server.get_text("/v1/models/nope").await;
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("model_not_found"));
}

#[tokio::test]
async fn request_ids_are_echoed_and_forwarded() {
    let server = start(config()).await;
    let response = server
        .client
        .post(server.url("/v1/chat/completions"))
        .header("x-request-id", "req-abc-123")
        .header("traceparent", TRACEPARENT)
        .json(&chat("hello"))
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("req-abc-123")
    );
    let value: Value = response.json().await.expect("JSON");
    assert_eq!(value["id"], "chatcmpl-req-abc-123");
    let contexts = server
        .fake
        .contexts
        .lock()
        .map(|c| c.clone())
        .unwrap_or_default();
    assert_eq!(
        contexts,
        vec![("req-abc-123".to_string(), Some(TRACEPARENT.to_string()))],
        "the downstream context carries the request id and trace"
    );

    // Without one, a fresh id is made (and differs per request).
    let mut ids = Vec::new();
    for _ in 0..2 {
        let response = server
            .client
            .post(server.url("/v1/chat/completions"))
            .json(&chat("hello"))
            .send()
            .await
            .expect("request sent");
        ids.push(
            response
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        );
    }
    assert!(ids[0].is_some() && ids[0] != ids[1], "{ids:?}");
}

#[tokio::test]
async fn over_the_inflight_limit_is_503_then_recovers() {
    let server = start(FrontendConfig {
        max_inflight: 1,
        ..config()
    })
    .await;
    let mut held = chat("hold");
    held["stream"] = json!(true);
    let client = server.client.clone();
    let url = server.url("/v1/chat/completions");
    let first = tokio::spawn(async move { client.post(url).json(&held).send().await });

    assert!(
        server
            .wait_metric("dynamo_frontend_inflight_requests", 1.0)
            .await
    );
    let (status, value) = server
        .post_json("/v1/chat/completions", &chat("hello"))
        .await;
    assert_eq!(status, 503, "{value}");
    assert_eq!(value["error"]["type"], "server_error");
    assert_eq!(value["error"]["code"], "overloaded");

    server.fake.release.notify_waiters();
    let response = tokio::time::timeout(WAIT, first)
        .await
        .expect("held request finished in time")
        .expect("task")
        .expect("response");
    let text = tokio::time::timeout(WAIT, response.text())
        .await
        .expect("body in time")
        .expect("body");
    assert!(
        text.contains("held") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );

    assert!(
        server
            .wait_metric("dynamo_frontend_inflight_requests", 0.0)
            .await
    );
    let (status, _) = server
        .post_json("/v1/chat/completions", &chat("hello"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(server.requests_total("chat_completions", 503).await, 1);
}

#[tokio::test]
async fn a_request_past_its_timeout_is_504_and_cancelled() {
    let server = start(FrontendConfig {
        request_timeout: Duration::from_millis(500),
        ..config()
    })
    .await;
    let (status, value) = server
        .post_json("/v1/chat/completions", &chat("hold"))
        .await;
    assert_eq!(status, 504, "{value}");
    assert_eq!(value["error"]["code"], "timeout");
    assert!(
        server.fake.wait_cancelled(1).await,
        "timed-out request was not cancelled"
    );

    // Streaming: the timeout arrives after the headers, as an SSE error event.
    let mut body = chat("infinite");
    body["stream"] = json!(true);
    let response = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("request sent");
    let text = tokio::time::timeout(WAIT, response.text())
        .await
        .expect("stream ended in time")
        .expect("body");
    let events = sse_events(&text);
    assert_eq!(
        events.last().and_then(|(n, _)| n.as_deref()),
        Some("error"),
        "{text}"
    );
    assert!(text.contains("\"code\":\"timeout\""), "{text}");
    assert!(server.fake.wait_cancelled(2).await);
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish_then_stops() {
    let server = start(config()).await;
    let mut body = chat("slow");
    body["stream"] = json!(true);
    let response = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("request sent");
    let mut stream = response.bytes_stream();
    let mut text = read_events(&mut stream, 1).await;
    assert!(!text.is_empty(), "streaming started");

    server.shutdown.cancel();
    // The in-flight stream still runs to its end.
    text.push_str(&read_events(&mut stream, 10).await);
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    drop(stream);

    let result = tokio::time::timeout(WAIT, server.task)
        .await
        .expect("serve returned within the bound")
        .expect("serve task");
    assert!(result.is_ok(), "{result:?}");
    let refused = tokio::net::TcpStream::connect(server.address).await;
    assert!(refused.is_err(), "still accepting after shutdown");
}

#[tokio::test]
async fn shutdown_is_bounded_by_the_grace_period() {
    let server = start(FrontendConfig {
        shutdown_grace: Duration::from_millis(200),
        ..config()
    })
    .await;
    let mut body = chat("infinite");
    body["stream"] = json!(true);
    let response = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("request sent");
    let mut stream = response.bytes_stream();
    assert!(!read_events(&mut stream, 1).await.is_empty());

    server.shutdown.cancel();
    let result = tokio::time::timeout(WAIT, server.task)
        .await
        .expect("serve returned after the grace period despite an endless stream")
        .expect("serve task");
    assert!(result.is_ok());
    assert!(
        server.fake.wait_cancelled(1).await,
        "the ended stream was not cancelled"
    );
    // The client was told why its stream ended.
    let rest = read_events(&mut stream, 1000).await;
    let events = sse_events(&rest);
    let (name, data) = events.last().cloned().unwrap_or_default();
    assert_eq!(name.as_deref(), Some("error"), "{rest}");
    assert!(data.contains("shutting down"), "{data}");
}
