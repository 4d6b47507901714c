//! `llm.tokens/v1`: preprocessor → router → engine. Token ids in, token ids out.

use serde::{Deserialize, Serialize};

use crate::chat::FinishReason;

/// Sampling parameters, already range-checked by the frontend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingOptions {
    /// 0.0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means disabled.
    pub top_k: u32,
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Return each sampled token's log-probability and this many most likely
    /// alternatives (OpenAI `logprobs`/`top_logprobs`); `None` returns none.
    #[serde(default)]
    pub logprobs: Option<u32>,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
        }
    }
}

/// When an engine must stop generating. Stop *strings* are the preprocessor's job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopConditions {
    pub max_tokens: u32,
    /// Generation ends when one of these is produced (end-of-sequence ids of the model).
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// Served model name.
    pub model: String,
    pub token_ids: Vec<u32>,
    pub sampling: SamplingOptions,
    pub stop: StopConditions,
}

/// One step of the engine's output for one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenDelta {
    pub token_ids: Vec<u32>,
    /// Set on the last delta only.
    pub finish_reason: Option<FinishReason>,
    /// Prompt tokens served from the prefix cache; set on the first delta.
    pub cached_tokens: Option<u32>,
    /// One per token of `token_ids` when the request asked for log-probabilities.
    #[serde(default)]
    pub logprobs: Vec<TokenLogprob>,
}

/// A sampled token's log-probability under the model (before temperature, penalties and
/// truncation, as vLLM reports by default), with the most likely alternatives asked for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    /// `(token id, log-probability)`, most likely first.
    #[serde(default)]
    pub top: Vec<(u32, f32)>,
}
