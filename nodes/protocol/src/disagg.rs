//! Disaggregated serving: a prefill worker computes a prompt's KV cache and hands the
//! blocks to the decode worker the router chose, which then streams the tokens.
//!
//! - `router.prefill -> prefill.in` (`llm.tokens/v1`, unary): [`PrefillRequest`] →
//!   [`PrefillResult`], once the blocks are on the decode worker.
//! - `prefill.kv -> decode.kv` (`kv.blocks/v2`, unary): [`KvTransfer`] → [`KvTransferAck`],
//!   one call per chunk of blocks. Several chunks of one hand-off may be in flight at once
//!   and be imported in any order: each names its chain parent.
//! - `router.decode -> decode.in`: the usual [`crate::TokenRequest`]. The handed-over
//!   blocks are in the decode worker's prefix cache under their chained hashes, so its
//!   ordinary prefix matching finds them; nothing else has to name them.

use serde::{Deserialize, Serialize};

use crate::kv::BlockHash;
use crate::tokens::TokenRequest;

/// The shape of one KV block in memory, which fixes its size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    /// Bytes per element (2 for f16).
    pub dtype_bytes: u32,
    pub block_size: u32,
}

impl KvLayout {
    /// Keys and values of every layer for one token.
    pub fn bytes_per_token(&self) -> u64 {
        2 * u64::from(self.layers)
            * u64::from(self.kv_heads)
            * u64::from(self.head_dim)
            * u64::from(self.dtype_bytes)
    }

    pub fn bytes_per_block(&self) -> u64 {
        self.bytes_per_token() * u64::from(self.block_size)
    }
}

/// Prefill `request`'s prompt and hand its KV blocks to decode instance `decode_instance`
/// under `handoff_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillRequest {
    pub request: TokenRequest,
    pub handoff_id: String,
    pub decode_instance: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefillResult {
    pub prompt_tokens: u32,
    /// Prompt tokens the prefill worker found in its own prefix cache.
    pub cached_tokens: u32,
    /// Blocks handed to the decode worker, and their bytes.
    pub blocks: u32,
    pub bytes: u64,
}

/// A chunk of KV blocks on its way from a prefill worker to a decode worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvTransfer {
    pub handoff_id: String,
    /// The hashes of the blocks in this chunk, in chain order.
    pub hashes: Vec<BlockHash>,
    /// The chain parent of the chunk's first block: the previous chunk's last hash, `None`
    /// for the first chunk. With it a chunk is imported without waiting for the ones
    /// before it. (New in `kv.blocks/v2`: postcard has no optional fields, so the port
    /// type's version changed with it; a v1 peer cannot read a v2 chunk.)
    pub parent: Option<BlockHash>,
    /// Their bytes, `layout.bytes_per_block()` per block, back to back.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub layout: KvLayout,
    /// The last chunk of this hand-off.
    pub last: bool,
    /// Set when the bytes are not in `payload` (then empty) but in the sender's shared KV
    /// pool on this machine: the decode worker reads them there, one copy into its own
    /// pool. The pool is registered once per peer; a chunk carries only its name and ids.
    #[serde(default)]
    pub shared: Option<SharedBlocks>,
    /// The block bytes where the sender keeps them (slices of its own pool, held until
    /// the chunk is answered), for a transport that sends them from there: the `tcp`
    /// link's bulk calls write them as `payload` and the receiver gets them in `payload`.
    /// Never encoded, and never read by the receiver: over any other link the chunk
    /// arrives without its bytes, which the receiver refuses (too few bytes for its
    /// blocks). The prefill worker fills it for `tcp` links only.
    #[serde(skip)]
    pub in_place: Vec<bytes::Bytes>,
}

/// Blocks of a KV pool the receiver can map (a shared-memory segment on its machine).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedBlocks {
    /// The pool's export name (the runtime's `ShmExport::name`).
    pub pool: String,
    /// Pool block ids, one per hash of the chunk, in chain order. The sender keeps them
    /// unchanged until the receiver answered this chunk.
    pub blocks: Vec<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvTransferAck {
    /// Blocks of this chunk the decode worker now holds.
    pub blocks: u32,
}
