//! vLLM's KV events over ZeroMQ, end to end into a KV router's index: a Python publisher
//! (pyzmq + msgspec, vLLM 0.33.0's structs; tests/python/vllm_kv_publisher.py) emits the
//! exact wire format, our subscriber translates it, the worker's `events` port streams it,
//! and the router's overlap for the prompt follows every step: stored, removed, and a
//! sequence gap.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use dynamo_engines::kv_events::hub::{EventsPort, KvEventHub};
use dynamo_engines::kv_events::subscriber;
use dynamo_protocol::{KvStreamItem, KvSubscribe, DEFAULT_BLOCK_HASH_SEED};
use dynamo_router::{KvConfig, KvMode, KvRouterHandle};
use dynamo_runtime::{RequestContext, Service};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

const WORKER: u64 = 0x5eed;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> PathBuf {
    std::env::var_os("DYNAMO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until the router's overlap for `tokens` on our worker is `want` blocks.
async fn overlap_becomes(kv: &KvRouterHandle, tokens: &[u32], want: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = kv.overlaps(tokens).get(WORKER);
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "overlap stayed {got} blocks, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_wire_events_move_the_routers_overlap() {
    scenario(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_is_filled_from_vllms_replay_socket() {
    scenario(true).await;
}

/// The publisher's three steps (see tests/python/vllm_kv_publisher.py), with or without
/// its replay socket.
async fn scenario(with_replay: bool) {
    let py = python();
    assert!(
        py.exists(),
        "{} missing: run scripts/setup-tests.sh",
        py.display()
    );
    let tokens: Vec<u32> = (0..48).map(|i| 1000 + i * 7).collect();
    let csv: Vec<String> = tokens.iter().map(u32::to_string).collect();
    let port = free_port();
    let replay_port = with_replay.then(free_port);
    let mut publisher = Command::new(&py)
        .arg(workspace().join("tests/python/vllm_kv_publisher.py"))
        .arg(port.to_string())
        .arg(csv.join(","))
        .args(replay_port.map(|p| p.to_string()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python starts");
    let mut lines = BufReader::new(publisher.stdout.take().expect("stdout")).lines();
    let mut stdin = publisher.stdin.take().expect("stdin");
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("bound"));

    // Our side: subscriber → hub → the worker's events port → the router's index.
    let stop = CancellationToken::new();
    let hub = KvEventHub::new(WORKER, 16, DEFAULT_BLOCK_HASH_SEED);
    tokio::spawn(subscriber::follow(
        format!("tcp://127.0.0.1:{port}"),
        replay_port.map(|p| format!("tcp://127.0.0.1:{p}")),
        hub.clone(),
        stop.clone(),
    ));
    let kv =
        KvRouterHandle::new(KvMode::Events, KvConfig::for_mode(KvMode::Events)).expect("kv router");
    let port_svc = EventsPort(hub.clone());
    let mut stream = port_svc.call(KvSubscribe, RequestContext::new("test"));
    let feed = {
        let kv = kv.clone();
        tokio::spawn(async move {
            while let Some(Ok(item)) = stream.next().await {
                match item {
                    KvStreamItem::Snapshot {
                        last_event_id,
                        events,
                        ..
                    } => {
                        kv.apply_snapshot(WORKER, last_event_id, &events);
                    }
                    KvStreamItem::Event(ev) => {
                        kv.apply_event(ev);
                    }
                }
            }
        })
    };
    let mut step = |n: u32| {
        writeln!(stdin, "next").expect("publisher reads");
        let line = lines.next().and_then(Result::ok).unwrap_or_default();
        assert!(line.starts_with("published"), "step {n}: {line}");
    };

    assert_eq!(kv.overlaps(&tokens).get(WORKER), 0);
    step(1);
    overlap_becomes(&kv, &tokens, 3).await;
    // A prompt that shares only the first block overlaps by one.
    let mut other = tokens.clone();
    other[20] = 1;
    assert_eq!(kv.overlaps(&other).get(WORKER), 1);

    step(2);
    overlap_becomes(&kv, &tokens, 2).await;

    step(3);
    if with_replay {
        // Batches 3 (block 2 again) and 4 (block 0 removed) were lost on the PUB socket
        // and come from the replay socket, before batch 5 stores block 0 again: all
        // three blocks are known, nothing was cleared.
        overlap_becomes(&kv, &tokens, 3).await;
        assert_eq!(hub.skipped().gaps, 0);
        assert_eq!(hub.blocks(), 3);
        assert_eq!(hub.last_seq(), Some(5));
    } else {
        // Without a replay socket the gap clears the worker's blocks, then batch 5
        // stores block 0 again.
        overlap_becomes(&kv, &tokens, 1).await;
        assert_eq!(hub.skipped().gaps, 1);
        assert_eq!(hub.blocks(), 1);
    }

    stop.cancel();
    feed.abort();
    drop(stdin);
    let _ = publisher.wait();
}
