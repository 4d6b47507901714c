//! Happy paths (streamed and whole, chat and completions), mid-stream errors, and a client
//! that disconnects mid-stream cancelling the downstream.

use dynamo_frontend::openai::COMPLETIONS_DEFAULT_MAX_TOKENS;
use dynamo_protocol::Prompt;
use serde_json::{json, Value};

use crate::common::{
    config, expected_text, read_events, sse_events, start, CACHED_TOKENS, MODEL, PROMPT_TOKENS,
};

fn chat(content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}]})
}

async fn post_stream(
    server: &crate::common::Server,
    path: &str,
    body: &Value,
) -> (u16, String, String) {
    let response = server
        .client
        .post(server.url(path))
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, content_type, response.text().await.expect("body"))
}

#[tokio::test]
async fn streamed_chat_has_role_chunks_finish_usage_and_done() {
    let server = start(config()).await;
    let mut body = chat("hello");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body["max_completion_tokens"] = json!(4);
    let (status, content_type, text) = post_stream(&server, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(content_type, "text/event-stream");

    let events = sse_events(&text);
    assert_eq!(
        events.last().map(|(_, d)| d.as_str()),
        Some("[DONE]"),
        "{text}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(name, data)| {
            assert_eq!(name, &None, "no named events on success");
            serde_json::from_str(data).expect("chunk is JSON")
        })
        .collect();
    // 4 content chunks (the last carrying the finish reason) and the usage chunk.
    assert_eq!(chunks.len(), 5, "{text}");
    let id = chunks[0]["id"].as_str().expect("id").to_string();
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], MODEL);
        assert_eq!(chunk["id"], id.as_str());
        assert!(chunk["created"].as_u64().is_some());
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks[1]["choices"][0]["delta"].get("role").is_none());
    let content: String = chunks[..4]
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(content, expected_text(4));
    for chunk in &chunks[..3] {
        assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
    }
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "length");
    let usage = &chunks[4];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], PROMPT_TOKENS);
    assert_eq!(usage["usage"]["completion_tokens"], 4);
    assert_eq!(usage["usage"]["total_tokens"], PROMPT_TOKENS + 4);
    assert_eq!(
        usage["usage"]["prompt_tokens_details"]["cached_tokens"],
        CACHED_TOKENS
    );

    assert_eq!(
        server.fake.last_request().and_then(|r| r.max_tokens),
        Some(4)
    );
    assert_eq!(server.requests_total("chat_completions", 200).await, 1);
    let output = server
        .metric(&format!(
            "dynamo_frontend_output_tokens_total{{model=\"{MODEL}\"}}"
        ))
        .await;
    assert_eq!(output, Some(4.0));
    let input = server
        .metric(&format!(
            "dynamo_frontend_input_tokens_total{{model=\"{MODEL}\"}}"
        ))
        .await;
    assert_eq!(input, Some(f64::from(PROMPT_TOKENS)));
    let ttft = server
        .metric(&format!(
            "dynamo_frontend_time_to_first_token_seconds_count{{model=\"{MODEL}\"}}"
        ))
        .await;
    assert_eq!(ttft, Some(1.0));
    let itl = server
        .metric(&format!(
            "dynamo_frontend_inter_token_latency_seconds_count{{model=\"{MODEL}\"}}"
        ))
        .await;
    assert_eq!(itl, Some(3.0));
}

#[tokio::test]
async fn streamed_without_usage_has_no_usage_chunk() {
    let server = start(config()).await;
    let mut body = chat("hello");
    body["stream"] = json!(true);
    let (status, _, text) = post_stream(&server, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200);
    let events = sse_events(&text);
    assert_eq!(events.len(), 3 + 1, "{text}");
    assert!(!text.contains("\"usage\""), "{text}");
    assert!(text.contains("\"finish_reason\":\"stop\""), "{text}");
}

#[tokio::test]
async fn whole_chat_completion_aggregates_text_and_usage() {
    let server = start(config()).await;
    let body = json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}
        ],
        "max_tokens": 5, "temperature": 0.25, "top_p": 0.5, "top_k": 20, "seed": 42,
        "stop": ["END", "\n\n"], "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "n": 1, "user": "alice", "ignore_eos": true, "stream": false
    });
    let (status, value) = server.post_json("/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{value}");
    assert_eq!(value["object"], "chat.completion");
    assert_eq!(value["model"], MODEL);
    assert!(value["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("chatcmpl-")));
    let choice = &value["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], expected_text(5));
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(value["usage"]["prompt_tokens"], PROMPT_TOKENS);
    assert_eq!(value["usage"]["completion_tokens"], 5);
    assert_eq!(value["usage"]["total_tokens"], PROMPT_TOKENS + 5);

    let request = server
        .fake
        .last_request()
        .expect("the fake saw the request");
    assert_eq!(request.model, MODEL);
    assert_eq!(request.max_tokens, Some(5));
    assert_eq!(request.sampling.temperature, 0.25);
    assert_eq!(request.sampling.top_p, 0.5);
    assert_eq!(request.sampling.top_k, 20);
    assert_eq!(request.sampling.seed, Some(42));
    assert_eq!(request.sampling.presence_penalty, 0.5);
    assert_eq!(request.sampling.frequency_penalty, -0.5);
    assert_eq!(request.stop, vec!["END".to_string(), "\n\n".to_string()]);
    assert!(request.ignore_eos);
    match request.prompt {
        Prompt::Chat(messages) => {
            assert_eq!(messages.len(), 2);
            assert_eq!(messages[0].role, "system");
            assert_eq!(messages[1].content, "part one\npart two");
        }
        other => panic!("expected a chat prompt, got {other:?}"),
    }
}

#[tokio::test]
async fn completions_whole_and_streamed() {
    let server = start(config()).await;
    let (status, value) = server
        .post_json(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": [5, 6, 7]}),
        )
        .await;
    assert_eq!(status, 200, "{value}");
    assert_eq!(value["object"], "text_completion");
    assert!(value["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("cmpl-")));
    // No max_tokens: OpenAI's default of 16 for completions.
    assert_eq!(
        value["choices"][0]["text"],
        expected_text(COMPLETIONS_DEFAULT_MAX_TOKENS)
    );
    assert_eq!(value["choices"][0]["finish_reason"], "length");
    assert_eq!(
        server.fake.last_request().map(|r| r.prompt),
        Some(Prompt::Tokens(vec![5, 6, 7]))
    );

    let body = json!({"model": MODEL, "prompt": ["once upon"], "stream": true, "max_tokens": 2,
        "stream_options": {"include_usage": true}});
    let (status, _, text) = post_stream(&server, "/v1/completions", &body).await;
    assert_eq!(status, 200);
    let events = sse_events(&text);
    let chunks: Vec<Value> = events
        .iter()
        .take_while(|(_, d)| d != "[DONE]")
        .map(|(_, d)| serde_json::from_str(d).expect("chunk is JSON"))
        .collect();
    assert_eq!(chunks.len(), 3, "{text}");
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let joined: String = chunks[..2]
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(joined, expected_text(2));
    assert_eq!(chunks[2]["usage"]["completion_tokens"], 2);
    assert_eq!(events.last().map(|(_, d)| d.as_str()), Some("[DONE]"));
    assert_eq!(
        server.fake.last_request().map(|r| r.prompt),
        Some(Prompt::Text("once upon".into()))
    );
}

#[tokio::test]
async fn an_error_mid_stream_is_an_sse_error_event_and_the_end() {
    let server = start(config()).await;
    let mut body = chat("fail-mid");
    body["stream"] = json!(true);
    let (status, _, text) = post_stream(&server, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "headers were sent before the failure");
    let events = sse_events(&text);
    assert_eq!(events.len(), 3, "{text}");
    let (name, data) = &events[2];
    assert_eq!(name.as_deref(), Some("error"));
    let error: Value = serde_json::from_str(data).expect("error event is JSON");
    assert_eq!(error["error"]["type"], "server_error");
    assert!(!text.contains("[DONE]"));
    assert_eq!(server.requests_total("chat_completions", 500).await, 1);
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_downstream() {
    let server = start(config()).await;
    let mut body = chat("infinite");
    body["stream"] = json!(true);
    let response = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status().as_u16(), 200);
    let mut stream = response.bytes_stream();
    let text = read_events(&mut stream, 3).await;
    assert!(sse_events(&text).len() >= 3, "streaming started: {text}");
    assert_eq!(
        server
            .fake
            .cancelled
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    drop(stream);

    assert!(
        server.fake.wait_cancelled(1).await,
        "the downstream context was not cancelled and its stream not dropped in time"
    );
    assert!(
        server
            .wait_metric("dynamo_frontend_inflight_requests", 0.0)
            .await
    );
    assert_eq!(server.requests_total("chat_completions", 499).await, 1);
}

#[tokio::test]
async fn a_completed_request_is_not_cancelled() {
    let server = start(config()).await;
    let (status, _) = server
        .post_json("/v1/chat/completions", &chat("hello"))
        .await;
    assert_eq!(status, 200);
    let mut body = chat("hello");
    body["stream"] = json!(true);
    let (status, _, _) = post_stream(&server, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(
        server
            .fake
            .cancelled
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(
        server
            .fake
            .dropped_early
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn a_client_that_gives_up_before_the_first_token_cancels_the_downstream() {
    let server = start(config()).await;
    for stream in [false, true] {
        let mut body = chat("hold");
        body["stream"] = json!(stream);
        let impatient = reqwest::Client::builder()
            .timeout(std::time::Duration::from_millis(300))
            .build()
            .expect("client");
        let result = impatient
            .post(server.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await;
        assert!(
            result.is_err(),
            "the fake holds until cancelled, so the client times out"
        );
        drop(impatient);
        let n = if stream { 2 } else { 1 };
        assert!(
            server.fake.wait_cancelled(n).await,
            "stream={stream}: a request whose client left while waiting was not cancelled"
        );
    }
    assert!(
        server
            .wait_metric("dynamo_frontend_inflight_requests", 0.0)
            .await
    );
    assert_eq!(server.requests_total("chat_completions", 499).await, 2);
}

#[tokio::test]
async fn a_client_that_leaves_during_a_pause_cancels_the_downstream() {
    // No write fails here (nothing is being sent): the server must notice the closed
    // connection by itself.
    let server = start(config()).await;
    let mut body = chat("one-then-hold");
    body["stream"] = json!(true);
    let client = reqwest::Client::new();
    let response = client
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("request sent");
    let mut stream = response.bytes_stream();
    let text = read_events(&mut stream, 1).await;
    assert!(text.contains("first"), "{text}");
    drop(stream);
    drop(client);
    assert!(
        server.fake.wait_cancelled(1).await,
        "a stream paused between tokens was not cancelled when its client left"
    );
}
