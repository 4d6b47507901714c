//! The malformed and hostile requests of the conformance test, with the answer each
//! must get.

use serde_json::{json, Value};

use crate::common::MODEL;

pub const CHAT: &str = "/v1/chat/completions";
pub const COMPLETIONS: &str = "/v1/completions";

pub struct Case {
    pub name: &'static str,
    pub path: &'static str,
    pub body: Vec<u8>,
    pub status: u16,
    pub error_type: &'static str,
    /// `None`: the error must have `"param": null`.
    pub param: Option<&'static str>,
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
pub fn chat_with(field: &str, value: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    body[field] = value;
    body
}

fn completion_with(field: &str, value: Value) -> Value {
    let mut body = json!({"model": MODEL, "prompt": "hi"});
    body[field] = value;
    body
}

pub fn cases() -> Vec<Case> {
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
            "top_logprobs without logprobs",
            CHAT,
            chat_with("top_logprobs", json!(3)),
            400,
            Some("top_logprobs"),
        ),
        case(
            "top_logprobs above 20",
            CHAT,
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}),
            400,
            Some("top_logprobs"),
        ),
        case(
            "logprobs not a boolean in chat",
            CHAT,
            chat_with("logprobs", json!(3)),
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
