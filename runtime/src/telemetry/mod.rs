//! Traces: every hop's `tracing` span exported over OTLP/gRPC, one request one trace
//! across processes.
//!
//! Two halves:
//! - [`export`]: a `tracing` layer that turns spans into OpenTelemetry spans (`spans`)
//!   and ships them in batches from a background thread. The request path only pushes a finished
//!   span into a bounded queue; when the queue is full (the collector is down or slow)
//!   the span is dropped and counted ([`dropped_spans`]), never waited for.
//! - [`propagate`]: the W3C `traceparent` in [`crate::RequestContext`] made into a span's
//!   parent on the way in ([`follow`]) and the current span written into the child
//!   context on the way out ([`child_context`]).
//!
//! Without an exporter installed every helper is a cheap no-op that passes the incoming
//! `traceparent` through unchanged.

pub mod export;
pub mod propagate;
mod spans;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub use export::{ExportConfig, ExportGuard, TelemetryError};
pub use propagate::{child_context, follow, follow_traceparent, trace_id, traceparent_of};

/// Set once an exporter layer is built in this process.
static ENABLED: AtomicBool = AtomicBool::new(false);
/// Spans lost: the queue was full, or the collector refused or could not be reached.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Spans the collector accepted.
static EXPORTED: AtomicU64 = AtomicU64::new(0);

/// Whether this process exports spans.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Spans this process dropped instead of exporting (full queue, collector down).
pub fn dropped_spans() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Spans this process handed to the collector successfully.
pub fn exported_spans() -> u64 {
    EXPORTED.load(Ordering::Relaxed)
}
