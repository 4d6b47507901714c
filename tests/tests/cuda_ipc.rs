//! CUDA IPC end to end: `graphs/disagg.toml` with mocker prefill and decode workers that
//! keep their KV cache on a GPU each (`device = "cuda"`, `gpus = 1`) and the KV edge on
//! `transport = "cuda-ipc"`. The decode worker opens the prefill worker's GPU pool by its
//! IPC handle, copies each hand-off's blocks device to device and checks every byte
//! against the blocks' hashes before caching them.
//!
//! Needs two GPUs (one per worker); skipped with a notice on stderr otherwise.

use std::io::Write;

use dynamo_runtime::kv_transfer::cuda;
use dynamo_tests::{metric_sum as sum, model_cached, workspace, Graph};

#[path = "common/disagg_http.rs"]
mod disagg_http;
use disagg_http::{chat, handed_over_blocks, wait_metrics, MOCKER_INSTANT};

/// The GPUs this test may use, or `None` after a notice that shows in every run's output
/// (written past the test harness's capture).
fn two_gpus_or_skip() -> Option<usize> {
    let why = match cuda::device_count() {
        Ok(n) if n >= 2 => return Some(n),
        Ok(n) => format!("the CUDA driver sees {n} GPU(s)"),
        Err(e) => e.to_string(),
    };
    let notice = format!("\nSKIPPED cuda_ipc end-to-end test: needs two GPUs ({why})\n");
    let _ = std::io::stderr().write_all(notice.as_bytes());
    None
}

/// `graphs/disagg.toml` with both workers' KV on a GPU and the KV edge on CUDA IPC.
fn graph_file() -> std::path::PathBuf {
    let text = std::fs::read_to_string(workspace().join("graphs/disagg.toml")).expect("graph");
    let mut out = String::new();
    for line in text.lines() {
        out.push_str(line);
        out.push('\n');
        if line == "[nodes.prefill]" || line == "[nodes.decode]" {
            out.push_str("device = \"cuda\"\ngpus = 1\n");
        }
        if line == "to = \"decode.kv\"" {
            out.push_str("transport = \"cuda-ipc\"\n");
        }
    }
    assert_eq!(
        out.matches("device = \"cuda\"").count(),
        2,
        "graphs/disagg.toml changed its worker sections"
    );
    assert!(out.contains("transport = \"cuda-ipc\""), "no KV edge found");
    let file = std::env::temp_dir().join(format!("dynamo-cuda-ipc-{}.toml", std::process::id()));
    std::fs::write(&file, out).expect("write graph");
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_blocks_cross_between_gpu_pools_by_cuda_ipc() {
    if two_gpus_or_skip().is_none() {
        return;
    }
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh"
    );
    let file = graph_file();
    let g = Graph::up(&file, &MOCKER_INSTANT);
    let _ = std::fs::remove_file(&file);
    let client = reqwest::Client::new();
    let (status, v) = chat(&client, &g.url, 8).await;
    assert_eq!(status, 200, "{v}");
    // The decode worker found the blocks it copied (and checked) in its prefix cache.
    let full_blocks = handed_over_blocks(&v);
    // The chunks went over the CUDA IPC link, and every byte sent was received.
    let bytes = "dynamo_engine_kv_transfer_bytes_total";
    let sent = |m: &str| sum(m, bytes, &["node=\"prefill\"", "direction=\"sent\""]);
    let received = |m: &str| sum(m, bytes, &["node=\"decode\"", "direction=\"received\""]);
    let chunks = |m: &str| sum(m, "dynamo_edge_messages_total", &["transport=\"cuda-ipc\""]);
    let m = wait_metrics(&client, &g.url, |m| {
        sent(m) > 0.0 && sent(m) == received(m) && chunks(m) > 0.0
    })
    .await;
    let (sent, received, chunks) = (sent(&m), received(&m), chunks(&m));
    let block_bytes = 30.0 * 2.0 * 3.0 * 64.0 * 2.0 * 16.0;
    assert!(
        sent >= full_blocks as f64 * block_bytes,
        "prefill sent {sent} bytes"
    );
    assert_eq!(sent, received, "decode received other than prefill sent");
    assert!(chunks > 0.0, "no message crossed a cuda-ipc link");
}
