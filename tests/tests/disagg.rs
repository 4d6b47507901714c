//! Disaggregated serving end to end (`graphs/disagg.toml` with its workers switched to
//! the mocker, prefill and decode in their own processes): the KV blocks cross the process boundary, the answer
//! streams back, cancelled requests free blocks on both sides, and a dead prefill worker
//! makes requests fall back to the decode worker — or fail clearly when enforced.

use std::time::Duration;

use dynamo_tests::{disagg_over_tcp, metric_sum as sum, model_cached, workspace, Graph};
use futures::StreamExt;

#[path = "common/disagg_http.rs"]
mod disagg_http;
use disagg_http::{chat, handed_over_blocks, wait_metrics, LONG_QUESTION, MOCKER_INSTANT};

fn graph() -> std::path::PathBuf {
    workspace().join("graphs/disagg.toml")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_blocks_cross_processes_and_the_answer_streams_back() {
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh"
    );
    let g = Graph::up(&graph(), &MOCKER_INSTANT);
    let client = reqwest::Client::new();
    let (status, v) = chat(&client, &g.url, 8).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 8);
    // The decode worker found the handed-over blocks in its prefix cache.
    let full_blocks = handed_over_blocks(&v);
    // Streaming works the same way.
    let body = serde_json::json!({"model": "smollm2", "messages": [{"role": "user", "content": "Another question entirely, about rivers."}], "max_tokens": 6, "stream": true, "ignore_eos": true});
    let text = client
        .post(format!("{}/v1/chat/completions", g.url))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("stream")
        .text()
        .await
        .unwrap_or_default();
    assert_eq!(text.matches("data: {").count(), 6, "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"));
    // Engine counters come from the worker processes, refreshed every 500 ms.
    let m = wait_metrics(&client, &g.url, |m| {
        sum(
            m,
            "dynamo_router_disagg_requests_total",
            &["path=\"prefill\""],
        ) >= 2.0
            && sum(
                m,
                "dynamo_engine_kv_transfer_bytes_total",
                &["node=\"decode\"", "direction=\"received\""],
            ) > 0.0
            && sum(
                m,
                "dynamo_engine_kv_transfer_bytes_total",
                &["node=\"decode\"", "direction=\"received\""],
            ) == sum(
                m,
                "dynamo_engine_kv_transfer_bytes_total",
                &["node=\"prefill\"", "direction=\"sent\""],
            )
    })
    .await;
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
    // SmolLM2's KV: 30 layers x 2 x 3 heads x 64 dims x 2 bytes x 16 tokens per block.
    let block_bytes = 30.0 * 2.0 * 3.0 * 64.0 * 2.0 * 16.0;
    assert!(
        sent >= (full_blocks as f64) * block_bytes,
        "prefill sent {sent} bytes"
    );
    assert_eq!(
        sent, received,
        "every byte sent by prefill was received by decode"
    );
    assert_eq!(
        sum(
            &m,
            "dynamo_router_disagg_requests_total",
            &["path=\"prefill\""]
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_frees_blocks_on_both_sides() {
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh"
    );
    // Real-time decode, so a long answer is still streaming when the client leaves.
    let g = Graph::up(
        &graph(),
        &[
            "prefill.engine=mocker",
            "decode.engine=mocker",
            "prefill.speedup=inf",
            "decode.speedup=1.0",
        ],
    );
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let body = serde_json::json!({"model": "smollm2", "messages": [{"role": "user", "content": LONG_QUESTION}], "max_tokens": 3000, "stream": true, "ignore_eos": true});
        let r = client
            .post(format!("{}/v1/chat/completions", g.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("stream starts");
        assert_eq!(r.status(), 200);
        let mut s = r.bytes_stream();
        let first = tokio::time::timeout(Duration::from_secs(10), s.next()).await;
        assert!(matches!(first, Ok(Some(Ok(_)))), "no first chunk");
        drop(s);
    }
    let m = wait_metrics(&client, &g.url, |m| {
        sum(m, "dynamo_engine_kv_blocks", &["state=\"active\""]) == 0.0
            && sum(
                m,
                "dynamo_engine_kv_transfer_blocks_total",
                &["direction=\"received\""],
            ) > 0.0
    })
    .await;
    assert_eq!(
        sum(
            &m,
            "dynamo_engine_kv_blocks",
            &["node=\"decode\"", "state=\"active\""]
        ),
        0.0,
        "decode leaked blocks"
    );
    assert_eq!(
        sum(
            &m,
            "dynamo_engine_kv_blocks",
            &["node=\"prefill\"", "state=\"active\""]
        ),
        0.0,
        "prefill leaked blocks"
    );
    assert!(
        sum(
            &m,
            "dynamo_engine_kv_transfer_blocks_total",
            &["node=\"decode\"", "direction=\"received\""]
        ) > 0.0
    );
}

/// Kill the prefill worker and send requests until one is answered without it.
async fn after_killing_prefill(
    g: &Graph,
    client: &reqwest::Client,
) -> Vec<(u16, serde_json::Value)> {
    let pid = g
        .process_pid("prefill-0")
        .expect("the prefill process runs");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(chat(client, &g.url, 4).await);
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_prefill_worker_means_fallback_or_a_clear_error_when_enforced() {
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh"
    );
    let client = reqwest::Client::new();
    {
        let g = Graph::up(&graph(), &MOCKER_INSTANT);
        assert_eq!(chat(&client, &g.url, 4).await.0, 200);
        let answers = after_killing_prefill(&g, &client).await;
        assert!(
            answers.iter().all(|(s, _)| *s == 200),
            "fallback must serve every request: {answers:?}"
        );
        let m = wait_metrics(&client, &g.url, |m| {
            sum(
                m,
                "dynamo_router_disagg_requests_total",
                &["path=\"fallback\""],
            ) >= 1.0
        })
        .await;
        assert!(
            sum(
                &m,
                "dynamo_router_disagg_requests_total",
                &["path=\"fallback\""]
            ) >= 1.0,
            "no request fell back"
        );
    }
    {
        let g = Graph::up(
            &graph(),
            &[
                "prefill.engine=mocker",
                "decode.engine=mocker",
                "prefill.speedup=inf",
                "decode.speedup=inf",
                "router.enforce_disagg=true",
            ],
        );
        assert_eq!(chat(&client, &g.url, 4).await.0, 200);
        let answers = after_killing_prefill(&g, &client).await;
        let refused: Vec<_> = answers.iter().filter(|(s, _)| *s == 503).collect();
        assert!(!refused.is_empty(), "with enforce_disagg a request must be refused while no prefill worker lives: {answers:?}");
        let msg = refused[0].1["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            msg.contains("prefill"),
            "the error names the missing prefill worker: {msg}"
        );
        assert!(
            answers.iter().all(|(s, _)| *s == 200 || *s == 503),
            "{answers:?}"
        );
    }
}

/// The same graph with `transport = "tcp"` asked for on the KV edge: on one machine
/// without etcd the decode worker's listener address goes through the run directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_blocks_go_over_tcp_when_the_file_asks_for_it() {
    assert!(
        model_cached(),
        "the model is not cached: run scripts/setup-tests.sh"
    );
    let file = disagg_over_tcp("disagg");
    let g = Graph::up(&file, &MOCKER_INSTANT);
    let client = reqwest::Client::new();
    for max_tokens in [5, 9] {
        let (status, v) = chat(&client, &g.url, max_tokens).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], max_tokens, "{v}");
    }
    let m = wait_metrics(&client, &g.url, |m| {
        sum(
            m,
            "dynamo_engine_kv_transfer_bytes_total",
            &["node=\"decode\"", "direction=\"received\""],
        ) > 0.0
    })
    .await;
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
    assert!(received > 0.0, "no KV bytes reached decode");
    assert_eq!(sent, received);
    // The hand-off's messages went over the tcp link, not the socket.
    assert!(
        sum(
            &m,
            "dynamo_edge_messages_total",
            &[
                "from=\"prefill.kv\"",
                "transport=\"tcp\"",
                "direction=\"request\""
            ],
        ) >= 2.0,
        "{}",
        m.lines()
            .filter(|l| l.contains("prefill.kv"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(g);
    let _ = std::fs::remove_file(file);
}
