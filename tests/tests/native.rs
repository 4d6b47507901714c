//! The native engine end to end: `graphs/agg.toml` and `graphs/disagg.toml` as shipped
//! (SmolLM2 computed in Rust), asked through the official `openai` client; in the
//! disaggregated graph the prompt's KV blocks cross from the prefill process to the decode
//! process and the greedy answer is the aggregated one; a repeated long prefix is served
//! from the prefix cache.

use std::process::Command;
use std::time::Instant;

use dynamo_tests::{model_cached, python, workspace, Graph};

fn need_model() {
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh (scripts/test.sh does)"
    );
}

/// Runs tests/python/native_answers.py against `g`; returns its `ANSWER:` line.
fn ask(g: &Graph) -> String {
    let out = Command::new(python())
        .arg(workspace().join("tests/python/native_answers.py"))
        .arg(&g.url)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("4 passed, 0 failed"),
        "openai client checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("ANSWER: "))
        .unwrap_or_default()
        .to_string()
}

/// Sum of a family's samples whose labels contain every one of `with`.
fn sum(metrics: &str, family: &str, with: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(family) && with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metrics(client: &reqwest::Client, url: &str) -> String {
    // Engine figures reach the frontend's /metrics within one poll (500 ms).
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics text")
}

#[test]
fn aggregated_and_disaggregated_native_graphs_answer_paris_alike() {
    need_model();
    let agg = Graph::up(&workspace().join("graphs/agg.toml"), &[]);
    let aggregated = ask(&agg);
    drop(agg);

    let disagg = Graph::up(&workspace().join("graphs/disagg.toml"), &[]);
    let disaggregated = ask(&disagg);
    assert_eq!(
        aggregated, disaggregated,
        "greedy answers differ between the aggregated and the disaggregated graph"
    );
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let m = runtime.block_on(metrics(&reqwest::Client::new(), &disagg.url));
    let sent = sum(
        &m,
        "dynamo_engine_kv_transfer_bytes_total",
        &["node=\"prefill\"", "direction=\"sent\""],
    );
    let received = sum(
        &m,
        "dynamo_engine_kv_transfer_bytes_total",
        &["node=\"decode\"", "direction=\"received\""],
    );
    assert!(sent > 0.0, "the prefill worker sent no KV bytes:\n{m}");
    assert_eq!(sent, received, "KV bytes sent and received differ:\n{m}");
    // The blocks are f16 keys and values of 30 layers × 3 heads × 64 dims × 16 positions.
    assert_eq!(
        sent as u64 % (30 * 2 * 3 * 64 * 2 * 16),
        0,
        "not whole blocks: {sent}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_long_prefix_is_served_from_the_prefix_cache() {
    need_model();
    let g = Graph::up(&workspace().join("graphs/agg.toml"), &[]);
    let client = reqwest::Client::new();
    let long = "Summarise the following notes. ".to_string()
        + &(0..40)
            .map(|i| format!("Note {i}: the meeting moved to room {}. ", 100 + i))
            .collect::<String>();
    let body = serde_json::json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": long}],
        "max_tokens": 1,
        "temperature": 0,
    });
    let mut cached = Vec::new();
    let mut times = Vec::new();
    for _ in 0..2 {
        let started = Instant::now();
        let r: serde_json::Value = client
            .post(format!("{}/v1/chat/completions", g.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("answer")
            .bytes()
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        times.push(started.elapsed());
        let prompt = r["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
        assert!(prompt > 400, "the prompt should be long: {r}");
        cached.push(
            r["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0),
        );
    }
    eprintln!(
        "time to the one token: first {:?}, repeated {:?}",
        times[0], times[1]
    );
    assert_eq!(
        cached[0], 0,
        "nothing can be cached before the first request"
    );
    assert!(
        cached[1] >= 400,
        "the repeated prompt found only {} cached tokens",
        cached[1]
    );
    let m = metrics(&client, &g.url).await;
    let hits = sum(
        &m,
        "dynamo_engine_prefix_hit_tokens_total",
        &["node=\"worker\""],
    );
    assert_eq!(hits as u64, cached[1], "the prefix hits on /metrics:\n{m}");
}
