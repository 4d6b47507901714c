//! The preprocessor node: turns a chat request into token ids for the engine (chat
//! template, tokenizer) and the engine's token stream back into text (incremental
//! detokenization, stop strings, usage).

pub mod detokenizer;
pub mod gguf;
pub mod stop;
pub mod template;
pub mod tokenizer;
