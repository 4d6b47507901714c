//! The supervisor against real child processes (`sh`, `sleep`, and this test binary).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dynamo_runtime::supervisor::{
    EventKind, FailureCause, OutputStream, ProcessEvent, ProcessSpec, Readiness, RestartPolicy,
    Supervisor,
};
use tokio::sync::mpsc::UnboundedReceiver;

const LIMIT: Duration = Duration::from_secs(20);

type Lines = Arc<Mutex<Vec<(String, OutputStream, String)>>>;

fn supervisor() -> (Supervisor, UnboundedReceiver<ProcessEvent>, Lines) {
    let lines: Lines = Arc::default();
    let sink = lines.clone();
    let (sup, events) = Supervisor::new(Arc::new(
        move |process: &str, stream: OutputStream, line: &str| {
            if let Ok(mut l) = sink.lock() {
                l.push((process.to_string(), stream, line.to_string()));
            }
        },
    ));
    (sup, events, lines)
}

fn sh(name: &str, script: &str) -> ProcessSpec {
    ProcessSpec::new(name, "/bin/sh").args(["-c", script])
}

fn ready_line() -> Readiness {
    Readiness::stdout_line("DYNAMO_READY", Duration::from_secs(10))
}

/// Collects events until one matches `stop`, bounded by `LIMIT`.
async fn events_until(
    rx: &mut UnboundedReceiver<ProcessEvent>,
    stop: impl Fn(&EventKind) -> bool,
) -> Vec<EventKind> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let ev = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("event did not come in time; saw {seen:?}"))
            .expect("event channel closed");
        let done = stop(&ev.kind);
        seen.push(ev.kind);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
async fn ready_when_the_stdout_line_appears_and_output_is_forwarded_by_name() {
    let (sup, mut events, lines) = supervisor();
    let spec = sh(
        "decode/1",
        "echo warming up; echo oops >&2; sleep 0.3; echo DYNAMO_READY; sleep 30",
    )
    .readiness(ready_line());
    let started = Instant::now();
    tokio::time::timeout(LIMIT, sup.start(spec))
        .await
        .expect("in time")
        .expect("ready");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "ready before the line was printed"
    );
    let seen = events_until(&mut events, |k| matches!(k, EventKind::Ready { .. })).await;
    assert_eq!(
        seen,
        vec![
            EventKind::Starting { attempt: 1 },
            EventKind::Ready { attempt: 1 }
        ]
    );
    {
        let lines = lines.lock().expect("lines");
        assert!(
            lines.contains(&("decode/1".into(), OutputStream::Stdout, "warming up".into())),
            "{lines:?}"
        );
        assert!(
            lines.contains(&("decode/1".into(), OutputStream::Stderr, "oops".into())),
            "{lines:?}"
        );
    }
    assert_eq!(sup.processes(), vec!["decode/1".to_string()]);
    let report = sup.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.stopped, vec!["decode/1".to_string()]);
    assert!(report.killed.is_empty());
}

#[tokio::test]
async fn a_crashing_child_is_restarted_with_growing_backoff_then_given_up() {
    let (sup, mut events, _) = supervisor();
    let policy = RestartPolicy::on_failure(3)
        .with_backoff(Duration::from_millis(40), Duration::from_secs(5));
    let spec = sh(
        "prefill/0",
        "echo DYNAMO_READY; echo \"boom from $$\" >&2; exit 1",
    )
    .readiness(ready_line())
    .restart(policy);
    tokio::time::timeout(LIMIT, sup.start(spec))
        .await
        .expect("in time")
        .expect("first start is ready");
    let seen = events_until(&mut events, |k| matches!(k, EventKind::GaveUp { .. })).await;

    let delays: Vec<Duration> = seen
        .iter()
        .filter_map(|k| match k {
            EventKind::Restarting { delay, .. } => Some(*delay),
            _ => None,
        })
        .collect();
    assert_eq!(delays.len(), 3, "{seen:?}");
    for (i, d) in delays.iter().enumerate() {
        let base = Duration::from_millis(40) * (1 << i);
        assert!(
            *d >= base / 2 && *d <= base,
            "restart {i}: {d:?} not within [{:?}, {base:?}]",
            base / 2
        );
    }
    assert!(delays.windows(2).all(|w| w[1] >= w[0]), "{delays:?}");
    let exits: Vec<_> = seen
        .iter()
        .filter_map(|k| match k {
            EventKind::Exited { status, .. } => Some(status.code),
            _ => None,
        })
        .collect();
    assert_eq!(exits, vec![Some(1); 4]);
    let Some(EventKind::GaveUp {
        reason,
        stderr_tail,
    }) = seen.last()
    else {
        panic!("last event is not GaveUp: {seen:?}");
    };
    assert!(
        reason.contains("3 restarts") && reason.contains("exited with code 1"),
        "{reason}"
    );
    assert_eq!(stderr_tail.len(), 1, "{stderr_tail:?}");
    assert!(stderr_tail[0].starts_with("boom from "), "{stderr_tail:?}");
    assert!(sup.processes().is_empty());
}

#[tokio::test]
async fn a_process_that_dies_before_ready_names_itself_the_cause_and_its_stderr() {
    let (sup, _events, _) = supervisor();
    let spec = sh(
        "decode/7",
        "echo 'loading model' >&2; echo 'fatal: CUDA out of memory' >&2; exit 3",
    )
    .readiness(ready_line());
    let err = tokio::time::timeout(LIMIT, sup.start(spec))
        .await
        .expect("in time")
        .expect_err("must fail");
    assert!(
        matches!(err.cause, FailureCause::ExitedBeforeReady(s) if s.code == Some(3)),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("decode/7"), "{text}");
    assert!(text.contains("exited with code 3"), "{text}");
    assert!(text.contains("fatal: CUDA out of memory"), "{text}");
    assert_eq!(
        err.stderr_tail,
        vec![
            "loading model".to_string(),
            "fatal: CUDA out of memory".to_string()
        ]
    );
}

#[tokio::test]
async fn a_missing_program_and_a_readiness_timeout_are_start_errors() {
    let (sup, _events, _) = supervisor();
    let err = sup
        .start(ProcessSpec::new("ghost", "/nonexistent/dynamo-worker"))
        .await
        .expect_err("cannot spawn");
    assert!(matches!(err.cause, FailureCause::Spawn { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/nonexistent/dynamo-worker"),
        "{err}"
    );

    let spec = ProcessSpec::new("mute", "sleep")
        .args(["30"])
        .readiness(Readiness::stdout_line(
            "DYNAMO_READY",
            Duration::from_millis(300),
        ));
    let started = Instant::now();
    let err = tokio::time::timeout(LIMIT, sup.start(spec))
        .await
        .expect("in time")
        .expect_err("never ready");
    assert!(matches!(err.cause, FailureCause::NotReady(..)), "{err:?}");
    assert!(
        err.to_string().contains("`mute`") && err.to_string().contains("DYNAMO_READY"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn shutdown_sends_sigterm_then_sigkill_to_a_child_that_ignores_it() {
    let (sup, mut events, _) = supervisor();
    let stubborn = sh(
        "stubborn",
        "trap '' TERM; echo DYNAMO_READY; while :; do sleep 0.05; done",
    )
    .readiness(ready_line());
    let polite = sh(
        "polite",
        "trap 'exit 0' TERM; echo DYNAMO_READY; while :; do sleep 0.05; done",
    )
    .readiness(ready_line());
    tokio::time::timeout(LIMIT, sup.start(stubborn))
        .await
        .expect("in time")
        .expect("ready");
    tokio::time::timeout(LIMIT, sup.start(polite))
        .await
        .expect("in time")
        .expect("ready");
    let grace = Duration::from_millis(400);
    let started = Instant::now();
    let report = sup.shutdown(grace).await;
    let took = started.elapsed();
    assert_eq!(report.killed, vec!["stubborn".to_string()]);
    assert_eq!(report.stopped, vec!["polite".to_string()]);
    assert!(
        took >= grace,
        "SIGKILL came before the grace period: {took:?}"
    );
    assert!(took < grace + Duration::from_secs(3), "{took:?}");
    let seen = events_until(&mut events, |k| {
        matches!(k, EventKind::Stopped { killed: true, .. })
    })
    .await;
    let Some(EventKind::Stopped { status, .. }) = seen.last() else {
        panic!("{seen:?}")
    };
    assert_eq!(status.signal, Some(9));
}

fn alive(pid: i32) -> bool {
    // A zombie (reparented, not yet reaped) counts as dead: it runs nothing.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test]
async fn shutdown_takes_down_the_whole_process_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("grandchild.pid");
    let script = format!(
        "sleep 60 & echo $! > {}; echo DYNAMO_READY; wait",
        pidfile.display()
    );
    let (sup, _events, _) = supervisor();
    tokio::time::timeout(
        LIMIT,
        sup.start(sh("parent", &script).readiness(ready_line())),
    )
    .await
    .expect("in time")
    .expect("ready");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    assert!(alive(pid), "grandchild should be running");
    sup.shutdown(Duration::from_secs(2)).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !alive(pid),
        "grandchild {pid} outlived the supervisor's shutdown"
    );
}

/// Not a test: a process that listens on a Unix socket after a delay (readiness by socket).
#[test]
#[ignore]
fn helper_socket_listener() {
    let Some(path) = std::env::var_os("DYNAMO_TEST_LISTEN").map(PathBuf::from) else {
        return;
    };
    std::thread::sleep(Duration::from_millis(300));
    let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    std::thread::sleep(Duration::from_secs(30));
}

fn listener_spec(path: &Path) -> ProcessSpec {
    let exe = std::env::current_exe().expect("current exe");
    ProcessSpec::new("listener", exe)
        .args([
            "--exact",
            "helper_socket_listener",
            "--ignored",
            "--test-threads=1",
        ])
        .env("DYNAMO_TEST_LISTEN", path.display().to_string())
        .readiness(Readiness::socket(path, Duration::from_secs(10)))
}

#[tokio::test]
async fn ready_when_the_socket_accepts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("worker.sock");
    let (sup, _events, _) = supervisor();
    let started = Instant::now();
    tokio::time::timeout(LIMIT, sup.start(listener_spec(&path)))
        .await
        .expect("in time")
        .expect("ready");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "ready before the socket existed"
    );
    assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
    sup.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn stopping_one_process_leaves_the_others_and_does_not_restart_it() {
    let (sup, mut events, _) = supervisor();
    let always =
        RestartPolicy::always(5).with_backoff(Duration::from_millis(10), Duration::from_millis(20));
    let script = "echo DYNAMO_READY; exec sleep 30";
    for name in ["decode/0", "decode/1"] {
        let spec = sh(name, script)
            .readiness(ready_line())
            .restart(always.clone());
        tokio::time::timeout(LIMIT, sup.start(spec))
            .await
            .expect("in time")
            .expect("ready");
    }
    assert!(sup.stop("decode/0", Duration::from_secs(2)).await);
    assert!(
        !sup.stop("decode/9", Duration::from_secs(2)).await,
        "unknown name"
    );
    assert_eq!(sup.processes(), vec!["decode/1".to_string()]);
    let seen = events_until(&mut events, |k| matches!(k, EventKind::Stopped { .. })).await;
    assert!(
        matches!(seen.last(), Some(EventKind::Stopped { killed: false, .. })),
        "{seen:?}"
    );
    // Give a wrongful restart time to show up, then check none did.
    tokio::time::sleep(Duration::from_millis(100)).await;
    while let Ok(ev) = events.try_recv() {
        assert_ne!(ev.process, "decode/0", "stopped process came back: {ev:?}");
    }
    let report = sup.shutdown(Duration::from_secs(2)).await;
    assert_eq!(report.stopped, vec!["decode/1".to_string()]);
}
