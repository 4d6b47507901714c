//! dynamo-native: serves a llama-family GGUF model on the CPU with our own forward pass
//! over a paged KV cache, driven by the same scheduler and block manager as the mocker.

pub mod quant;
