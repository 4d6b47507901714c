//! The NATS transport against a real `nats-server` (the Debian package, installed by
//! scripts/setup-tests.sh), started here on a free loopback port and stopped at the end.

use std::io::BufRead;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dynamo_runtime::transport::nats::{
    connect, EndpointAddress, NatsClient, NatsClientConfig, NatsServer, NatsServerConfig,
};
use dynamo_runtime::{ErrorKind, RequestContext, ResponseStream, ServeError, Service};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(20);

/// A `nats-server` on a free loopback port; killed on drop.
struct NatsProcess {
    child: Option<Child>,
    port: u16,
    _dir: tempfile::TempDir,
}

fn find_binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(
        ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"]
            .into_iter()
            .map(PathBuf::from),
    );
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` is not installed, and these tests need a real one: \
         run scripts/setup-tests.sh (it installs the Debian package)"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl NatsProcess {
    fn start() -> Self {
        let mut nats = NatsProcess {
            child: None,
            port: free_port(),
            _dir: tempfile::tempdir().expect("tempdir"),
        };
        nats.spawn();
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new(find_binary("nats-server"))
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Count {
    from: u32,
    n: u32,
    delay_ms: u64,
}

/// Streams `from..from+n`, one item per `delay_ms`; reports the request id of every call
/// whose context it saw cancelled.
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

/// Answers with what arrived besides the payload, then fails.
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

const NS: &str = "test";
const GRAPH: &str = "g";
const NODE: &str = "worker";

fn address(port: &str) -> EndpointAddress {
    EndpointAddress::new(NS, GRAPH, NODE, port)
}

fn quick_server_config() -> NatsServerConfig {
    NatsServerConfig {
        heartbeat: Duration::from_millis(100),
        ..NatsServerConfig::default()
    }
}

fn quick_client_config() -> NatsClientConfig {
    NatsClientConfig {
        idle_timeout: Duration::from_millis(800),
        ..NatsClientConfig::default()
    }
}

/// Serves `count` and `echo` as instance `id`; the token stops it.
async fn serve(
    url: &str,
    id: u64,
    config: NatsServerConfig,
) -> (CancellationToken, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let nats = connect(url).await.expect("server connects");
    let mut server = NatsServer::new(nats, NS, GRAPH, NODE, id).with_config(config);
    server
        .register::<Count, u32>("count", Arc::new(Counter { cancelled: tx }))
        .expect("register count");
    server
        .register::<String, String>("echo", Arc::new(Echo))
        .expect("register echo");
    let stop = CancellationToken::new();
    server.start(stop.clone()).await.expect("server starts");
    (stop, rx)
}

async fn client(url: &str, config: NatsClientConfig) -> NatsClient {
    let nats = connect(url).await.expect("client connects");
    NatsClient::new(nats, config).await.expect("client")
}

async fn collect<T>(stream: ResponseStream<T>) -> Vec<Result<T, ServeError>> {
    tokio::time::timeout(LIMIT, stream.collect())
        .await
        .expect("stream did not end in time")
}

fn count(from: u32, n: u32, delay_ms: u64) -> Count {
    Count { from, n, delay_ms }
}

#[tokio::test]
async fn a_stream_round_trips_with_its_context_and_error() {
    let nats = NatsProcess::start();
    let (_stop, _) = serve(&nats.url(), 0xa1, quick_server_config()).await;
    let client = client(&nats.url(), quick_client_config()).await;

    let counter = client.endpoint::<Count, u32>(&address("count"));
    let got = collect(counter.call(count(3, 5, 0), RequestContext::new("a"))).await;
    assert_eq!(got, vec![Ok(3), Ok(4), Ok(5), Ok(6), Ok(7)]);

    // A long stream through a small window: flow control keeps every item, in order.
    let config = NatsClientConfig {
        stream_window: 4,
        ..quick_client_config()
    };
    let small = self::client(&nats.url(), config).await;
    let counter = small.endpoint::<Count, u32>(&address("count"));
    let got = collect(counter.call(count(0, 2000, 0), RequestContext::new("b"))).await;
    assert_eq!(got, (0..2000).map(Ok).collect::<Vec<_>>());

    let echo = client.endpoint::<String, String>(&address("echo"));
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
async fn a_call_can_target_one_instance() {
    let nats = NatsProcess::start();
    let (_a, _) = serve(&nats.url(), 1, quick_server_config()).await;
    let (_b, mut b_cancelled) = serve(&nats.url(), 2, quick_server_config()).await;
    let client = client(&nats.url(), quick_client_config()).await;
    // Only instance 2 sees these calls: cancel each and check who reports it.
    let on_b = client.instance_endpoint::<Count, u32>(&address("count"), 2);
    for i in 0..4 {
        let mut stream = on_b.call(count(0, 1000, 20), RequestContext::new(format!("b-{i}")));
        assert_eq!(stream.next().await, Some(Ok(0)));
        drop(stream);
        let who = tokio::time::timeout(LIMIT, b_cancelled.recv()).await;
        assert_eq!(
            who.expect("instance 2 saw the cancel"),
            Some(format!("b-{i}"))
        );
    }
    let nobody = client.instance_endpoint::<Count, u32>(&address("count"), 3);
    let started = Instant::now();
    let got = collect(nobody.call(count(0, 1, 0), RequestContext::new("c"))).await;
    assert_eq!(got.len(), 1);
    let err = got[0].clone().expect_err("no instance 3");
    assert_eq!(err.kind, ErrorKind::Unavailable, "{err}");
    assert!(err.message.contains("no instance serves"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no-responders is immediate"
    );
}

#[tokio::test]
async fn errors_have_kinds_a_caller_can_act_on() {
    let nats = NatsProcess::start();
    let one_at_a_time = NatsServerConfig {
        max_in_flight: 1,
        ..quick_server_config()
    };
    let (_stop, _) = serve(&nats.url(), 5, one_at_a_time).await;
    let client = client(&nats.url(), quick_client_config()).await;

    // Nobody serves this port.
    let missing = client.endpoint::<Count, u32>(&address("nope"));
    let got = collect(missing.call(count(0, 1, 0), RequestContext::new("m"))).await;
    assert!(
        matches!(&got[..], [Err(e)] if e.kind == ErrorKind::Unavailable),
        "{got:?}"
    );

    // A request of the wrong type is rejected as invalid.
    let wrong = client.endpoint::<u8, u32>(&address("count"));
    let got = collect(wrong.call(1u8, RequestContext::new("w"))).await;
    assert!(
        matches!(&got[..], [Err(e)] if e.kind == ErrorKind::InvalidRequest),
        "{got:?}"
    );

    // The server is full: the second concurrent call is refused, not queued forever.
    let counter = client.endpoint::<Count, u32>(&address("count"));
    let mut first = counter.call(count(0, 100, 50), RequestContext::new("1"));
    assert_eq!(first.next().await, Some(Ok(0)));
    let got = collect(counter.call(count(0, 1, 0), RequestContext::new("2"))).await;
    assert!(
        matches!(&got[..], [Err(e)] if e.kind == ErrorKind::Overloaded),
        "{got:?}"
    );
    drop(first);
}

#[tokio::test]
async fn cancellation_reaches_the_server() {
    let nats = NatsProcess::start();
    let (_stop, mut cancelled) = serve(&nats.url(), 7, quick_server_config()).await;
    let client = client(&nats.url(), quick_client_config()).await;
    let counter = client.endpoint::<Count, u32>(&address("count"));

    // Dropping the stream cancels the call.
    let mut stream = counter.call(count(0, u32::MAX, 10), RequestContext::new("dropped"));
    assert_eq!(stream.next().await, Some(Ok(0)));
    drop(stream);
    let who = tokio::time::timeout(LIMIT, cancelled.recv()).await;
    assert_eq!(who.expect("cancel arrived"), Some("dropped".to_string()));

    // Cancelling the context ends the caller's stream and the server's call.
    let ctx = RequestContext::new("ctx");
    let mut stream = counter.call(count(0, u32::MAX, 10), ctx.clone());
    assert_eq!(stream.next().await, Some(Ok(0)));
    ctx.cancel();
    let rest = collect(stream).await;
    assert!(
        matches!(rest.last(), Some(Err(e)) if e.kind == ErrorKind::Cancelled),
        "{rest:?}"
    );
    let who = tokio::time::timeout(LIMIT, cancelled.recv()).await;
    assert_eq!(who.expect("cancel arrived"), Some("ctx".to_string()));

    // Dropped before the server even accepted it: still cancelled there.
    let stream = counter.call(count(0, u32::MAX, 10), RequestContext::new("early"));
    let mut stream = stream;
    let _ = futures::poll!(stream.next());
    drop(stream);
    let who = tokio::time::timeout(LIMIT, cancelled.recv()).await;
    assert_eq!(who.expect("cancel arrived"), Some("early".to_string()));
}

#[tokio::test]
async fn heartbeats_keep_a_slow_stream_alive() {
    let nats = NatsProcess::start();
    let (_stop, _) = serve(&nats.url(), 8, quick_server_config()).await;
    let client = client(&nats.url(), quick_client_config()).await;
    let counter = client.endpoint::<Count, u32>(&address("count"));
    // Each item takes longer than the idle timeout; heartbeats fill the silence.
    let got = collect(counter.call(count(0, 3, 1500), RequestContext::new("slow"))).await;
    assert_eq!(got, vec![Ok(0), Ok(1), Ok(2)]);
}

/// Starts this test binary again as a NATS server process (see `helper_nats_server`).
struct ServerProcess(Child);

impl ServerProcess {
    fn start(url: &str, id: u64) -> Self {
        let exe = std::env::current_exe().expect("current exe");
        let mut child = Command::new(exe)
            .args([
                "--exact",
                "helper_nats_server",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("DYNAMO_TEST_NATS_URL", url)
            .env("DYNAMO_TEST_NATS_INSTANCE", id.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn server process");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let ready = lines.any(|l| l.map(|l| l.contains("SERVING")).unwrap_or(false));
        assert!(ready, "server process never served");
        ServerProcess(child)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Not a test: the server half of the cross-process tests, run in a child process.
#[test]
#[ignore]
fn helper_nats_server() {
    let Ok(url) = std::env::var("DYNAMO_TEST_NATS_URL") else {
        return;
    };
    let id = std::env::var("DYNAMO_TEST_NATS_INSTANCE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (_stop, _) = serve(&url, id, quick_server_config()).await;
        println!("SERVING");
        std::future::pending::<()>().await;
    });
}

#[tokio::test]
async fn a_worker_killed_mid_stream_ends_the_stream_with_unavailable_promptly() {
    let nats = NatsProcess::start();
    let mut worker = ServerProcess::start(&nats.url(), 0xdead);
    let client = client(&nats.url(), quick_client_config()).await;
    let counter = client.endpoint::<Count, u32>(&address("count"));
    let mut streams: Vec<_> = (0..3)
        .map(|i| counter.call(count(0, u32::MAX, 5), RequestContext::new(format!("k{i}"))))
        .collect();
    for s in &mut streams {
        assert_eq!(s.next().await, Some(Ok(0)));
    }
    let _ = worker.0.kill();
    let _ = worker.0.wait();
    let killed = Instant::now();
    for s in streams {
        let rest = collect(s).await;
        let last = rest.last().expect("an error ends the stream");
        let err = last.clone().expect_err("the stream ends with an error");
        assert_eq!(err.kind, ErrorKind::Unavailable, "{err}");
        assert!(err.message.contains("presumed dead"), "{err}");
    }
    // idle_timeout 800 ms, swept every 200 ms.
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "took {:?}",
        killed.elapsed()
    );
}

#[tokio::test]
async fn calls_succeed_again_after_nats_restarts() {
    let mut nats = NatsProcess::start();
    let url = nats.url();
    let (_stop, _) = serve(&url, 9, quick_server_config()).await;
    let client = client(&url, quick_client_config()).await;
    let counter = client.endpoint::<Count, u32>(&address("count"));
    let got = collect(counter.call(count(0, 3, 0), RequestContext::new("before"))).await;
    assert_eq!(got, vec![Ok(0), Ok(1), Ok(2)]);

    // A stream in flight when NATS goes away ends with an error, not a hang.
    let mut open = counter.call(count(0, u32::MAX, 5), RequestContext::new("during"));
    assert_eq!(open.next().await, Some(Ok(0)));
    nats.stop();
    let rest = collect(open).await;
    assert!(
        matches!(rest.last(), Some(Err(e)) if e.kind == ErrorKind::Unavailable),
        "{:?}",
        rest.last()
    );

    nats.spawn();
    // Both sides reconnect and resubscribe on their own; calls work again.
    let deadline = Instant::now() + LIMIT;
    let mut last = None;
    while Instant::now() < deadline {
        let got = collect(counter.call(count(0, 3, 0), RequestContext::new("after"))).await;
        if got == vec![Ok(0), Ok(1), Ok(2)] {
            return;
        }
        last = Some(got);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("calls never succeeded after NATS restarted; last: {last:?}");
}

#[tokio::test]
async fn a_bounded_endpoint_holds_its_extra_calls_until_a_slot_frees() {
    let nats = NatsProcess::start();
    let (_stop, _) = serve(&nats.url(), 9, quick_server_config()).await;
    let client = client(&nats.url(), quick_client_config()).await;
    // An edge with queue_size = 1 to instance 9.
    let one = client.bounded_instance_endpoint::<Count, u32>(&address("count"), 9, 1);
    let mut first = one.call(count(0, 3, 100), RequestContext::new("1"));
    assert_eq!(first.next().await, Some(Ok(0)));
    let mut second = one.call(count(7, 1, 0), RequestContext::new("2"));
    // While the first is open the second waits for the slot (neither refused nor sent).
    let early = tokio::time::timeout(Duration::from_millis(120), second.next()).await;
    assert!(
        early.is_err(),
        "the second call ran beside the first: {early:?}"
    );
    let rest = collect(first).await;
    assert_eq!(rest.len(), 2);
    assert_eq!(
        tokio::time::timeout(LIMIT, second.next()).await,
        Ok(Some(Ok(7))),
        "the second call runs once the first is done"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_share_batches_and_each_keeps_its_items_in_order() {
    let nats = NatsProcess::start();
    let (_stop, _) = serve(&nats.url(), 0xb1, quick_server_config()).await;
    // A bystander sees every message sent to any client inbox.
    let watch = connect(&nats.url()).await.expect("watcher connects");
    let mut seen = watch.subscribe("_INBOX.>").await.expect("watch inboxes");
    watch.flush().await.expect("flush");
    let client = client(&nats.url(), quick_client_config()).await;
    let counter = client.endpoint::<Count, u32>(&address("count"));

    // 64 streams of 200 items each, all ticking at once (1 ms apart).
    let calls = (0..64u32).map(|k| {
        let stream = counter.call(
            count(k * 1000, 200, 1),
            RequestContext::new(format!("s{k}")),
        );
        async move { (k, collect(stream).await) }
    });
    for (k, got) in futures::future::join_all(calls).await {
        let want: Vec<_> = (k * 1000..k * 1000 + 200).map(Ok).collect();
        assert_eq!(got, want, "stream {k}");
    }

    let (mut messages, mut batches) = (0usize, 0usize);
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(300), seen.next()).await {
        messages += 1;
        if msg.subject.ends_with(".b") {
            batches += 1;
        }
    }
    // 64 × 202 frames (Accepted, items, End): batched, far fewer messages.
    let frames = 64 * 202;
    assert!(batches > 0, "no batch among {messages} messages");
    assert!(
        messages < frames / 2,
        "{messages} messages for {frames} frames ({batches} batches)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_does_not_read_batches_gets_every_message_on_its_reply_subject() {
    use dynamo_runtime::transport::nats::wire::{
        decode_frame, encode_request, Frames, RequestHead, ServerFrame,
    };
    let nats = NatsProcess::start();
    let (_stop, _) = serve(&nats.url(), 0xc1, quick_server_config()).await;
    // A plain NATS client (another implementation, or an older dynamo): no batch header.
    let raw = connect(&nats.url()).await.expect("raw client connects");
    let mut replies = raw.subscribe("plain.inbox.*").await.expect("subscribe");
    raw.flush().await.expect("flush");
    let streams = 16u64;
    for s in 1..=streams {
        let body = encode_request(RequestHead { window: 4096 }, &count(0, 50, 1)).expect("encode");
        raw.publish_with_reply(address("count").subject(), format!("plain.inbox.{s}"), body)
            .await
            .expect("publish");
    }
    let mut ended = 0;
    let mut items = 0;
    while ended < streams {
        let msg = tokio::time::timeout(LIMIT, replies.next())
            .await
            .expect("replies keep coming")
            .expect("subscription open");
        assert!(
            !msg.subject.ends_with(".b"),
            "a batch for a caller that never asked: {}",
            msg.subject
        );
        let mut frames = Frames::new(msg.payload);
        while let Some(frame) = frames.next_frame() {
            let frame = frame.expect("a whole frame");
            match decode_frame(&frame).expect("a frame").0 {
                ServerFrame::Item { .. } => items += 1,
                ServerFrame::End { .. } => ended += 1,
                ServerFrame::Error { error, .. } => panic!("{error}"),
                _ => {}
            }
        }
    }
    assert_eq!(items, 16 * 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_longer_than_its_window_finishes_while_its_server_drains() {
    let nats = NatsProcess::start();
    let (stop, _) = serve(&nats.url(), 0xd1, quick_server_config()).await;
    let config = NatsClientConfig {
        stream_window: 4,
        ..quick_client_config()
    };
    let client = client(&nats.url(), config).await;
    let counter = client.endpoint::<Count, u32>(&address("count"));
    let mut stream = counter.call(count(0, 100, 2), RequestContext::new("drain"));
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(stream.next().await.expect("an item"));
    }
    // Shut the server down mid-stream: it drains, and the stream still needs credit for
    // 95 more items than its window of 4.
    stop.cancel();
    let started = Instant::now();
    got.extend(collect(stream).await);
    assert_eq!(got, (0..100).map(Ok).collect::<Vec<_>>());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the drain waited for credit: {:?}",
        started.elapsed()
    );
}
