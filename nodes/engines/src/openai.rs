//! The OpenAI `/v1/completions` dialect, pure: the request body for one of our token
//! requests, the server-sent-event framing, one streamed chunk, and HTTP errors as ours.

use dynamo_protocol::{FinishReason, TokenRequest};
use dynamo_runtime::{ErrorKind, ServeError};
use serde_json::{json, Value};

use crate::config::EngineKind;

/// The prompt as the engine takes it.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Ids(Vec<u32>),
    Text(String),
}

/// The JSON body of a streamed completion of `req`.
pub fn body(kind: EngineKind, model: &str, req: &TokenRequest, prompt: Prompt) -> Value {
    let s = &req.sampling;
    let mut b = json!({
        "model": model,
        "stream": true,
        "max_tokens": req.stop.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
    });
    b["prompt"] = match prompt {
        Prompt::Ids(ids) => json!(ids),
        Prompt::Text(t) => json!(t),
    };
    if let Some(seed) = s.seed {
        b["seed"] = json!(seed);
    }
    match kind {
        // llama-cpp-python: top_k 0 is "all tokens", as ours; its default is 40.
        EngineKind::LlamaCppServer => {
            b["top_k"] = json!(s.top_k);
            // Its own repeat penalty (default 1.1) would make greedy differ from ours.
            b["repeat_penalty"] = json!(1.0);
        }
        EngineKind::Vllm | EngineKind::Sglang => {
            // vLLM: -1 disables top-k (0 is refused); SGLang: -1 too.
            b["top_k"] = json!(if s.top_k == 0 { -1 } else { i64::from(s.top_k) });
            b["stop_token_ids"] = json!(req.stop.stop_token_ids);
            b["ignore_eos"] = json!(req.stop.ignore_eos);
            // vLLM: each chunk carries the ids of its text (`token_ids`).
            b["return_token_ids"] = json!(true);
            b["skip_special_tokens"] = json!(false);
        }
        EngineKind::TrtLlm | EngineKind::OpenAi => {}
    }
    b
}

/// Splits a byte stream into server-sent events' `data:` payloads.
#[derive(Debug, Default)]
pub struct SseBuffer {
    buf: Vec<u8>,
}

impl SseBuffer {
    /// The data of every event completed by `chunk`.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some((end, sep)) = find_blank_line(&self.buf) {
            let event: Vec<u8> = self.buf.drain(..end + sep).collect();
            let text = String::from_utf8_lossy(&event[..end]);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                out.push(data.join("\n"));
            }
        }
        out
    }
}

fn find_blank_line(b: &[u8]) -> Option<(usize, usize)> {
    let lf = b.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(c)) => Some(if a.0 <= c.0 { a } else { c }),
        (a, c) => a.or(c),
    }
}

/// One streamed choice, as far as we use it.
#[derive(Debug, Default, PartialEq)]
pub struct Chunk {
    pub text: String,
    /// The ids of `text`, when the engine says them (vLLM `return_token_ids`).
    pub token_ids: Option<Vec<u32>>,
    pub finish: Option<FinishReason>,
}

/// A chunk's JSON; an `error` object (some servers stream errors) is an error.
pub fn chunk(data: &str) -> Result<Chunk, ServeError> {
    let v: Value = serde_json::from_str(data)
        .map_err(|e| ServeError::internal(format!("engine sent a chunk that is not JSON: {e}")))?;
    if let Some(err) = v.get("error") {
        return Err(ServeError::internal(format!(
            "engine error: {}",
            message_of(err)
        )));
    }
    let Some(choice) = v.get("choices").and_then(|c| c.get(0)) else {
        // A usage-only chunk.
        return Ok(Chunk::default());
    };
    let text = choice
        .get("text")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let token_ids = choice.get("token_ids").and_then(Value::as_array).map(|a| {
        a.iter()
            .filter_map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect()
    });
    let finish = match choice.get("finish_reason").and_then(Value::as_str) {
        Some("length") => Some(FinishReason::Length),
        Some(_) => Some(FinishReason::Stop),
        None => None,
    };
    Ok(Chunk {
        text,
        token_ids,
        finish,
    })
}

fn message_of(err: &Value) -> String {
    err.get("message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| err.as_str().map(str::to_string))
        .unwrap_or_else(|| err.to_string())
}

/// An HTTP error answer as ours: 429/503 are overload, other 4xx the request's fault (with
/// the engine's message), 5xx the engine's.
pub fn http_error(status: u16, body: &str) -> ServeError {
    let msg = serde_json::from_str::<Value>(body)
        .ok()
        .map(|v| {
            v.get("error")
                .map(message_of)
                .or_else(|| v.get("detail").map(|d| d.to_string()))
                .unwrap_or_else(|| v.to_string())
        })
        .unwrap_or_else(|| body.chars().take(500).collect());
    let kind = match status {
        429 | 503 => ErrorKind::Overloaded,
        404 => ErrorKind::NotFound,
        400..=499 => ErrorKind::InvalidRequest,
        _ => ErrorKind::Internal,
    };
    ServeError::new(kind, format!("engine answered {status}: {msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dynamo_protocol::{SamplingOptions, StopConditions};

    fn req() -> TokenRequest {
        TokenRequest {
            model: "m".into(),
            token_ids: vec![1, 2, 3],
            sampling: SamplingOptions {
                temperature: 0.0,
                ..SamplingOptions::default()
            },
            stop: StopConditions {
                max_tokens: 9,
                stop_token_ids: vec![2],
                ignore_eos: false,
            },
        }
    }

    #[test]
    fn vllm_gets_token_ids_and_llamacpp_text() {
        let v = body(EngineKind::Vllm, "m", &req(), Prompt::Ids(vec![1, 2, 3]));
        assert_eq!(v["prompt"], json!([1, 2, 3]));
        assert_eq!(v["top_k"], json!(-1));
        assert_eq!(v["stop_token_ids"], json!([2]));
        assert_eq!(v["return_token_ids"], json!(true));
        let l = body(
            EngineKind::LlamaCppServer,
            "m",
            &req(),
            Prompt::Text("hi".into()),
        );
        assert_eq!(l["prompt"], json!("hi"));
        assert_eq!(l["max_tokens"], json!(9));
        assert_eq!(l["repeat_penalty"], json!(1.0));
        assert!(l.get("return_token_ids").is_none());
    }

    #[test]
    fn sse_events_split_across_reads() {
        let mut s = SseBuffer::default();
        assert!(s.push(b"data: {\"a\":").is_empty());
        assert_eq!(
            s.push(b"1}\n\ndata: [DONE]\r\n\r\n: ping\n\n"),
            vec!["{\"a\":1}", "[DONE]"]
        );
    }

    #[test]
    fn chunks_and_errors() {
        let c = chunk(
            r#"{"choices":[{"text":" Paris","index":0,"finish_reason":null,"token_ids":[7]}]}"#,
        )
        .expect("chunk");
        assert_eq!(c.text, " Paris");
        assert_eq!(c.token_ids, Some(vec![7]));
        assert_eq!(c.finish, None);
        let end = chunk(r#"{"choices":[{"text":"","finish_reason":"length"}]}"#).expect("chunk");
        assert_eq!(end.finish, Some(FinishReason::Length));
        assert!(chunk("not json").is_err());
        assert!(chunk(r#"{"error":{"message":"boom"}}"#).is_err());
        let e = http_error(429, r#"{"error":{"message":"busy"}}"#);
        assert_eq!(e.kind, ErrorKind::Overloaded);
        assert!(e.message.contains("busy"));
        assert_eq!(
            http_error(400, "{\"detail\":\"bad\"}").kind,
            ErrorKind::InvalidRequest
        );
        assert_eq!(http_error(500, "x").kind, ErrorKind::Internal);
    }
}
