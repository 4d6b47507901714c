//! What to run and how to keep it running: plain data, filled from the plan.

use std::path::PathBuf;
use std::time::Duration;

/// One planned process.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessSpec {
    /// Unique within a supervisor, e.g. `decode/1`; prefixes its log lines and events.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Added to (or overriding) the supervisor's own environment, in this order.
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub restart: RestartPolicy,
    pub readiness: Readiness,
}

impl ProcessSpec {
    /// A process that is never restarted and ready as soon as it has started.
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>) -> Self {
        ProcessSpec {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            restart: RestartPolicy::never(),
            readiness: Readiness::immediate(),
        }
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn restart(mut self, policy: RestartPolicy) -> Self {
        self.restart = policy;
        self
    }

    pub fn readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartMode {
    Never,
    /// Restart when the process exits with a non-zero code, a signal, or never got ready.
    OnFailure,
    /// Restart whenever it exits, except during shutdown.
    Always,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RestartPolicy {
    pub mode: RestartMode,
    /// Restarts allowed within `reset_window`; one more failure gives up.
    pub max_restarts: u32,
    /// Delay before the first restart; doubles for each restart still inside the window.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Restarts older than this no longer count, towards the limit nor the backoff.
    pub reset_window: Duration,
}

impl RestartPolicy {
    pub fn never() -> Self {
        RestartPolicy {
            mode: RestartMode::Never,
            max_restarts: 0,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            reset_window: Duration::from_secs(300),
        }
    }

    pub fn on_failure(max_restarts: u32) -> Self {
        RestartPolicy {
            mode: RestartMode::OnFailure,
            max_restarts,
            ..Self::never()
        }
    }

    pub fn always(max_restarts: u32) -> Self {
        RestartPolicy {
            mode: RestartMode::Always,
            max_restarts,
            ..Self::never()
        }
    }

    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max;
        self
    }

    pub fn with_reset_window(mut self, window: Duration) -> Self {
        self.reset_window = window;
        self
    }

    /// Whether a process that ended this way is restarted (limits aside).
    pub fn wants_restart(&self, succeeded: bool) -> bool {
        match self.mode {
            RestartMode::Never => false,
            RestartMode::OnFailure => !succeeded,
            RestartMode::Always => true,
        }
    }

    /// Delay before a restart when `recent` restarts already happened in the window:
    /// `initial · 2^recent` scaled into `[½, 1]` of itself by `jitter ∈ [0, 1)` ("equal
    /// jitter", so processes that crashed together do not restart in lock step), then
    /// capped at `backoff_max`. Each delay is at least the one before it.
    pub fn delay(&self, recent: u32, jitter: f64) -> Duration {
        let exp = recent.min(16);
        let base = self.backoff_initial.saturating_mul(1u32 << exp);
        base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
            .min(self.backoff_max)
    }
}

/// When a started process counts as ready to serve.
#[derive(Debug, Clone, PartialEq)]
pub struct Readiness {
    pub check: ReadinessCheck,
    /// A process not ready within this is killed and counts as a failure.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ReadinessCheck {
    /// Ready once spawned.
    Immediate,
    /// Ready when it prints exactly this line (surrounding whitespace ignored) on stdout.
    StdoutLine(String),
    /// Ready when this Unix socket accepts a connection.
    Socket(PathBuf),
}

impl std::fmt::Display for ReadinessCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadinessCheck::Immediate => write!(f, "started"),
            ReadinessCheck::StdoutLine(line) => write!(f, "prints `{line}` on stdout"),
            ReadinessCheck::Socket(path) => write!(f, "accepts on {}", path.display()),
        }
    }
}

impl Readiness {
    pub fn immediate() -> Self {
        Readiness {
            check: ReadinessCheck::Immediate,
            timeout: Duration::from_secs(60),
        }
    }

    pub fn stdout_line(line: impl Into<String>, timeout: Duration) -> Self {
        Readiness {
            check: ReadinessCheck::StdoutLine(line.into()),
            timeout,
        }
    }

    pub fn socket(path: impl Into<PathBuf>, timeout: Duration) -> Self {
        Readiness {
            check: ReadinessCheck::Socket(path.into()),
            timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters_within_half() {
        let p = RestartPolicy::on_failure(10)
            .with_backoff(Duration::from_millis(100), Duration::from_millis(1000));
        assert_eq!(p.delay(0, 0.999_999).as_millis(), 99);
        assert_eq!(p.delay(0, 0.0), Duration::from_millis(50));
        assert_eq!(p.delay(1, 0.0), Duration::from_millis(100));
        assert_eq!(p.delay(3, 0.0), Duration::from_millis(400));
        assert_eq!(p.delay(4, 0.0), Duration::from_millis(800));
        assert_eq!(
            p.delay(4, 0.9),
            Duration::from_millis(1000),
            "capped at max"
        );
        assert_eq!(
            p.delay(40, 0.0),
            Duration::from_millis(1000),
            "huge counts do not overflow"
        );
        for n in 0..6 {
            assert!(p.delay(n + 1, 0.0) >= p.delay(n, 0.999), "never shrinks");
        }
    }

    #[test]
    fn modes_decide_restarts() {
        assert!(!RestartPolicy::never().wants_restart(false));
        assert!(RestartPolicy::on_failure(1).wants_restart(false));
        assert!(!RestartPolicy::on_failure(1).wants_restart(true));
        assert!(RestartPolicy::always(1).wants_restart(true));
    }
}
