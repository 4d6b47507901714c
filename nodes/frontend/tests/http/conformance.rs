//! Malformed and hostile requests: each must get its own 4xx with OpenAI's error JSON
//! naming the parameter, the server must keep serving, and `/metrics` must count them.

use serde_json::{json, Value};

use crate::cases::{cases, chat_with, Case, CHAT, COMPLETIONS};
use crate::common::{config, start, MODEL};

async fn check(server: &crate::common::Server, case: &Case) {
    let (status, body) = server.post(case.path, case.body.clone()).await;
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, case.status, "{}: status, body {text}", case.name);
    let value: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| panic!("{}: error body is not JSON: {text}", case.name));
    let error = &value["error"];
    assert_eq!(error["type"], case.error_type, "{}: {text}", case.name);
    assert_eq!(error["param"].as_str(), case.param, "{}: {text}", case.name);
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}: no message in {text}",
        case.name
    );
    assert!(
        error.get("code").is_some(),
        "{}: no code in {text}",
        case.name
    );
}

#[tokio::test]
async fn every_malformed_request_gets_a_named_client_error() {
    let server = start(config()).await;
    let cases = cases();
    assert!(cases.len() >= 25);
    for case in &cases {
        check(&server, case).await;
    }
    assert!(
        server
            .fake
            .requests
            .lock()
            .map(|r| r.is_empty())
            .unwrap_or(false),
        "no malformed request may reach the downstream"
    );

    // Still serving, and every refusal was counted under its endpoint and status.
    let (status, answer) = server
        .post_json("/v1/chat/completions", &chat_with("max_tokens", json!(2)))
        .await;
    assert_eq!(status, 200, "{answer}");
    for (endpoint, path) in [("chat_completions", CHAT), ("completions", COMPLETIONS)] {
        for status in [400u16, 404] {
            let expected = cases
                .iter()
                .filter(|c| c.path == path && c.status == status)
                .count() as u64;
            assert_eq!(
                server.requests_total(endpoint, status).await,
                expected,
                "{endpoint} {status}"
            );
        }
    }
    assert_eq!(server.requests_total("chat_completions", 200).await, 1);
}

#[tokio::test]
async fn oversized_bodies_are_413_with_or_without_a_length() {
    let server = start(config()).await;
    let limit = config().max_body_bytes;
    let prompt = "x".repeat(limit * 3);
    let body = json!({"model": MODEL, "prompt": prompt}).to_string();

    // Declared length over the limit.
    let (status, answer) = server.post(COMPLETIONS, body.clone()).await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&answer));
    let value: Value = serde_json::from_slice(&answer).expect("413 body is JSON");
    assert_eq!(value["error"]["code"], "request_too_large");

    // Chunked, so only the reader can notice.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body
        .into_bytes()
        .chunks(8 * 1024)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let stream = futures::stream::iter(chunks);
    let (status, answer) = server
        .post(COMPLETIONS, reqwest::Body::wrap_stream(stream))
        .await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(server.requests_total("completions", 413).await, 2);

    // Just under the limit is fine.
    let fits = json!({"model": MODEL, "prompt": "y".repeat(limit - 100), "max_tokens": 1});
    let (status, _) = server.post_json(COMPLETIONS, &fits).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn wrong_method_and_unknown_path_are_json() {
    let server = start(config()).await;
    let response = server
        .client
        .get(server.url(CHAT))
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status().as_u16(), 405);
    let value: Value = response.json().await.expect("405 body is JSON");
    assert_eq!(value["error"]["code"], "method_not_allowed");

    let response = server
        .client
        .post(server.url("/v1/engines/davinci"))
        .body("{}")
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status().as_u16(), 404);
    let value: Value = response.json().await.expect("404 body is JSON");
    assert_eq!(value["error"]["code"], "unknown_url");
    assert_eq!(value["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn downstream_error_kinds_map_to_statuses() {
    let server = start(config()).await;
    for (kind, status, error_type) in [
        ("invalid", 400, "invalid_request_error"),
        ("notfound", 404, "invalid_request_error"),
        ("overloaded", 503, "server_error"),
        ("unavailable", 503, "server_error"),
        ("internal", 500, "server_error"),
    ] {
        for stream in [false, true] {
            let mut body = json!({"model": MODEL, "messages": [
                {"role": "user", "content": format!("fail-first:{kind}")}
            ]});
            body["stream"] = json!(stream);
            let (got, value) = server.post_json(CHAT, &body).await;
            assert_eq!(got, status, "{kind} stream={stream}: {value}");
            assert_eq!(value["error"]["type"], error_type, "{kind}: {value}");
            assert!(value["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("fake refused")));
        }
    }
    assert_eq!(server.requests_total("chat_completions", 503).await, 4);
    assert_eq!(server.requests_total("chat_completions", 500).await, 2);
}
