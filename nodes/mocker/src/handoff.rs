//! Disaggregated serving on mocker workers: the prefill worker's `in` port
//! ([`PrefillService`]) and the decode worker's `kv` port ([`KvImportService`]).
//!
//! The prefill worker runs the prompt through its own scheduler and timing model, then
//! sends the prompt's full blocks to the decode worker the router chose, in chunks of
//! [`KV_CHUNK_BLOCKS`], with bytes fabricated from each block's hash
//! ([`crate::payload`]). The decode worker verifies every byte and caches the blocks
//! under their hashes, so the router's ordinary `TokenRequest` finds them as a prefix hit.
//!
//! When the prefill engine's pool is in shared memory and the decode instance is on this
//! machine (the plan chose `shm` for the link), chunks carry block ids instead of bytes
//! and the decode worker copies the blocks out of the mapped pool ([`shared`]).

mod kv_import;
mod prefill;
mod shared;

pub use kv_import::KvImportService;
pub use prefill::PrefillService;

use dynamo_protocol::{KvTransfer, KvTransferAck};
use dynamo_runtime::{InstanceSet, RequestContext, ServeError};
use futures::StreamExt;

/// Hands one chunk to decode instance `decode` and waits for its answer; `what` names the
/// blocks in the error ("KV blocks", "shared KV blocks").
async fn send_chunk(
    kv: &InstanceSet<KvTransfer, KvTransferAck>,
    decode: u64,
    transfer: KvTransfer,
    ctx: &RequestContext,
    what: &str,
) -> Result<KvTransferAck, ServeError> {
    let mut answer = kv.call_instance(decode, transfer, ctx.child());
    match answer.next().await {
        Some(Ok(ack)) => Ok(ack),
        Some(Err(err)) => Err(ServeError::new(
            err.kind,
            format!(
                "handing {what} to decode instance {decode}: {}",
                err.message
            ),
        )),
        None => Err(ServeError::unavailable(format!(
            "decode instance {decode} ended a KV transfer without an answer"
        ))),
    }
}

/// Blocks per `KvTransfer` unless [`PrefillService::with_chunk_blocks`] says otherwise:
/// about 3 MiB per call for SmolLM2-135M.
pub const KV_CHUNK_BLOCKS: usize = 8;
