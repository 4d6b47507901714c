//! One running process: spawned in its own process group (set to get SIGTERM should this
//! process die, see `spawner`), its output captured line by line, its readiness checked,
//! and stopped with SIGTERM then SIGKILL.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::events::{ExitInfo, FailureCause, LogSink, OutputStream};
use super::spec::{ProcessSpec, ReadinessCheck};

/// Stderr lines kept for error reports.
const TAIL_LINES: usize = 20;
/// Longer lines are cut (the rest, up to the newline, is dropped).
const MAX_LINE: usize = 16 * 1024;
/// How long to wait for the output pipes to drain after the process exited; a grandchild
/// holding them open must not delay the report.
const DRAIN_PIPES: Duration = Duration::from_millis(200);

pub(crate) type Tail = Arc<Mutex<VecDeque<String>>>;

pub(crate) struct Running {
    child: Child,
    pgid: Option<Pid>,
    ready_line: Option<oneshot::Receiver<()>>,
    tail: Tail,
    readers: Vec<JoinHandle<()>>,
    /// The exit status, if it was collected while checking readiness.
    exit: Option<ExitInfo>,
}

pub(crate) enum NotReady {
    Exited(ExitInfo),
    Timeout,
}

impl Running {
    pub(crate) async fn spawn(
        spec: &ProcessSpec,
        sink: Arc<dyn LogSink>,
    ) -> Result<Self, FailureCause> {
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &spec.cwd {
            cmd.current_dir(dir);
        }
        let mut child = super::spawner::spawn(cmd)
            .await
            .map_err(|source| FailureCause::Spawn {
                program: spec.program.display().to_string(),
                source,
            })?;
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        let tail: Tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let name: Arc<str> = spec.name.as_str().into();
        let mut readers = Vec::with_capacity(2);
        let mut ready_line = None;
        if let Some(out) = child.stdout.take() {
            let marker = match &spec.readiness.check {
                ReadinessCheck::StdoutLine(line) => {
                    let (tx, rx) = oneshot::channel();
                    ready_line = Some(rx);
                    Some((line.trim().to_string(), tx))
                }
                _ => None,
            };
            let capture = Capture {
                name: name.clone(),
                stream: OutputStream::Stdout,
                sink: sink.clone(),
                tail: None,
            };
            readers.push(tokio::spawn(capture.run(out, marker)));
        }
        if let Some(err) = child.stderr.take() {
            let capture = Capture {
                name,
                stream: OutputStream::Stderr,
                sink,
                tail: Some(tail.clone()),
            };
            readers.push(tokio::spawn(capture.run(err, None)));
        }
        Ok(Running {
            child,
            pgid,
            ready_line,
            tail,
            readers,
            exit: None,
        })
    }

    /// Waits until the readiness check passes, the process exits, or the timeout elapses
    /// (the caller then kills it).
    pub(crate) async fn wait_ready(&mut self, spec: &ProcessSpec) -> Result<(), NotReady> {
        let mut ready_line = self.ready_line.take();
        let check = async {
            match &spec.readiness.check {
                ReadinessCheck::Immediate => {}
                ReadinessCheck::StdoutLine(_) => {
                    let seen = match ready_line.as_mut() {
                        Some(rx) => rx.await.is_ok(),
                        None => false,
                    };
                    if !seen {
                        // Stdout closed without the line: the exit (or timeout) reports it.
                        std::future::pending::<()>().await;
                    }
                }
                ReadinessCheck::Socket(path) => {
                    while tokio::net::UnixStream::connect(path).await.is_err() {
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                }
            }
        };
        let outcome = tokio::select! {
            biased;
            _ = check => Ok(()),
            status = self.child.wait() => Err(Some(status)),
            _ = tokio::time::sleep(spec.readiness.timeout) => Err(None),
        };
        match outcome {
            Ok(()) => Ok(()),
            Err(Some(status)) => {
                let info = self.exited(status).await;
                // It may have printed the line and exited at once: the exit can win the
                // race, but the line (now drained from the pipe) still made it ready.
                if ready_line.is_some_and(|mut rx| rx.try_recv().is_ok()) {
                    self.exit = Some(info);
                    return Ok(());
                }
                Err(NotReady::Exited(info))
            }
            Err(None) => Err(NotReady::Timeout),
        }
    }

    /// Kills the whole group and reaps the leader.
    pub(crate) async fn kill(&mut self) -> ExitInfo {
        self.signal(Signal::SIGKILL);
        let status = self.child.wait().await;
        self.exited(status).await
    }

    /// Waits for the process to exit on its own.
    pub(crate) async fn wait(&mut self) -> ExitInfo {
        if let Some(info) = self.exit.take() {
            return info;
        }
        let status = self.child.wait().await;
        self.exited(status).await
    }

    /// SIGTERM to the group, SIGKILL after `grace`. Returns the status and whether it took
    /// SIGKILL.
    pub(crate) async fn terminate(&mut self, grace: Duration) -> (ExitInfo, bool) {
        self.signal(Signal::SIGTERM);
        if let Ok(status) = tokio::time::timeout(grace, self.child.wait()).await {
            return (self.exited(status).await, false);
        }
        self.signal(Signal::SIGKILL);
        let status = self.child.wait().await;
        (self.exited(status).await, true)
    }

    pub(crate) fn stderr_tail(&self) -> Vec<String> {
        lock(&self.tail).iter().cloned().collect()
    }

    fn signal(&self, signal: Signal) {
        if let Some(pgid) = self.pgid {
            // ESRCH (already gone) is the only expected error and needs no action.
            let _ = killpg(pgid, signal);
        }
    }

    /// After the leader exited: kill what is left of its group (children it forked must
    /// not outlive it) and give the pipes a moment to deliver the last lines.
    async fn exited(&mut self, status: std::io::Result<std::process::ExitStatus>) -> ExitInfo {
        self.signal(Signal::SIGKILL);
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(DRAIN_PIPES, reader).await;
        }
        match status {
            Ok(s) => ExitInfo::from_status(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot get a child's exit status");
                ExitInfo {
                    code: None,
                    signal: None,
                }
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // `kill_on_drop` only reaches the leader; take the whole group down.
        self.signal(Signal::SIGKILL);
    }
}

struct Capture {
    name: Arc<str>,
    stream: OutputStream,
    sink: Arc<dyn LogSink>,
    tail: Option<Tail>,
}

impl Capture {
    async fn run(
        self,
        pipe: impl AsyncRead + Unpin,
        mut ready: Option<(String, oneshot::Sender<()>)>,
    ) {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::with_capacity(256);
        loop {
            match next_line(&mut reader, &mut buf).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    tracing::debug!(process = %self.name, error = %e, "output pipe failed");
                    break;
                }
            }
            let text = String::from_utf8_lossy(&buf);
            let line = text.trim_end_matches(['\n', '\r']);
            self.sink.line(&self.name, self.stream, line);
            if let Some(tail) = &self.tail {
                let mut tail = lock(tail);
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.to_string());
            }
            if ready
                .as_ref()
                .is_some_and(|(marker, _)| line.trim() == marker)
            {
                if let Some((_, tx)) = ready.take() {
                    let _ = tx.send(());
                }
            }
        }
    }
}

/// Reads one line into `buf` (cut at `MAX_LINE`); `false` at end of input.
async fn next_line<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    buf.clear();
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(!buf.is_empty());
        }
        let (len, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = MAX_LINE.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..len.min(room)]);
        r.consume(len);
        if done {
            return Ok(true);
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_split_and_cut() {
        let long = "x".repeat(MAX_LINE + 10);
        let input = format!("one\r\ntwo\n{long}\nlast");
        let mut r = BufReader::with_capacity(7, input.as_bytes());
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        while next_line(&mut r, &mut buf).await.unwrap_or(false) {
            lines.push(
                String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            );
        }
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], "one");
        assert_eq!(lines[1], "two");
        assert_eq!(lines[2].len(), MAX_LINE);
        assert_eq!(lines[3], "last");
    }
}
