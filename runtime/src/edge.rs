//! The edge contract: a typed request goes forward, a stream of typed responses comes
//! back, cancellation travels forward when the caller drops the stream, and a W3C trace
//! context travels with every request.
//!
//! Nodes implement [`Service`] for their input ports and call their output ports through
//! a client the runtime hands them; which transport carries a call (in-process, local
//! socket, later NATS) is the plan's choice and invisible here.

use std::pin::Pin;

use futures::Stream;
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::error::ServeError;

/// Anything that can travel on an edge: in-process it is moved, between processes it is
/// serialised.
pub trait Message: Serialize + DeserializeOwned + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> Message for T {}

/// The response half of a call. Dropping it cancels the request upstream.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, ServeError>> + Send + 'static>>;

/// What travels with every request besides its payload.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// Unique per request, kept across hops (logs, traces, metrics).
    pub request_id: String,
    /// W3C `traceparent` of the caller's span, if tracing is on.
    pub traceparent: Option<String>,
    cancel: CancellationToken,
}

impl RequestContext {
    pub fn new(request_id: impl Into<String>) -> Self {
        RequestContext {
            request_id: request_id.into(),
            traceparent: None,
            cancel: CancellationToken::new(),
        }
    }

    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }

    /// The same request on the next hop: same id and trace, and a cancellation that
    /// follows this one's (cancelling the parent cancels the child, not the reverse).
    pub fn child(&self) -> Self {
        RequestContext {
            request_id: self.request_id.clone(),
            traceparent: self.traceparent.clone(),
            cancel: self.cancel.child_token(),
        }
    }

    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when the request is cancelled.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    pub fn cancellation_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// A context for a request that arrived from another process: same id and trace as
    /// the caller's, with a cancellation token owned by the transport that received it.
    pub fn with_token(
        request_id: impl Into<String>,
        traceparent: Option<String>,
        cancel: CancellationToken,
    ) -> Self {
        RequestContext {
            request_id: request_id.into(),
            traceparent,
            cancel,
        }
    }

    /// A guard that cancels this request when dropped, unless disarmed first. Transports
    /// keep one inside the response stream they hand out, so dropping the stream cancels
    /// the request.
    pub fn drop_guard(&self) -> DropGuard {
        self.cancel.clone().drop_guard()
    }
}

/// A response stream that yields one error and ends: what a client returns when it cannot
/// even start a call (no instance, connection refused, unknown instance id).
pub fn error_stream<T: Send + 'static>(error: ServeError) -> ResponseStream<T> {
    Box::pin(futures::stream::once(std::future::ready(Err(error))))
}

/// A node's input port: handles one request and returns its response stream.
///
/// The implementation must stop work and release resources when `ctx` is cancelled.
pub trait Service<Req, Resp>: Send + Sync + 'static {
    fn call(&self, req: Req, ctx: RequestContext) -> ResponseStream<Resp>;
}
