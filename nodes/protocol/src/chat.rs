//! `llm.chat/v1`: frontend → preprocessor. An OpenAI request already checked and
//! normalised by the frontend; the preprocessor renders and tokenizes it.

use serde::{Deserialize, Serialize};

use crate::tokens::SamplingOptions;

/// One message of a chat conversation, after the frontend flattened content parts to text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// What the model is asked to continue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    /// `/v1/chat/completions`: rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// `/v1/completions` with a string prompt: tokenized as is.
    Text(String),
    /// `/v1/completions` with a token-id prompt: passed through.
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// Served model name, as listed by `GET /v1/models`.
    pub model: String,
    pub prompt: Prompt,
    pub sampling: SamplingOptions,
    /// Maximum number of tokens to generate; `None` means up to the context limit.
    pub max_tokens: Option<u32>,
    /// Stop strings: generation ends before the first occurrence of any of them.
    pub stop: Vec<String>,
    /// Keep generating past the end-of-sequence token (benchmarks).
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    /// The caller went away or the request was cancelled.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI spelling of the reason.
    pub fn as_openai(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: u32,
}

/// One chunk of the response stream: detokenized text, never a split UTF-8 character.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TextDelta {
    pub text: String,
    /// Number of tokens this chunk covers.
    pub tokens: u32,
    /// Set on the last chunk only.
    pub finish_reason: Option<FinishReason>,
    /// Set on the last chunk only.
    pub usage: Option<Usage>,
    /// The log-probabilities of the tokens this chunk covers, when asked for.
    #[serde(default)]
    pub logprobs: Vec<TextLogprob>,
}

/// A token's log-probability, as text: the token's own bytes (a token may end inside a
/// UTF-8 character; `token` is then lossy and `bytes` exact).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TextLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// The most likely alternatives, most likely first.
    #[serde(default)]
    pub top: Vec<TextLogprob>,
}
