//! What a supervisor reports: lifecycle events, exit statuses, start errors, log lines.

use std::fmt;
use std::time::Duration;

/// Which pipe a captured line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Receives every line a supervised process prints, with the process's name.
pub trait LogSink: Send + Sync + 'static {
    fn line(&self, process: &str, stream: OutputStream, line: &str);
}

impl<F: Fn(&str, OutputStream, &str) + Send + Sync + 'static> LogSink for F {
    fn line(&self, process: &str, stream: OutputStream, line: &str) {
        self(process, stream, line)
    }
}

/// Forwards lines to `tracing` (target `dynamo::process`), with the process name as a field.
pub struct TracingSink;

impl LogSink for TracingSink {
    fn line(&self, process: &str, stream: OutputStream, line: &str) {
        match stream {
            OutputStream::Stdout => tracing::info!(target: "dynamo::process", process, "{line}"),
            OutputStream::Stderr => tracing::warn!(target: "dynamo::process", process, "{line}"),
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitInfo {
    pub fn from_status(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        ExitInfo {
            code: status.code(),
            signal: status.signal(),
        }
    }

    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exited with code {code}"),
            (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
                Ok(name) => write!(f, "killed by signal {name}"),
                Err(_) => write!(f, "killed by signal {sig}"),
            },
            (None, None) => write!(f, "exited with an unknown status"),
        }
    }
}

/// Something that happened to a supervised process.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessEvent {
    pub process: String,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// Attempt `attempt` (1 for the first start) is being spawned.
    Starting {
        attempt: u32,
    },
    Ready {
        attempt: u32,
    },
    /// The process ended on its own (or failed its readiness check and was killed).
    Exited {
        status: ExitInfo,
        stderr_tail: Vec<String>,
    },
    /// It will be started again, as attempt `attempt`, after `delay`.
    Restarting {
        attempt: u32,
        delay: Duration,
    },
    /// No more restarts: the policy forbids it or the limit was reached.
    GaveUp {
        reason: String,
        stderr_tail: Vec<String>,
    },
    /// Stopped by the supervisor's shutdown; `killed` if it needed SIGKILL.
    Stopped {
        status: ExitInfo,
        killed: bool,
    },
}

/// Why a process failed to start or to stay up.
#[derive(Debug, thiserror::Error)]
pub enum FailureCause {
    #[error("cannot spawn `{program}`: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{0} before it was ready")]
    ExitedBeforeReady(ExitInfo),
    #[error("not ready after {0:?} (waited until it {1})")]
    NotReady(Duration, String),
    #[error("{0}")]
    Exited(ExitInfo),
    #[error("gave up after {restarts} restarts; last failure: {last}")]
    GaveUp {
        restarts: u32,
        last: Box<FailureCause>,
    },
    #[error("a process with this name is already supervised")]
    DuplicateName,
    #[error("the supervisor is shutting down")]
    ShuttingDown,
}

/// A process that could not be brought up: its name, the cause and its last stderr lines.
#[derive(Debug, thiserror::Error)]
pub struct StartError {
    pub process: String,
    pub cause: FailureCause,
    pub stderr_tail: Vec<String>,
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "process `{}` failed to start: {}",
            self.process, self.cause
        )?;
        write_tail(f, &self.stderr_tail)
    }
}

/// Renders a stderr tail between rulers, as the last part of an error message.
pub fn write_tail(f: &mut impl fmt::Write, tail: &[String]) -> fmt::Result {
    if tail.is_empty() {
        return Ok(());
    }
    write!(f, "\n---------- last stderr lines ----------")?;
    for line in tail {
        write!(f, "\n{line}")?;
    }
    write!(f, "\n---------------------------------------")
}

/// What `shutdown` did, by process name (sorted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Exited within the grace period after SIGTERM (or were not running).
    pub stopped: Vec<String>,
    /// Needed SIGKILL.
    pub killed: Vec<String>,
}
