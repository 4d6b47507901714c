//! CPU per request and per streamed token of the same trivial streaming service served
//! over the local socket and over NATS, same load. Client and server run in this process;
//! its CPU comes from getrusage, and for NATS the broker's (`nats-server`, started here on
//! a free loopback port) is read from /proc and reported beside it.
//!
//! cargo run --release -p dynamo-runtime --example nats_vs_socket -- [requests] [tokens] [concurrency]

use std::sync::Arc;
use std::time::{Duration, Instant};

use dynamo_runtime::transport::nats::{
    connect, EndpointAddress, NatsClient, NatsClientConfig, NatsServer,
};
use dynamo_runtime::transport::{SocketClient, SocketServer};
use dynamo_runtime::{RequestContext, ResponseStream, Service};
use futures::StreamExt;
use nix::sys::resource::{getrusage, UsageWho};
use tokio_util::sync::CancellationToken;

/// Streams `n` small tokens as fast as the consumer takes them.
struct Tokens;
impl Service<u32, u32> for Tokens {
    fn call(&self, n: u32, _ctx: RequestContext) -> ResponseStream<u32> {
        Box::pin(futures::stream::iter((0..n).map(Ok)))
    }
}

fn cpu_self() -> Duration {
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| {
        Duration::from_micros(tv.tv_sec() as u64 * 1_000_000 + tv.tv_usec() as u64)
    };
    t(u.user_time()) + t(u.system_time())
}

/// utime + stime of another process, from /proc (clock ticks of 10 ms).
fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

async fn load(svc: Arc<dyn Service<u32, u32>>, requests: usize, tokens: u32, concurrency: usize) {
    futures::stream::iter(0..requests)
        .for_each_concurrent(concurrency, |i| {
            let svc = svc.clone();
            async move {
                let mut s = svc.call(tokens, RequestContext::new(i.to_string()));
                let mut got = 0;
                while let Some(item) = s.next().await {
                    item.expect("token");
                    got += 1;
                }
                assert_eq!(got, tokens);
            }
        })
        .await;
}

fn find_nats_server() -> std::path::PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"] {
        let p = std::path::Path::new(dir).join("nats-server");
        if p.is_file() {
            return p;
        }
    }
    eprintln!("nats-server is not installed: run scripts/setup-tests.sh");
    std::process::exit(2);
}

fn report(
    name: &str,
    cpu: Duration,
    broker: Option<Duration>,
    wall: Duration,
    requests: usize,
    tokens: u32,
) {
    let per_req = cpu.as_secs_f64() * 1e6 / requests as f64;
    let per_tok = cpu.as_secs_f64() * 1e9 / (requests as f64 * tokens as f64);
    print!("{name:<7} process: {per_req:8.1} µs CPU/request {per_tok:8.0} ns CPU/token");
    if let Some(b) = broker {
        let all = cpu + b;
        print!(
            " | with nats-server: {:8.1} µs/request {:8.0} ns/token",
            all.as_secs_f64() * 1e6 / requests as f64,
            all.as_secs_f64() * 1e9 / (requests as f64 * tokens as f64)
        );
    }
    println!("  (wall {:.2} s)", wall.as_secs_f64());
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let requests: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let tokens: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    let concurrency: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(32);
    println!("{requests} requests x {tokens} tokens, {concurrency} concurrent");

    // Local socket.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bench.sock");
    let mut server = SocketServer::bind(&path).expect("bind");
    server
        .register::<u32, u32>("tokens", Arc::new(Tokens))
        .expect("register");
    let stop = CancellationToken::new();
    tokio::spawn(server.serve(stop.clone()));
    let client = SocketClient::connect(&path).await.expect("connect");
    let svc = client.endpoint::<u32, u32>("tokens");
    load(svc.clone(), requests / 10, tokens, concurrency).await; // warm-up
    let (c0, w0) = (cpu_self(), Instant::now());
    load(svc, requests, tokens, concurrency).await;
    let socket_cpu = cpu_self() - c0;
    report("socket", socket_cpu, None, w0.elapsed(), requests, tokens);
    stop.cancel();

    // NATS.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let mut broker = std::process::Command::new(find_nats_server())
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start nats-server");
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stop = CancellationToken::new();
    let mut server = NatsServer::new(connect(&url).await.expect("nats"), "bench", "g", "w", 1);
    server
        .register::<u32, u32>("tokens", Arc::new(Tokens))
        .expect("register");
    server.start(stop.clone()).await.expect("serve");
    let client = NatsClient::new(
        connect(&url).await.expect("nats"),
        NatsClientConfig::default(),
    )
    .await
    .expect("client");
    let svc = client.endpoint::<u32, u32>(&EndpointAddress::new("bench", "g", "w", "tokens"));
    load(svc.clone(), requests / 10, tokens, concurrency).await;
    let (c0, b0, w0) = (cpu_self(), cpu_of(broker.id()), Instant::now());
    load(svc, requests, tokens, concurrency).await;
    let nats_cpu = cpu_self() - c0;
    let broker_cpu = cpu_of(broker.id()) - b0;
    report(
        "nats",
        nats_cpu,
        Some(broker_cpu),
        w0.elapsed(),
        requests,
        tokens,
    );
    println!(
        "nats / socket CPU: {:.2}x (process), {:.2}x (with nats-server)",
        nats_cpu.as_secs_f64() / socket_cpu.as_secs_f64(),
        (nats_cpu + broker_cpu).as_secs_f64() / socket_cpu.as_secs_f64()
    );
    stop.cancel();
    let _ = broker.kill();
    let _ = broker.wait();
}
