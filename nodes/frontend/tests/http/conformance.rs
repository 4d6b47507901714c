//! Malformed and hostile requests: each must get its own 4xx with OpenAI's error JSON
//! naming the parameter, the server must keep serving, and `/metrics` must count them.

use serde_json::{json, Value};

use crate::common::{config, start, MODEL};

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

struct Case {
    name: &'static str,
    path: &'static str,
    body: Vec<u8>,
    status: u16,
    error_type: &'static str,
    /// `None`: the error must have `"param": null`.
    param: Option<&'static str>,
}

fn case(
    name: &'static str,
    path: &'static str,
    body: Value,
    status: u16,
    param: Option<&'static str>,
) -> Case {
    Case {
        name,
        path,
        body: body.to_string().into_bytes(),
        status,
        error_type: "invalid_request_error",
        param,
    }
}

fn raw(name: &'static str, path: &'static str, body: &[u8], status: u16) -> Case {
    Case {
        name,
        path,
        body: body.to_vec(),
        status,
        error_type: "invalid_request_error",
        param: None,
    }
}

/// A valid chat body with `field` set to `value`.
fn chat_with(field: &str, value: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    body[field] = value;
    body
}

fn completion_with(field: &str, value: Value) -> Value {
    let mut body = json!({"model": MODEL, "prompt": "hi"});
    body[field] = value;
    body
}

fn cases() -> Vec<Case> {
    let user = |content: Value| json!({"model": MODEL, "messages": [{"role": "user", "content": content}]});
    let mut deep = "[".repeat(5000).into_bytes();
    deep.extend(std::iter::repeat_n(b']', 5000));
    vec![
        raw(
            "truncated JSON",
            CHAT,
            br#"{"model": "test-model", "messages": ["#,
            400,
        ),
        raw("empty body", CHAT, b"", 400),
        raw(
            "invalid UTF-8",
            CHAT,
            b"{\"model\": \"test-model\xff\xfe\", \"messages\": []}",
            400,
        ),
        raw("top-level array", CHAT, b"[1, 2, 3]", 400),
        raw("nesting past the recursion limit", CHAT, &deep, 400),
        raw(
            "trailing garbage",
            COMPLETIONS,
            br#"{"model":"test-model","prompt":"x"} nonsense"#,
            400,
        ),
        case(
            "missing model",
            CHAT,
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            400,
            Some("model"),
        ),
        case(
            "model is a number",
            CHAT,
            chat_with("model", json!(5)),
            400,
            Some("model"),
        ),
        case(
            "unknown model",
            CHAT,
            chat_with("model", json!("gpt-17")),
            404,
            Some("model"),
        ),
        case(
            "missing messages",
            CHAT,
            json!({"model": MODEL}),
            400,
            Some("messages"),
        ),
        case(
            "empty messages",
            CHAT,
            chat_with("messages", json!([])),
            400,
            Some("messages"),
        ),
        case(
            "messages is a string",
            CHAT,
            chat_with("messages", json!("hi")),
            400,
            Some("messages"),
        ),
        case(
            "bad role",
            CHAT,
            json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
            400,
            Some("messages[0].role"),
        ),
        case(
            "tool role",
            CHAT,
            json!({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}),
            400,
            Some("messages[0].role"),
        ),
        case(
            "content is a number",
            CHAT,
            user(json!(42)),
            400,
            Some("messages[0].content"),
        ),
        case(
            "image content part",
            CHAT,
            user(json!([{"type": "image_url", "image_url": {"url": "x"}}])),
            400,
            Some("messages[0].content[0].type"),
        ),
        case(
            "unknown part type",
            CHAT,
            user(json!([{"type": "audio"}])),
            400,
            Some("messages[0].content[0].type"),
        ),
        case(
            "unknown message field",
            CHAT,
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x", "bar": 1}]}),
            400,
            Some("messages[0].bar"),
        ),
        case(
            "unknown top-level field",
            CHAT,
            chat_with("foo", json!(1)),
            400,
            Some("foo"),
        ),
        case(
            "max_tokens zero",
            CHAT,
            chat_with("max_tokens", json!(0)),
            400,
            Some("max_tokens"),
        ),
        case(
            "max_tokens negative",
            CHAT,
            chat_with("max_tokens", json!(-5)),
            400,
            Some("max_tokens"),
        ),
        case(
            "max_tokens a string",
            CHAT,
            chat_with("max_tokens", json!("10")),
            400,
            Some("max_tokens"),
        ),
        case(
            "max_tokens past u32",
            CHAT,
            chat_with("max_tokens", json!(1u64 << 40)),
            400,
            Some("max_tokens"),
        ),
        case(
            "max_completion_tokens fractional",
            CHAT,
            chat_with("max_completion_tokens", json!(1.5)),
            400,
            Some("max_completion_tokens"),
        ),
        case(
            "temperature 5",
            CHAT,
            chat_with("temperature", json!(5)),
            400,
            Some("temperature"),
        ),
        case(
            "temperature a string",
            CHAT,
            chat_with("temperature", json!("hot")),
            400,
            Some("temperature"),
        ),
        case(
            "top_p zero",
            CHAT,
            chat_with("top_p", json!(0)),
            400,
            Some("top_p"),
        ),
        case(
            "top_p above one",
            CHAT,
            chat_with("top_p", json!(1.5)),
            400,
            Some("top_p"),
        ),
        case(
            "top_k negative",
            CHAT,
            chat_with("top_k", json!(-7)),
            400,
            Some("top_k"),
        ),
        case(
            "five stop strings",
            CHAT,
            chat_with("stop", json!(["a", "b", "c", "d", "e"])),
            400,
            Some("stop"),
        ),
        case(
            "stop list of numbers",
            CHAT,
            chat_with("stop", json!([1])),
            400,
            Some("stop[0]"),
        ),
        case(
            "stop an object",
            CHAT,
            chat_with("stop", json!({"a": 1})),
            400,
            Some("stop"),
        ),
        case(
            "presence_penalty 3",
            CHAT,
            chat_with("presence_penalty", json!(3)),
            400,
            Some("presence_penalty"),
        ),
        case(
            "frequency_penalty -2.5",
            CHAT,
            chat_with("frequency_penalty", json!(-2.5)),
            400,
            Some("frequency_penalty"),
        ),
        case("n = 2", CHAT, chat_with("n", json!(2)), 400, Some("n")),
        case(
            "stream a string",
            CHAT,
            chat_with("stream", json!("yes")),
            400,
            Some("stream"),
        ),
        case(
            "stream_options without stream",
            CHAT,
            chat_with("stream_options", json!({"include_usage": true})),
            400,
            Some("stream_options"),
        ),
        case(
            "seed fractional",
            CHAT,
            chat_with("seed", json!(1.5)),
            400,
            Some("seed"),
        ),
        case(
            "user a number",
            CHAT,
            chat_with("user", json!(5)),
            400,
            Some("user"),
        ),
        case(
            "ignore_eos a string",
            CHAT,
            chat_with("ignore_eos", json!("true")),
            400,
            Some("ignore_eos"),
        ),
        case(
            "tools requested",
            CHAT,
            chat_with("tools", json!([{"type": "function"}])),
            400,
            Some("tools"),
        ),
        case(
            "logprobs requested",
            CHAT,
            chat_with("logprobs", json!(true)),
            400,
            Some("logprobs"),
        ),
        case(
            "missing prompt",
            COMPLETIONS,
            json!({"model": MODEL}),
            400,
            Some("prompt"),
        ),
        case(
            "prompt an object",
            COMPLETIONS,
            completion_with("prompt", json!({})),
            400,
            Some("prompt"),
        ),
        case(
            "two prompts",
            COMPLETIONS,
            completion_with("prompt", json!(["a", "b"])),
            400,
            Some("prompt"),
        ),
        case(
            "negative token id",
            COMPLETIONS,
            completion_with("prompt", json!([1, -2])),
            400,
            Some("prompt[1]"),
        ),
        case(
            "messages on completions",
            COMPLETIONS,
            completion_with("messages", json!([])),
            400,
            Some("messages"),
        ),
        case(
            "echo requested",
            COMPLETIONS,
            completion_with("echo", json!(true)),
            400,
            Some("echo"),
        ),
        case(
            "unknown model on completions",
            COMPLETIONS,
            completion_with("model", json!("nope")),
            404,
            Some("model"),
        ),
    ]
}

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
