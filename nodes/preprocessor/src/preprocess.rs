//! The synchronous half of the node: model loading and `ChatRequest` → `TokenRequest`.

use std::path::PathBuf;

use dynamo_protocol::{ChatMessage, ChatRequest, Prompt, StopConditions, TokenRequest};
use dynamo_runtime::ServeError;

use crate::gguf::{GgufError, GgufFile};
use crate::template::{ChatTemplate, TemplateError};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// End-of-turn tokens of common chat formats. Any of them found in the vocabulary ends
/// generation, besides the model's EOS (a base model's EOS is often not the chat
/// template's end of turn, and small models do emit the other one).
pub const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
];

/// Where the tokenizer (and possibly the template and context length) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A GGUF file: tokenizer, chat template and context length from its metadata.
    Gguf(PathBuf),
    /// A Hugging Face `tokenizer.json`; needs `chat_template` and `context_length` in
    /// the config. `bos_token` / `eos_token` are the texts from `tokenizer_config.json`.
    TokenizerJson {
        path: PathBuf,
        bos_token: Option<String>,
        eos_token: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreprocessorConfig {
    pub model: ModelSource,
    /// Replaces the model's chat template.
    pub chat_template: Option<String>,
    /// Put first when a conversation has no system message.
    pub system_prompt: Option<String>,
    /// Replaces the model's context length (GGUF `<arch>.context_length`).
    pub context_length: Option<u32>,
}

impl PreprocessorConfig {
    /// A GGUF model with its own template and context length.
    pub fn gguf(path: impl Into<PathBuf>) -> Self {
        PreprocessorConfig {
            model: ModelSource::Gguf(path.into()),
            chat_template: None,
            system_prompt: None,
            context_length: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PreprocessorError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("no context length: the model does not record one, set context_length in the config")]
    MissingContextLength,
    #[error("context length {0} in the model is not a usable number of tokens")]
    BadContextLength(u64),
    #[error("a tokenizer.json model needs chat_template in the config")]
    MissingChatTemplate,
}

/// Model-specific text ↔ token logic, shared by all requests.
#[derive(Debug)]
pub struct Preprocessor {
    tokenizer: Tokenizer,
    /// `None` when the model has no template: only text and token prompts then.
    template: Option<ChatTemplate>,
    context_length: u32,
    stop_token_ids: Vec<u32>,
}

impl Preprocessor {
    pub fn new(config: PreprocessorConfig) -> Result<Self, PreprocessorError> {
        let (tokenizer, model_template, model_context) = match &config.model {
            ModelSource::Gguf(path) => {
                let gguf = GgufFile::open(path)?;
                let tokenizer = Tokenizer::from_gguf(&gguf)?;
                let template = gguf.opt_str("tokenizer.chat_template")?.map(str::to_string);
                let arch = gguf.opt_str("general.architecture")?.unwrap_or("llama");
                let context = gguf.opt_u64(&format!("{arch}.context_length"))?;
                (tokenizer, template, context)
            }
            ModelSource::TokenizerJson {
                path,
                bos_token,
                eos_token,
            } => {
                let tokenizer =
                    Tokenizer::from_json_file(path, bos_token.as_deref(), eos_token.as_deref())?;
                if config.chat_template.is_none() {
                    return Err(PreprocessorError::MissingChatTemplate);
                }
                (tokenizer, None, None)
            }
        };
        let context_length = match (config.context_length, model_context) {
            (Some(n), _) => n,
            (None, Some(n)) => u32::try_from(n)
                .ok()
                .filter(|&n| n > 0)
                .ok_or(PreprocessorError::BadContextLength(n))?,
            (None, None) => return Err(PreprocessorError::MissingContextLength),
        };
        if context_length == 0 {
            return Err(PreprocessorError::BadContextLength(0));
        }
        let template = match config.chat_template.or(model_template) {
            Some(source) => {
                let text = |t: Option<&crate::tokenizer::SpecialToken>| {
                    t.map(|t| t.text.clone()).unwrap_or_default()
                };
                let bos = text(tokenizer.bos());
                let eos = text(tokenizer.eos());
                Some(
                    ChatTemplate::new(&source, &bos, &eos)?
                        .with_default_system_prompt(config.system_prompt.clone()),
                )
            }
            None => None,
        };
        let mut stop_token_ids: Vec<u32> = tokenizer
            .eos()
            .map(|t| t.id)
            .into_iter()
            .chain(
                END_OF_TURN_TOKENS
                    .iter()
                    .filter_map(|t| tokenizer.token_to_id(t)),
            )
            .collect();
        stop_token_ids.sort_unstable();
        stop_token_ids.dedup();
        Ok(Preprocessor {
            tokenizer,
            template,
            context_length,
            stop_token_ids,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn context_length(&self) -> u32 {
        self.context_length
    }

    /// Ids that end generation: the EOS and the end-of-turn tokens in the vocabulary.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_token_ids
    }

    /// The chat template's output for `messages`, before tokenization.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, ServeError> {
        if messages.is_empty() {
            return Err(ServeError::invalid("messages must not be empty"));
        }
        let template = self.template.as_ref().ok_or_else(|| {
            ServeError::invalid("this model has no chat template; send a text prompt instead")
        })?;
        // Failures here come from the conversation (raise_exception on roles that do not
        // alternate, missing fields): the template itself compiled at startup.
        template
            .render(messages)
            .map_err(|e| ServeError::invalid(e.to_string()))
    }

    /// Renders and tokenizes a request, and sets its limits from the model's context.
    pub fn preprocess(&self, req: &ChatRequest) -> Result<TokenRequest, ServeError> {
        let token_ids = match &req.prompt {
            Prompt::Chat(messages) => {
                // One span for both steps: a span costs CPU per request when traces are
                // exported, and the two always run back to back.
                let span = tracing::info_span!(
                    "template_tokenize",
                    messages = messages.len(),
                    bytes = tracing::field::Empty,
                );
                let _entered = span.enter();
                let text = self.render(messages)?;
                span.record("bytes", text.len());
                // The rendered template already holds BOS and every special token.
                self.encode(&text, false)?
            }
            Prompt::Text(text) => {
                let _entered = tracing::info_span!("tokenize", bytes = text.len()).entered();
                self.encode(text, true)?
            }
            Prompt::Tokens(ids) => {
                let vocab = self.tokenizer.vocab_size();
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(ServeError::invalid(format!(
                        "token id {bad} is outside the vocabulary of {vocab} tokens"
                    )));
                }
                ids.clone()
            }
        };
        let max_tokens = self.max_tokens(token_ids.len(), req.max_tokens)?;
        Ok(TokenRequest {
            model: req.model.clone(),
            token_ids,
            sampling: req.sampling.clone(),
            stop: StopConditions {
                max_tokens,
                stop_token_ids: self.stop_token_ids.clone(),
                ignore_eos: req.ignore_eos,
            },
        })
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ServeError> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| ServeError::internal(e.to_string()))
    }

    /// The number of tokens to generate: what was asked for, or the rest of the context.
    fn max_tokens(&self, prompt_len: usize, asked: Option<u32>) -> Result<u32, ServeError> {
        let ctx = self.context_length;
        if prompt_len == 0 {
            return Err(ServeError::invalid("the prompt is empty"));
        }
        let prompt = u32::try_from(prompt_len).unwrap_or(u32::MAX);
        if prompt >= ctx {
            return Err(ServeError::invalid(format!(
                "the prompt has {prompt_len} tokens, but this model's context is {ctx} tokens \
                 (prompt and completion together); shorten the prompt"
            )));
        }
        let room = ctx - prompt;
        match asked {
            None => Ok(room),
            Some(0) => Err(ServeError::invalid("max_tokens must be at least 1")),
            Some(n) if n > room => Err(ServeError::invalid(format!(
                "this model's context is {ctx} tokens, but {} were requested ({prompt} in the \
                 prompt, {n} for the completion); lower max_tokens to at most {room}",
                u64::from(prompt) + u64::from(n)
            ))),
            Some(n) => Ok(n),
        }
    }
}

#[cfg(test)]
#[path = "preprocess_tests.rs"]
mod tests;
