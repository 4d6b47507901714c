//! The error a call returns on an edge. It crosses process boundaries, so it is plain data
//! with a kind a caller can act on (reject, retry elsewhere, give up). The kinds are
//! generic service-call outcomes, like gRPC status codes, not LLM notions.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The request itself is wrong (HTTP 400).
    InvalidRequest,
    /// The thing asked for does not exist, e.g. an unknown model (HTTP 404).
    NotFound,
    /// The node is full; try later or elsewhere (HTTP 503).
    Overloaded,
    /// No live instance behind an edge, or an instance went away mid-stream (HTTP 503).
    Unavailable,
    /// The caller cancelled.
    Cancelled,
    /// A bug or an unexpected failure (HTTP 500).
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ServeError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ServeError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ServeError {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    pub fn cancelled() -> Self {
        Self::new(ErrorKind::Cancelled, "request cancelled")
    }
}
