//! `dynamo graph up --nats URL` against a real `nats-server` (started here on free loopback
//! ports; scripts/setup-tests.sh installs it): `graphs/nats.toml` puts the router → worker
//! requests and the workers' KV events on NATS. Chat completions stream end to end; when
//! NATS dies, requests in flight and new ones fail with a clear error within a bound (no
//! hang), and they succeed again once NATS is back on the same port.

use std::time::{Duration, Instant};

use dynamo_tests::{model_cached, post_chat as post, workspace, Graph, NatsServer};
use futures::StreamExt;
use serde_json::{json, Value};

fn up(nats: &NatsServer, sets: &[&str]) -> Graph {
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh"
    );
    let url = nats.url();
    Graph::up_with(
        &workspace().join("graphs/nats.toml"),
        sets,
        &["--nats", url.as_str()],
    )
}

fn chat(prompt: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

/// The content deltas of an SSE body, and whether it ended with `[DONE]`.
fn deltas(sse: &str) -> (Vec<String>, bool) {
    let mut out = Vec::new();
    let mut done = false;
    for data in sse.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        if let Ok(v) = serde_json::from_str::<Value>(data) {
            if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
                out.push(c.to_string());
            }
        }
    }
    (out, done)
}

async fn get_text(client: &reqwest::Client, url: &str) -> String {
    match client.get(url).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The sum of a metric family's samples in the frontend's `/metrics`.
async fn metric(client: &reqwest::Client, url: &str, family: &str) -> f64 {
    get_text(client, &format!("{url}/metrics"))
        .await
        .lines()
        .filter(|l| l.starts_with(family) && !l.starts_with('#'))
        .filter(|l| l[family.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `metric` until it is above `min`, for at most `within`.
async fn wait_metric(client: &reqwest::Client, url: &str, family: &str, min: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric(client, url, family).await;
        if v > min || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_end_to_end_with_requests_and_kv_events_on_nats() {
    let nats = NatsServer::start();
    let g = up(&nats, &["worker.speedup=inf"]);
    let client = reqwest::Client::new();

    let r = post(&client, &g.url, &chat("Say hello over NATS", 8, true)).await;
    assert_eq!(r.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(30), r.text())
        .await
        .expect("the stream ends within 30 s")
        .expect("a body");
    let (parts, done) = deltas(&body);
    assert!(done, "the stream ends with [DONE]: {body}");
    assert!(parts.len() >= 2, "several content deltas: {body}");

    // The graph's processes are NATS clients, and messages went through the server.
    let varz: Value =
        serde_json::from_str(&get_text(&client, &format!("{}/varz", nats.monitor_url())).await)
            .expect("varz is JSON");
    assert!(
        varz["connections"].as_u64().unwrap_or(0) >= 3,
        "the pipeline and both workers are connected: {varz}"
    );
    assert!(
        varz["in_msgs"].as_u64().unwrap_or(0) > 0,
        "messages went through NATS: {varz}"
    );

    // KV events reach the router over NATS, and it routes a repeated prefix by them.
    let events = wait_metric(&client, &g.url, "dynamo_router_kv_events_total", 0.0).await;
    assert!(events > 0.0, "the router applied KV events sent over NATS");
    let doc: String = (0..200)
        .map(|w| format!("natsword{w}"))
        .collect::<Vec<_>>()
        .join(" ");
    let first = post(&client, &g.url, &chat(&format!("{doc} first"), 2, false)).await;
    assert_eq!(first.status(), 200);
    // Longer than the router's 2 s prediction window: only the events tell it now.
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let second = post(&client, &g.url, &chat(&format!("{doc} second"), 2, false)).await;
    assert_eq!(second.status(), 200);
    let hits = wait_metric(&client, &g.url, "dynamo_router_kv_hit_blocks_total", 0.0).await;
    assert!(hits > 0.0, "the repeated prefix hit the router's index");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_fails_requests_clearly_and_they_work_again_after_it() {
    let mut nats = NatsServer::start();
    // Mocker at real speed (a few ms a token), so a long answer is still streaming when
    // NATS goes away.
    let g = up(&nats, &["worker.speedup=1"]);
    let client = reqwest::Client::new();

    // In flight: a long streaming answer, NATS killed after its first tokens.
    let r = post(&client, &g.url, &chat("Tell me a long story", 4000, true)).await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut sse = String::new();
    let mut killed: Option<Instant> = None;
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            sse.push_str(&String::from_utf8_lossy(&chunk));
            if killed.is_none() && deltas(&sse).0.len() >= 5 {
                nats.stop();
                killed = Some(Instant::now());
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream hung after NATS died: {sse}");
    let killed = killed.expect("tokens streamed before NATS was killed");
    let took = killed.elapsed();
    let (_, done) = deltas(&sse);
    assert!(!done, "the story cannot finish without NATS: {sse}");
    let error = sse
        .split("event: error\n")
        .nth(1)
        .unwrap_or_else(|| panic!("the stream ends with an error event: {sse}"));
    assert!(
        error.contains("NATS"),
        "the error says NATS is the trouble: {error}"
    );
    assert!(
        took < Duration::from_secs(20),
        "the in-flight stream failed {took:?} after NATS died"
    );

    // New requests while NATS is down: a clear 503, within a bound.
    let t = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(40),
        post(&client, &g.url, &chat("Are you there?", 4, false)),
    )
    .await
    .expect("a new request fails within 40 s, not hangs");
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("NATS"), "the error names NATS: {text}");
    eprintln!(
        "while NATS is down, a new request failed after {:?}: {text}",
        t.elapsed()
    );

    // NATS back on the same port: requests succeed again, without restarting anything.
    nats.start_again();
    let back = Instant::now();
    let mut last = String::new();
    while back.elapsed() < Duration::from_secs(30) {
        let r = post(&client, &g.url, &chat("Hello again", 4, true)).await;
        let status = r.status();
        last = r.text().await.unwrap_or_default();
        if status == 200 && deltas(&last).1 {
            eprintln!(
                "requests work again {:?} after NATS restarted",
                back.elapsed()
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("requests never succeeded after NATS restarted; last answer: {last}");
}
