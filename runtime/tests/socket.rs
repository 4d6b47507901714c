//! The local socket transport over real Unix sockets, in-process and across processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dynamo_runtime::transport::{SocketClient, SocketClientConfig, SocketServer};
use dynamo_runtime::{ErrorKind, RequestContext, ResponseStream, ServeError, Service};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Count {
    from: u32,
    n: u32,
    delay_ms: u64,
}

/// Streams `from..from+n`, one item per `delay_ms`; reports the request id of every
/// request whose context it saw cancelled.
struct Counter {
    cancelled: mpsc::UnboundedSender<String>,
}

impl Service<Count, u32> for Counter {
    fn call(&self, req: Count, ctx: RequestContext) -> ResponseStream<u32> {
        let (tx, mut rx) = mpsc::channel(4);
        let report = self.cancelled.clone();
        tokio::spawn(async move {
            for i in req.from..req.from.saturating_add(req.n) {
                if req.delay_ms > 0 {
                    tokio::select! {
                        _ = ctx.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(req.delay_ms)) => {}
                    }
                }
                tokio::select! {
                    _ = ctx.cancelled() => break,
                    sent = tx.send(Ok(i)) => if sent.is_err() { break },
                }
            }
            if ctx.is_cancelled() {
                let _ = report.send(ctx.request_id.clone());
            }
        });
        Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}

/// Answers with what arrived besides the payload.
struct Echo;
impl Service<String, String> for Echo {
    fn call(&self, req: String, ctx: RequestContext) -> ResponseStream<String> {
        let items = vec![
            Ok(req),
            Ok(ctx.request_id.clone()),
            Ok(ctx.traceparent.clone().unwrap_or_default()),
            Err(ServeError::new(ErrorKind::Overloaded, "and then it failed")),
        ];
        Box::pin(futures::stream::iter(items))
    }
}

fn server(path: &Path) -> (SocketServer, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut server = SocketServer::bind(path).expect("bind");
    server
        .register::<Count, u32>("count", Arc::new(Counter { cancelled: tx }))
        .expect("register count");
    server
        .register::<String, String>("echo", Arc::new(Echo))
        .expect("register echo");
    (server, rx)
}

/// Serves in this process; the returned token stops it.
fn serve_here(path: &Path) -> (CancellationToken, mpsc::UnboundedReceiver<String>) {
    let (server, cancelled) = server(path);
    let stop = CancellationToken::new();
    tokio::spawn(server.serve(stop.clone()));
    (stop, cancelled)
}

async fn collect<T>(stream: ResponseStream<T>) -> Vec<Result<T, ServeError>> {
    tokio::time::timeout(LIMIT, stream.collect())
        .await
        .expect("stream did not end in time")
}

#[tokio::test]
async fn a_stream_round_trips_with_its_context() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.sock");
    let (_stop, _) = serve_here(&path);
    let client = SocketClient::connect(&path).await.expect("connect");

    let count = client.endpoint::<Count, u32>("count");
    let got = collect(count.call(
        Count {
            from: 3,
            n: 5,
            delay_ms: 0,
        },
        RequestContext::new("a"),
    ))
    .await;
    assert_eq!(got, vec![Ok(3), Ok(4), Ok(5), Ok(6), Ok(7)]);

    let echo = client.endpoint::<String, String>("echo");
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let ctx = RequestContext::new("req-42").with_traceparent(Some(tp.to_string()));
    let got = collect(echo.call("hé".to_string(), ctx)).await;
    assert_eq!(
        got,
        vec![
            Ok("hé".to_string()),
            Ok("req-42".to_string()),
            Ok(tp.to_string()),
            Err(ServeError::new(ErrorKind::Overloaded, "and then it failed")),
        ]
    );
}

#[tokio::test]
async fn two_hundred_concurrent_streams_share_one_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.sock");
    let (_stop, _) = serve_here(&path);
    let client = SocketClient::connect(&path).await.expect("connect");
    let count = client.endpoint::<Count, u32>("count");
    let calls = (0..200u32).map(|i| {
        let stream = count.call(
            Count {
                from: i * 1000,
                n: 50,
                delay_ms: 1,
            },
            RequestContext::new(format!("r{i}")),
        );
        async move { (i, stream.collect::<Vec<_>>().await) }
    });
    let results = tokio::time::timeout(LIMIT, futures::future::join_all(calls))
        .await
        .expect("200 streams did not finish in time");
    for (i, items) in results {
        let expected: Vec<Result<u32, ServeError>> = (i * 1000..i * 1000 + 50).map(Ok).collect();
        assert_eq!(items, expected, "stream {i}");
    }
}

#[tokio::test]
async fn a_stalled_consumer_holds_back_only_its_own_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.sock");
    let (_stop, _) = serve_here(&path);
    let config = SocketClientConfig {
        stream_window: 8,
        ..Default::default()
    };
    let client = SocketClient::connect_with(&path, config)
        .await
        .expect("connect");
    let count = client.endpoint::<Count, u32>("count");
    // Read one item, then never poll it again (but keep it alive).
    let mut stalled = count.call(
        Count {
            from: 0,
            n: 100_000,
            delay_ms: 0,
        },
        RequestContext::new("stalled"),
    );
    assert_eq!(
        tokio::time::timeout(LIMIT, stalled.next())
            .await
            .expect("first"),
        Some(Ok(0))
    );
    let got = collect(count.call(
        Count {
            from: 0,
            n: 5_000,
            delay_ms: 0,
        },
        RequestContext::new("busy"),
    ))
    .await;
    assert_eq!(got.len(), 5_000);
    assert!(got.iter().enumerate().all(|(i, r)| r == &Ok(i as u32)));
    // The stalled stream resumes where it was, nothing lost.
    let next: Vec<_> = tokio::time::timeout(LIMIT, (&mut stalled).take(20).collect::<Vec<_>>())
        .await
        .expect("resume");
    assert_eq!(next, (1..21).map(Ok).collect::<Vec<_>>());
}

#[tokio::test]
async fn dropping_the_client_stream_cancels_the_server_context() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.sock");
    let (_stop, mut cancelled) = serve_here(&path);
    let client = SocketClient::connect(&path).await.expect("connect");
    let count = client.endpoint::<Count, u32>("count");
    let mut stream = count.call(
        Count {
            from: 0,
            n: u32::MAX,
            delay_ms: 5,
        },
        RequestContext::new("doomed"),
    );
    for expected in 0..3 {
        let item = tokio::time::timeout(LIMIT, stream.next())
            .await
            .expect("item in time");
        assert_eq!(item, Some(Ok(expected)));
    }
    drop(stream);
    let seen = tokio::time::timeout(Duration::from_secs(2), cancelled.recv())
        .await
        .expect("server never observed the cancellation");
    assert_eq!(seen.as_deref(), Some("doomed"));
}

#[tokio::test]
async fn cancelling_the_callers_context_cancels_the_server_context() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.sock");
    let (_stop, mut cancelled) = serve_here(&path);
    let client = SocketClient::connect(&path).await.expect("connect");
    let count = client.endpoint::<Count, u32>("count");
    let ctx = RequestContext::new("upstream-gone");
    let mut stream = count.call(
        Count {
            from: 0,
            n: u32::MAX,
            delay_ms: 5,
        },
        ctx.clone(),
    );
    assert_eq!(
        tokio::time::timeout(LIMIT, stream.next())
            .await
            .expect("first"),
        Some(Ok(0))
    );
    ctx.cancel();
    let next = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .expect("ends");
    assert_eq!(
        next.map(|r| r.map_err(|e| e.kind)),
        Some(Err(ErrorKind::Cancelled))
    );
    let seen = tokio::time::timeout(Duration::from_secs(2), cancelled.recv())
        .await
        .expect("server saw it");
    assert_eq!(seen.as_deref(), Some("upstream-gone"));
}

#[tokio::test]
async fn unknown_endpoint_and_wrong_types_are_errors_not_dropped_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.sock");
    let (_stop, _) = serve_here(&path);
    let client = SocketClient::connect(&path).await.expect("connect");

    let missing = client.endpoint::<Count, u32>("cuont");
    let got = collect(missing.call(
        Count {
            from: 0,
            n: 1,
            delay_ms: 0,
        },
        RequestContext::new("x"),
    ))
    .await;
    assert_eq!(got.len(), 1);
    let err = got[0].clone().expect_err("unknown endpoint must fail");
    assert_eq!(err.kind, ErrorKind::NotFound);
    assert!(
        err.message.contains("cuont") && err.message.contains("count, echo"),
        "{}",
        err.message
    );

    // A payload of the wrong type for the endpoint: rejected, connection intact.
    let wrong = client.endpoint::<u8, u32>("count");
    let got = collect(wrong.call(7, RequestContext::new("y"))).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].clone().map_err(|e| e.kind),
        Err(ErrorKind::InvalidRequest)
    );

    let count = client.endpoint::<Count, u32>("count");
    let got = collect(count.call(
        Count {
            from: 1,
            n: 2,
            delay_ms: 0,
        },
        RequestContext::new("z"),
    ))
    .await;
    assert_eq!(got, vec![Ok(1), Ok(2)]);
}

#[tokio::test]
async fn a_malformed_frame_closes_only_that_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.sock");
    let (_stop, _) = serve_here(&path);
    let mut raw = tokio::net::UnixStream::connect(&path)
        .await
        .expect("raw connect");
    raw.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .expect("write garbage");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), raw.read(&mut buf))
        .await
        .expect("server did not close the connection");
    assert!(matches!(n, Ok(0) | Err(_)), "expected EOF, got {n:?}");

    let client = SocketClient::connect(&path).await.expect("connect");
    let count = client.endpoint::<Count, u32>("count");
    let got = collect(count.call(
        Count {
            from: 9,
            n: 1,
            delay_ms: 0,
        },
        RequestContext::new("ok"),
    ))
    .await;
    assert_eq!(got, vec![Ok(9)]);
}

#[tokio::test]
async fn shutdown_lets_in_flight_streams_finish_and_refuses_new_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.sock");
    let (stop, _) = serve_here(&path);
    let client = SocketClient::connect(&path).await.expect("connect");
    let count = client.endpoint::<Count, u32>("count");
    let mut stream = count.call(
        Count {
            from: 0,
            n: 5,
            delay_ms: 40,
        },
        RequestContext::new("late"),
    );
    assert_eq!(
        tokio::time::timeout(LIMIT, stream.next())
            .await
            .expect("first"),
        Some(Ok(0))
    );
    stop.cancel();
    // Draining: the open connection still answers, but refuses new work.
    let deadline = Instant::now() + Duration::from_secs(2);
    let refused = loop {
        let got = collect(count.call(
            Count {
                from: 0,
                n: 1,
                delay_ms: 0,
            },
            RequestContext::new("new"),
        ))
        .await;
        if got != vec![Ok(0)] || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(refused.len(), 1);
    let err = refused[0]
        .clone()
        .expect_err("a draining server refuses new requests");
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err}");
    let rest = collect(stream).await;
    assert_eq!(rest, vec![Ok(1), Ok(2), Ok(3), Ok(4)]);
    let deadline = Instant::now() + Duration::from_secs(2);
    while path.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        SocketClient::connect(&path).await.is_err(),
        "a stopped server must refuse connections"
    );
}

/// Starts this test binary again as a server process on `path` (see `helper_server_process`).
struct ServerProcess(Child);

impl ServerProcess {
    async fn start(path: &Path) -> Self {
        let exe = std::env::current_exe().expect("current exe");
        let child = Command::new(exe)
            .args([
                "--exact",
                "helper_server_process",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("DYNAMO_TEST_SERVE_SOCKET", path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn server process");
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::UnixStream::connect(path).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "server process never listened on {}",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ServerProcess(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Not a test: the server half of the cross-process tests, run in a child process.
#[test]
#[ignore]
fn helper_server_process() {
    let Some(path) = std::env::var_os("DYNAMO_TEST_SERVE_SOCKET").map(PathBuf::from) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (server, _cancelled) = server(&path);
        server.serve(CancellationToken::new()).await;
    });
}

#[tokio::test]
async fn server_killed_mid_stream_ends_the_stream_with_unavailable_promptly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.sock");
    let mut process = ServerProcess::start(&path).await;
    let client = SocketClient::connect(&path).await.expect("connect");
    let count = client.endpoint::<Count, u32>("count");
    let mut streams: Vec<_> = (0..3)
        .map(|i| {
            count.call(
                Count {
                    from: 0,
                    n: u32::MAX,
                    delay_ms: 10,
                },
                RequestContext::new(format!("k{i}")),
            )
        })
        .collect();
    for s in &mut streams {
        assert_eq!(
            tokio::time::timeout(LIMIT, s.next()).await.expect("first"),
            Some(Ok(0))
        );
    }
    process.kill();
    let killed_at = Instant::now();
    for s in &mut streams {
        let end = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                match s.next().await {
                    Some(Ok(_)) => continue,
                    other => return other,
                }
            }
        })
        .await
        .expect("stream did not end within a second of the server dying");
        let err = end
            .expect("a dead server must be an error, not a clean end")
            .expect_err("error");
        assert_eq!(err.kind, ErrorKind::Unavailable, "{err}");
    }
    assert!(killed_at.elapsed() < Duration::from_secs(1));

    // With nobody listening a call fails fast, and says where it tried.
    let got = collect(count.call(
        Count {
            from: 0,
            n: 1,
            delay_ms: 0,
        },
        RequestContext::new("down"),
    ))
    .await;
    let err = got[0].clone().expect_err("no server");
    assert_eq!(err.kind, ErrorKind::Unavailable);
    assert!(err.message.contains("s.sock"), "{}", err.message);
}

#[tokio::test]
async fn the_next_call_reconnects_after_a_server_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.sock");
    let mut first = ServerProcess::start(&path).await;
    let config = SocketClientConfig {
        connect_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let client = SocketClient::connect_with(&path, config)
        .await
        .expect("connect");
    let count = client.endpoint::<Count, u32>("count");
    let got = collect(count.call(
        Count {
            from: 1,
            n: 3,
            delay_ms: 0,
        },
        RequestContext::new("a"),
    ))
    .await;
    assert_eq!(got, vec![Ok(1), Ok(2), Ok(3)]);

    first.kill();
    let _second = ServerProcess::start(&path).await;
    let got = collect(count.call(
        Count {
            from: 7,
            n: 2,
            delay_ms: 0,
        },
        RequestContext::new("b"),
    ))
    .await;
    assert_eq!(got, vec![Ok(7), Ok(8)]);
}

#[tokio::test]
async fn an_instance_set_of_socket_clients_round_robins_across_servers() {
    use dynamo_runtime::InstanceSet;
    let dir = tempfile::tempdir().expect("tempdir");
    let set = InstanceSet::<String, String>::new("echo");
    let mut stops = Vec::new();
    for id in 0..2u64 {
        let path = dir.path().join(format!("{id}.sock"));
        let (stop, _) = serve_here(&path);
        stops.push(stop);
        let client = SocketClient::connect(&path).await.expect("connect");
        set.add(id, client.endpoint::<String, String>("echo"));
    }
    let set: Arc<dyn Service<String, String>> = Arc::new(set);
    for i in 0..4 {
        let got = collect(set.call(format!("m{i}"), RequestContext::new(format!("r{i}")))).await;
        assert_eq!(got.first(), Some(&Ok(format!("m{i}"))));
    }
    // Take one server down: its instance fails with Unavailable, the other still serves.
    stops[0].cancel();
    let mut kinds = Vec::new();
    for i in 0..4 {
        let got = collect(set.call("x".into(), RequestContext::new(format!("d{i}")))).await;
        kinds.push(
            got.first()
                .map(|r| r.as_ref().map(|_| ()).map_err(|e| e.kind)),
        );
    }
    assert!(kinds.contains(&Some(Ok(()))), "{kinds:?}");
    assert!(
        kinds.contains(&Some(Err(ErrorKind::Unavailable))),
        "{kinds:?}"
    );
}

/// Serves `count` and `echo` on TCP (loopback, a free port); the token stops it.
fn serve_tcp() -> (
    CancellationToken,
    mpsc::UnboundedReceiver<String>,
    std::net::SocketAddr,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut server = SocketServer::bind_tcp("127.0.0.1:0").expect("bind tcp");
    server
        .register::<Count, u32>("count", Arc::new(Counter { cancelled: tx }))
        .expect("register count");
    server
        .register::<String, String>("echo", Arc::new(Echo))
        .expect("register echo");
    let addr = server.local_addr().expect("a TCP address");
    assert_eq!(server.path(), Path::new(""));
    let stop = CancellationToken::new();
    tokio::spawn(server.serve(stop.clone()));
    (stop, rx, addr)
}

#[tokio::test]
async fn streams_and_cancellation_work_over_tcp_too() {
    let (_stop, mut cancelled, addr) = serve_tcp();
    let client = SocketClient::tcp(&addr.to_string(), SocketClientConfig::default());
    let echo = client.endpoint::<String, String>("echo");
    let got = collect(echo.call("over tcp".into(), RequestContext::new("t-1"))).await;
    assert_eq!(
        got[..2],
        [Ok("over tcp".to_string()), Ok("t-1".to_string())]
    );

    // Dropping a stream mid-way cancels the server's side of it.
    let count = client.endpoint::<Count, u32>("count");
    let mut s = count.call(
        Count {
            from: 0,
            n: 1_000,
            delay_ms: 5,
        },
        RequestContext::new("dropped"),
    );
    assert_eq!(
        tokio::time::timeout(LIMIT, s.next()).await.expect("first"),
        Some(Ok(0))
    );
    drop(s);
    let id = tokio::time::timeout(LIMIT, cancelled.recv())
        .await
        .expect("the server saw the cancellation");
    assert_eq!(id.as_deref(), Some("dropped"));
}

#[tokio::test]
async fn a_tcp_client_finds_a_server_that_moved() {
    let (stop, _c, first) = serve_tcp();
    let current = Arc::new(std::sync::Mutex::new(first.to_string()));
    let lookups = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let resolve: dynamo_runtime::transport::socket_client::Resolve = {
        let (current, lookups) = (current.clone(), lookups.clone());
        Arc::new(move || {
            lookups.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let addr = current.lock().map(|a| a.clone()).unwrap_or_default();
            Box::pin(async move { Ok(addr) })
        })
    };
    let client = SocketClient::tcp_resolved("the peer", resolve, SocketClientConfig::default());
    let echo = client.endpoint::<String, String>("echo");
    let got = collect(echo.call("one".into(), RequestContext::new("a"))).await;
    assert_eq!(got[0], Ok("one".to_string()));

    // The server goes away: a call fails with a clear, retryable error naming the peer.
    stop.cancel();
    let deadline = Instant::now() + LIMIT;
    let err = loop {
        let got = collect(echo.call("two".into(), RequestContext::new("b"))).await;
        match got.first() {
            Some(Err(e)) => break e.clone(),
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            other => panic!("the stopped server still answers: {other:?}"),
        }
    };
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err}");
    assert!(err.message.contains("the peer"), "{err}");

    // It comes back elsewhere; the next connect looks the address up again.
    let (_stop2, _c2, second) = serve_tcp();
    assert_ne!(first, second);
    if let Ok(mut a) = current.lock() {
        *a = second.to_string();
    }
    let before = lookups.load(std::sync::atomic::Ordering::SeqCst);
    let got = collect(echo.call("three".into(), RequestContext::new("c"))).await;
    assert_eq!(got[0], Ok("three".to_string()));
    assert!(lookups.load(std::sync::atomic::Ordering::SeqCst) > before);
}
