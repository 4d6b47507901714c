//! Errors that stop a run before or while it is set up. Failures of single requests are
//! not errors of the run: they are counted in the report by [`ErrorKind`].

use std::fmt;

/// Why a bench run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A flag value or a combination of flags makes no sense (fix the command line).
    #[error("invalid arguments: {0}")]
    InvalidArgs(String),
    /// The tokio runtime of [`crate::run_blocking`] could not be started.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// `GET /v1/models` failed, so no default model could be chosen (pass `--model`).
    #[error("cannot list models at {url}: {reason}")]
    Models { url: String, reason: String },
    /// A `--server-pids` process cannot be read from `/proc`.
    #[error("cannot read CPU time of process {pid}: {reason}")]
    Process { pid: u32, reason: String },
    /// The replay trace file cannot be read.
    #[error("cannot read the trace {path}: {source}")]
    TraceRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A row of the replay trace is not a valid Mooncake row (fix or skip the row).
    #[error("{path}:{line}: {reason}")]
    TraceRow {
        path: String,
        /// 1-based line number in the file.
        line: usize,
        reason: String,
    },
    /// The trace window chosen by the flags holds no row that can be sent.
    #[error("nothing to replay from {path}: {reason}")]
    EmptyTrace { path: String, reason: String },
}

/// The kind of a failed request, as counted in the report.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// The server answered with a non-200 status.
    Status(u16),
    /// The SSE stream carried an error event (`event: error` or a `{"error": ...}` chunk).
    SseError,
    /// The request ran past `--timeout`.
    Timeout,
    /// The TCP connection could not be opened.
    Connect,
    /// The connection broke while sending or receiving.
    Transport,
    /// The body was not what an OpenAI server sends (bad JSON, missing fields).
    BadResponse,
    /// The stream ended without `data: [DONE]` and without an error event.
    Truncated,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Status(code) => write!(f, "http_{code}"),
            ErrorKind::SseError => f.write_str("sse_error"),
            ErrorKind::Timeout => f.write_str("timeout"),
            ErrorKind::Connect => f.write_str("connect"),
            ErrorKind::Transport => f.write_str("transport"),
            ErrorKind::BadResponse => f.write_str("bad_response"),
            ErrorKind::Truncated => f.write_str("truncated_stream"),
        }
    }
}
