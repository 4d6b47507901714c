//! The bytes of OpenAI responses. A stream's chunks share everything but the text, so the
//! shared head is serialised once per request and each chunk is one buffer: the head, the
//! JSON-escaped text and a fixed tail, written straight into bytes.

use bytes::Bytes;
use dynamo_protocol::{TextLogprob, Usage};
use serde::Serialize;

use crate::error::ApiError;
use crate::openai::Endpoint;

/// The stream's last event.
pub(crate) const DONE: &[u8] = b"data: [DONE]\n\n";

/// OpenAI's `usage` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct OpenAiUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl OpenAiUsage {
    /// The downstream's usage if it sent one; otherwise the tokens counted on the way.
    pub(crate) fn from_usage(usage: Option<Usage>, counted_completion_tokens: u32) -> Self {
        let usage = usage.unwrap_or(Usage {
            prompt_tokens: 0,
            completion_tokens: counted_completion_tokens,
            cached_tokens: 0,
        });
        OpenAiUsage {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.prompt_tokens.saturating_add(usage.completion_tokens),
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: usage.cached_tokens,
            },
        }
    }
}

/// Builds the SSE events of one streamed response.
#[derive(Debug)]
pub(crate) struct ChunkWriter {
    endpoint: Endpoint,
    /// `{"id":..,"object":..,"created":..,"model":..` without the closing brace.
    head: Vec<u8>,
    role_sent: bool,
    /// Characters of the completion written so far (`text_offset` of completions'
    /// logprobs).
    offset: usize,
}

impl ChunkWriter {
    pub(crate) fn new(endpoint: Endpoint, id: &str, created: u64, model: &str) -> Self {
        let object = match endpoint {
            Endpoint::ChatCompletions => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        let mut head = Vec::with_capacity(96 + id.len() + model.len());
        head.extend_from_slice(b"{\"id\":");
        write_json_str(&mut head, id);
        head.extend_from_slice(b",\"object\":\"");
        head.extend_from_slice(object.as_bytes());
        head.extend_from_slice(b"\",\"created\":");
        head.extend_from_slice(created.to_string().as_bytes());
        head.extend_from_slice(b",\"model\":");
        write_json_str(&mut head, model);
        ChunkWriter {
            endpoint,
            head,
            role_sent: false,
            offset: 0,
        }
    }

    /// One `data: {chunk}\n\n` event carrying `text` (and the finish reason on the last).
    /// The first chat chunk also carries `"role":"assistant"`.
    /// [`ChunkWriter::content`] with the log-probabilities of the chunk's tokens.
    pub(crate) fn content_with(
        &mut self,
        out: &mut Vec<u8>,
        text: &str,
        logprobs: &[TextLogprob],
        finish: Option<&str>,
    ) {
        out.reserve(self.head.len() + text.len() + 112);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b",\"choices\":[{\"index\":0,");
        match self.endpoint {
            Endpoint::ChatCompletions => {
                if self.role_sent {
                    out.extend_from_slice(b"\"delta\":{\"content\":");
                } else {
                    self.role_sent = true;
                    out.extend_from_slice(b"\"delta\":{\"role\":\"assistant\",\"content\":");
                }
                write_json_str(out, text);
                out.push(b'}');
            }
            Endpoint::Completions => {
                out.extend_from_slice(b"\"text\":");
                write_json_str(out, text);
            }
        }
        out.extend_from_slice(b",\"logprobs\":");
        crate::logprobs::write(out, self.endpoint, logprobs, &mut self.offset);
        out.extend_from_slice(b",\"finish_reason\":");
        match finish {
            Some(reason) => write_json_str(out, reason),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b"}]}\n\n");
    }

    /// The `stream_options.include_usage` event: no choices, only usage.
    pub(crate) fn usage(&self, out: &mut Vec<u8>, usage: &OpenAiUsage) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b",\"choices\":[],\"usage\":");
        if serde_json::to_writer(&mut *out, usage).is_err() {
            out.extend_from_slice(b"null");
        }
        out.extend_from_slice(b"}\n\n");
    }

    /// One content event as its own buffer.
    pub(crate) fn content_bytes(&mut self, text: &str, logprobs: &[TextLogprob]) -> Bytes {
        let mut out = Vec::new();
        self.content_with(&mut out, text, logprobs, None);
        Bytes::from(out)
    }
}

/// An error after streaming started: an SSE `error` event with OpenAI's error body.
pub(crate) fn error_event(out: &mut Vec<u8>, error: &ApiError) {
    out.extend_from_slice(b"event: error\ndata: ");
    out.extend_from_slice(&error.to_json_bytes());
    out.extend_from_slice(b"\n\n");
}

/// Writes `text` as a JSON string literal.
fn write_json_str(out: &mut Vec<u8>, text: &str) {
    // Serialising a &str into a Vec cannot fail.
    if serde_json::to_writer(&mut *out, text).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn event_json(bytes: &[u8]) -> Value {
        let text = std::str::from_utf8(bytes).unwrap();
        let body = text
            .strip_prefix("data: ")
            .unwrap()
            .strip_suffix("\n\n")
            .unwrap();
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn chat_chunks_carry_the_role_once_and_escape_text() {
        let mut writer = ChunkWriter::new(Endpoint::ChatCompletions, "chatcmpl-1", 7, "m\"x");
        let first = event_json(&writer.content_bytes("a \"quote\"\n", &[]));
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["model"], "m\"x");
        assert_eq!(first["created"], 7);
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(first["choices"][0]["delta"]["content"], "a \"quote\"\n");
        assert_eq!(first["choices"][0]["finish_reason"], Value::Null);
        let mut out = Vec::new();
        writer.content_with(&mut out, "", &[], Some("stop"));
        let last = event_json(&out);
        assert!(last["choices"][0]["delta"].get("role").is_none());
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn completion_chunks_and_usage() {
        let mut writer = ChunkWriter::new(Endpoint::Completions, "cmpl-1", 7, "m");
        let chunk = event_json(&writer.content_bytes("hi", &[]));
        assert_eq!(chunk["object"], "text_completion");
        assert_eq!(chunk["choices"][0]["text"], "hi");
        let mut out = Vec::new();
        let usage = OpenAiUsage::from_usage(
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
                cached_tokens: 1,
            }),
            0,
        );
        writer.usage(&mut out, &usage);
        let event = event_json(&out);
        assert_eq!(event["choices"].as_array().map(Vec::len), Some(0));
        assert_eq!(event["usage"]["total_tokens"], 5);
        assert_eq!(event["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
    }
}
