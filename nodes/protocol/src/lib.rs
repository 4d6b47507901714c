//! The typed messages that travel on the edges of a dynamo graph.
//!
//! Each module is one message schema named in the graph's port catalogue
//! (`dynamo_graph::kinds`): the schema string there and the type here must agree.
//!
//! | schema                | request          | response (stream)  |
//! |-----------------------|------------------|--------------------|
//! | `llm.chat/v1`         | [`ChatRequest`]  | [`TextDelta`]      |
//! | `llm.tokens/v1`       | [`TokenRequest`] | [`TokenDelta`]     |
//! | `kv.events/v1`        | [`KvEvent`] (feedback, one-way)       |

pub mod chat;
pub mod disagg;
pub mod kv;
pub mod tokens;

pub use chat::{ChatMessage, ChatRequest, FinishReason, Prompt, TextDelta, TextLogprob, Usage};
pub use disagg::{
    KvLayout, KvTransfer, KvTransferAck, PrefillRequest, PrefillResult, SharedBlocks,
};
pub use kv::{
    block_hash, block_hashes, BlockHash, KvEvent, KvEventData, KvStreamItem, KvSubscribe,
    StoredBlock, DEFAULT_BLOCK_HASH_SEED,
};
pub use tokens::{SamplingOptions, StopConditions, TokenDelta, TokenLogprob, TokenRequest};
