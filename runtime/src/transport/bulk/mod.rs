//! Calls whose request carries bulk bytes (a chunk of KV blocks) over a TCP connection of
//! their own, for the plan's `tcp` links.
//!
//! The socket transport would copy such a request twice besides the kernel's copies: into
//! the encoded frame, and out of the received frame into the decoded request. Here the
//! bulk bytes are taken out of the request ([`BulkField`]), the rest is encoded as usual,
//! and the bytes follow raw: written from the request's own buffer, read straight into a
//! buffer of the announced size that the receiving service gets as the request's field.
//!
//! On the wire, after the client's 8-byte preface `DYNBULK1`:
//!
//! - client → server: `[kind u8][head length u32 LE][bulk length u64 LE][head][bulk]`;
//!   kind 0 is a call (the head is the postcard-encoded [`CallHead`]), kind 1 cancels the
//!   call whose id is the 8-byte head (no bulk).
//! - server → client: `[length u32 LE][postcard (call id, Result<Resp, ServeError>)]`, one
//!   reply per call: the service's first answer.
//!
//! Calls on one connection are independent: several may be in flight (the sender's window),
//! answered in any order. A connection that breaks fails the calls waiting on it with
//! `Unavailable`, and the next call connects again (resolving the address anew). Dropping
//! a call before its answer cancels it on the server.

mod client;
mod server;

pub use client::{BulkClient, BulkClientConfig};
pub use server::BulkServer;

use serde::{Deserialize, Serialize};

/// Sent first on every connection: the protocol and its version.
const PREFACE: &[u8; 8] = b"DYNBULK1";
const CALL: u8 = 0;
const CANCEL: u8 = 1;
/// `[kind][head length][bulk length]`.
const FRAME_HEAD: usize = 1 + 4 + 8;
/// The largest head (everything but the bulk bytes) either side accepts.
pub const MAX_HEAD: usize = 1 << 20;
/// The largest bulk a server accepts in one call (a guard against a garbled length).
pub const MAX_BULK: u64 = 1 << 30;

/// Where a request keeps its bulk bytes: `take` moves them out before the rest is encoded,
/// `put` moves the received ones (always one buffer) back in.
pub struct BulkField<Req> {
    pub take: fn(&mut Req) -> Bulk,
    pub put: fn(&mut Req, Vec<u8>),
}

/// A request's bulk bytes on the sending side: one buffer, or parts written one after
/// another from where they are (slices of a pool, kept alive by their owners).
pub enum Bulk {
    Owned(Vec<u8>),
    Parts(Vec<bytes::Bytes>),
}

impl Bulk {
    pub fn len(&self) -> usize {
        match self {
            Bulk::Owned(b) => b.len(),
            Bulk::Parts(parts) => parts.iter().map(bytes::Bytes::len).sum(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<Req> Clone for BulkField<Req> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<Req> Copy for BulkField<Req> {}

/// A call's head: what the socket transport's `Request` frame says, and the request
/// without its bulk bytes.
#[derive(Serialize, Deserialize)]
struct CallHead<Req> {
    call: u64,
    endpoint: String,
    request_id: String,
    traceparent: Option<String>,
    request: Req,
}

/// `[kind][head length][bulk length]` of a frame.
fn frame_head(kind: u8, head: usize, bulk: usize) -> [u8; FRAME_HEAD] {
    let mut out = [0u8; FRAME_HEAD];
    out[0] = kind;
    out[1..5].copy_from_slice(&(head as u32).to_le_bytes());
    out[5..].copy_from_slice(&(bulk as u64).to_le_bytes());
    out
}

#[cfg(test)]
mod tests;
