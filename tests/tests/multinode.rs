//! `graphs/multinode.toml` as shipped, on three agents (machines `cpu-0`, `gpu-a`,
//! `gpu-b` at 127.0.0.1, .2, .3): frontend, preprocessor and router on one machine,
//! prefill on a second, decode on a third. Requests cross machines over NATS; the KV
//! blocks go from `gpu-a` to `gpu-b` over a direct TCP connection, not through NATS.
//!
//! No GPU here: the engines are swapped for the mocker (`--set …engine=mocker`), which
//! hands over real bytes of the model's KV layout; placement and transports are the
//! file's.

use std::time::{Duration, Instant};

use dynamo_tests::{model_cached, workspace, Agent, EtcdServer, Graph, NatsServer};
use futures::StreamExt;

const CHAT: &str = "/v1/chat/completions";

/// A prompt of several KV blocks (16 tokens each), different for each `i`.
fn long_prompt(i: usize) -> String {
    format!(
        "Request {i}: tell me a long story about a cat who lives on a boat and sails around \
         the world, meeting many friends in many harbours along the way, with lots of detail"
    )
}

/// The sum of the samples of `name` whose labels contain every one of `labels`.
fn sum(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `(local, remote)` of every established IPv4 TCP connection, as `a.b.c.d:port`.
fn established() -> Vec<(String, String)> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let addr = |hex: &str| -> Option<String> {
        let (ip, port) = hex.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?.to_le_bytes();
        let port = u16::from_str_radix(port, 16).ok()?;
        Some(format!("{}.{}.{}.{}:{port}", ip[0], ip[1], ip[2], ip[3]))
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // State 01: ESTABLISHED.
            (f.get(3) == Some(&"01")).then_some(())?;
            Some((addr(f.get(1)?)?, addr(f.get(2)?)?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multinode_graph_serves_across_three_machines_with_kv_over_tcp() {
    assert!(
        model_cached(),
        "the model is not cached: run scripts/setup-tests.sh"
    );
    let etcd = EtcdServer::start();
    let nats = NatsServer::start();
    let agents: Vec<Agent> = [
        ("cpu-0", "127.0.0.1"),
        ("gpu-a", "127.0.0.2"),
        ("gpu-b", "127.0.0.3"),
    ]
    .iter()
    .map(|(m, a)| Agent::start(m, a, &etcd.url()))
    .collect();
    let file = workspace().join("graphs/multinode.toml");
    let g = Graph::up_with(
        &file,
        &[
            "prefill.engine=mocker",
            "decode.engine=mocker",
            "prefill.device=cpu",
            "decode.device=cpu",
            "prefill.speedup=10.0",
            "decode.speedup=10.0",
        ],
        &["--etcd", &etcd.url(), "--nats", &nats.url()],
    );

    let client = reqwest::Client::new();
    for i in 0..4 {
        let r = client
            .post(format!("{}{CHAT}", g.url))
            .header("content-type", "application/json")
            .body(
                serde_json::json!({
                    "model": "smollm2",
                    "messages": [{"role": "user", "content": long_prompt(i)}],
                    "max_tokens": 6,
                    "ignore_eos": true,
                })
                .to_string(),
            )
            .send()
            .await
            .expect("request");
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(r#""completion_tokens":6"#), "{body}");
    }
    let r = client
        .post(format!("{}{CHAT}", g.url))
        .header("content-type", "application/json")
        .body(
            serde_json::json!({
                "model": "smollm2",
                "messages": [{"role": "user", "content": long_prompt(99)}],
                "max_tokens": 20,
                "stream": true,
                "ignore_eos": true,
            })
            .to_string(),
        )
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut text = String::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), body.next()).await {
            Ok(Some(Ok(b))) => text.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Err(e))) => panic!("stream broke: {e}"),
            Ok(None) => break,
            Err(_) => panic!("stream hung: {text}"),
        }
    }
    assert!(
        text.contains("[DONE]") && !text.contains("event: error"),
        "{text}"
    );

    // Every request went through a prefill worker on gpu-a (none fell back to decode
    // alone), so each one's KV blocks reached gpu-b.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let m = client
            .get(format!("{}/metrics", g.url))
            .send()
            .await
            .expect("metrics");
        let m = m.text().await.unwrap_or_default();
        // The other machines' samples arrive with the frontend's next poll of them.
        let routed = sum(
            &m,
            "dynamo_router_disagg_requests_total",
            &["path=\"prefill\""],
        );
        let blocks = |d: &str| sum(&m, "dynamo_engine_kv_transfer_blocks_total", &[d]);
        let (sent, received) = (
            blocks("direction=\"sent\""),
            blocks("direction=\"received\""),
        );
        if (routed >= 5.0 && sent > 0.0 && received == sent) || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let disagg: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("dynamo_router_disagg"))
        .collect();
    assert_eq!(
        sum(
            &metrics,
            "dynamo_router_disagg_requests_total",
            &["path=\"prefill\""]
        ),
        5.0,
        "{disagg:#?}"
    );
    assert_eq!(
        sum(
            &metrics,
            "dynamo_router_disagg_requests_total",
            &["path=\"fallback\""]
        ),
        0.0,
        "{disagg:#?}"
    );
    // The frontend's /metrics (on cpu-0) aggregates the whole graph: the KV blocks the
    // prefill engines on gpu-a sent and those the decode engines on gpu-b received are in
    // it (polled over NATS), and they agree.
    let blocks = |direction: &str| {
        let d = format!("direction=\"{direction}\"");
        sum(&metrics, "dynamo_engine_kv_transfer_blocks_total", &[&d])
    };
    assert!(
        blocks("sent") > 0.0,
        "no prefill engine in /metrics:\n{metrics}"
    );
    assert_eq!(blocks("received"), blocks("sent"), "{metrics}");
    // The blocks went over a direct connection to a listener on gpu-b's address: nothing
    // else of the graph listens there (NATS, etcd and HTTP are on 127.0.0.1).
    let to_gpu_b: Vec<(String, String)> = established()
        .into_iter()
        .filter(|(_, remote)| remote.starts_with("127.0.0.3:"))
        .collect();
    assert!(
        !to_gpu_b.is_empty(),
        "no TCP connection reaches gpu-b (127.0.0.3): {:?}",
        established()
    );
    for a in &agents {
        let log = a.log();
        assert!(!log.contains("KV transfer refused"), "{}: {log}", a.machine);
    }

    // The graph page reaches every process on every machine (over NATS): every replica
    // is up, and the calls into the prefill workers on gpu-a are counted.
    let admin = g
        .admin
        .clone()
        .expect("graph up --etcd serves the graph page");
    let into_prefill = |s: &serde_json::Value| -> f64 {
        (s["edges"].as_array().into_iter().flatten())
            .filter(|e| e["to"].as_str().is_some_and(|t| t.starts_with("prefill")))
            .filter_map(|e| e["requests_total"].as_f64())
            .sum()
    };
    let all_up = |s: &serde_json::Value| -> bool {
        s["nodes"].as_array().is_some_and(|nodes| {
            !nodes.is_empty()
                && nodes.iter().all(|n| {
                    (n["replicas"].as_array())
                        .is_some_and(|rs| rs.iter().all(|r| r["state"] == "up"))
                })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let text = client
            .get(format!("http://{admin}/api/stats"))
            .send()
            .await
            .expect("the graph page answers")
            .text()
            .await
            .unwrap_or_default();
        let s: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if (all_up(&s) && into_prefill(&s) >= 5.0) || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(all_up(&stats), "not every replica is up: {stats:#}");
    assert!(into_prefill(&stats) >= 5.0, "{stats:#}");
    let machines: Vec<&str> = (stats["nodes"].as_array().into_iter().flatten())
        .flat_map(|n| n["replicas"].as_array().into_iter().flatten())
        .filter_map(|r| r["machine"].as_str())
        .collect();
    for m in ["cpu-0", "gpu-a", "gpu-b"] {
        assert!(machines.contains(&m), "{m} missing: {machines:?}");
    }
}
