//! KV events from engines that publish them over ZeroMQ (vLLM, SGLang), translated into
//! ours: [`wire`] reads the engine's format, [`translate`] recomputes our block hashes,
//! [`hub`] serves them on the worker's `events` port, [`subscriber`] is the socket.

pub mod hub;
pub mod subscriber;
pub mod translate;
pub mod wire;

#[cfg(test)]
mod tests;
