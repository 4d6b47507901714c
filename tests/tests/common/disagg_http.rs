//! What the disaggregated-serving tests (disagg.rs, cuda_ipc.rs) share: the graph's workers
//! as instant mockers, a long question whose prompt spans several KV blocks, and the HTTP
//! calls they make. Included by path (`#[path = "common/disagg_http.rs"]`), apart from
//! `common/mod.rs`, so that each test binary compiles only helpers it uses.

use std::time::{Duration, Instant};

/// The graph's workers as instant mockers: these tests are about the plumbing.
pub const MOCKER_INSTANT: [&str; 4] = [
    "prefill.engine=mocker",
    "decode.engine=mocker",
    "prefill.speedup=inf",
    "decode.speedup=inf",
];

pub const LONG_QUESTION: &str = "Tell me everything about the history of Paris, the capital of France, from the Romans to today, in great detail please.";

/// Asks [`LONG_QUESTION`] for at most `max_tokens` tokens; the status and the JSON body.
pub async fn chat(
    client: &reqwest::Client,
    url: &str,
    max_tokens: u32,
) -> (u16, serde_json::Value) {
    let body = serde_json::json!({"model": "smollm2", "messages": [{"role": "user", "content": LONG_QUESTION}], "max_tokens": max_tokens});
    let r = dynamo_tests::post_chat(client, url, &body).await;
    let status = r.status().as_u16();
    let v = serde_json::from_slice(&r.bytes().await.unwrap_or_default())
        .unwrap_or(serde_json::Value::Null);
    (status, v)
}

/// The full 16-token blocks of an answer's prompt (at least two), after checking that the
/// decode worker found every one of them in its prefix cache: the blocks handed over.
pub fn handed_over_blocks(answer: &serde_json::Value) -> u64 {
    let prompt = answer["usage"]["prompt_tokens"].as_u64().expect("usage");
    let full_blocks = prompt / 16;
    assert!(full_blocks >= 2, "the prompt has {prompt} tokens");
    assert_eq!(
        answer["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(),
        Some(full_blocks * 16),
        "{answer}"
    );
    full_blocks
}

/// Wait (bounded) until `pred` holds for the metrics text.
pub async fn wait_metrics(
    client: &reqwest::Client,
    url: &str,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = dynamo_tests::metrics_text(client, url).await;
        if pred(&m) || Instant::now() > deadline {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
