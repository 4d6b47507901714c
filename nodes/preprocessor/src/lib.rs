//! The preprocessor node: turns a chat request into token ids for the engine (chat
//! template, tokenizer) and the engine's token stream back into text (incremental
//! detokenization, stop strings, usage).
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use dynamo_protocol::{TokenDelta, TokenRequest};
//! # use dynamo_runtime::Service;
//! # fn wire(router: Arc<dyn Service<TokenRequest, TokenDelta>>) -> Result<(), Box<dyn std::error::Error>> {
//! use dynamo_preprocessor::{Preprocessor, PreprocessorConfig, PreprocessorService};
//! let mut config = PreprocessorConfig::gguf("SmolLM2-135M-Instruct.Q4_1.gguf");
//! config.system_prompt = Some("You are a helpful AI assistant.".into());
//! let service = PreprocessorService::new(Arc::new(Preprocessor::new(config)?), router);
//! # Ok(()) }
//! ```

pub mod byte_table;
pub mod detokenizer;
pub mod gguf;
mod preprocess;
mod service;
pub mod stop;
pub mod template;
pub mod tokenizer;

#[cfg(test)]
mod test_support;

pub use preprocess::{
    ModelSource, Preprocessor, PreprocessorConfig, PreprocessorError, END_OF_TURN_TOKENS,
};
pub use service::PreprocessorService;
