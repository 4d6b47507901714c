//! Helpers of the tests that serve the real model through a graph (native.rs,
//! llamacpp.rs): ask it through the `openai` client, read its metrics, cancel midway.

use std::process::Command;

use dynamo_tests::{model_cached, python, workspace, Graph};

pub fn need_model() {
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh (scripts/test.sh does)"
    );
}

/// Runs tests/python/native_answers.py against `g`; returns its `ANSWER:` line.
pub fn ask(g: &Graph) -> String {
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
pub fn sum(metrics: &str, family: &str, with: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(family) && with.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn metrics(client: &reqwest::Client, url: &str) -> String {
    // Engine figures reach the frontend's /metrics within one poll (500 ms).
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    dynamo_tests::metrics_text(client, url).await
}

/// Starts a streamed completion with a long prompt and drops it after `after`: the
/// request is cancelled while its prompt is prefilled or its KV handed over.
pub async fn cancel_midway(url: &str, after: std::time::Duration) {
    let prompt = "Tell me everything about the history of Paris. ".repeat(60);
    let body = serde_json::json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 64,
        "stream": true,
    });
    let call = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send();
    // Dropping the future (or the response) closes the connection: the frontend cancels.
    let _ = tokio::time::timeout(after, async {
        if let Ok(resp) = call.await {
            let mut chunks = resp.bytes_stream();
            while futures::StreamExt::next(&mut chunks).await.is_some() {}
        }
    })
    .await;
}

/// The names in /dev/shm, sorted (a graph must leave none of its own behind).
pub fn dev_shm() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// What a disaggregated graph that answered `aggregated` must still do: answer the same
/// after requests cancelled at several points of their prefill and hand-off, and have
/// handed over whole blocks (f16 keys and values of SmolLM2's 30 layers × 3 heads × 64
/// dims × 16 positions), as many bytes received as sent.
pub fn check_hand_offs(disagg: &Graph, aggregated: &str) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    for ms in [150, 400, 900] {
        runtime.block_on(cancel_midway(
            &disagg.url,
            std::time::Duration::from_millis(ms),
        ));
    }
    assert_eq!(
        aggregated,
        ask(disagg),
        "the disaggregated answer changed after cancelled requests"
    );
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
    assert_eq!(
        sent as u64 % (30 * 2 * 3 * 64 * 2 * 16),
        0,
        "not whole blocks: {sent}"
    );
}
