//! External engines as workers of a graph: vLLM, SGLang, TensorRT-LLM, llama.cpp's
//! OpenAI-compatible server, or any OpenAI-compatible server. The worker launches the
//! engine's own server under the runtime's supervisor (or connects to one at a URL), sends
//! it our token requests as `/v1/completions` and streams the answer back as token ids;
//! vLLM and SGLang's ZeroMQ KV events become ours, so a KV router can route over them.

pub mod config;
pub mod kv_events;
pub mod launch;
pub mod openai;
pub mod worker;

pub use config::{EngineKind, ExternalConfig, Launch, Where};
pub use worker::{EngineError, ExternalEngine};
