//! llama.cpp in process (`engine = "llamacpp"`) end to end: `graphs/llamacpp.toml`
//! (aggregated, KV-routed) and `graphs/llamacpp_disagg.toml` (prefill and decode in
//! separate processes) as shipped, asked through the official `openai` client. In the
//! disaggregated graph the prompt's KV leaves the prefill worker's llama.cpp cache as pool
//! blocks, crosses to the decode process and is loaded into its llama.cpp cache; the
//! greedy answer is the aggregated one, also after requests cancelled in the middle of
//! their prefill and hand-off. The test binary is built with the `llamacpp` feature
//! (scripts/test.sh).

mod common;

use common::{ask, cancel_midway, metrics, need_model, sum};
use dynamo_tests::{workspace, Graph};

#[test]
fn aggregated_and_disaggregated_llamacpp_graphs_answer_alike() {
    need_model();
    let agg = Graph::up(&workspace().join("graphs/llamacpp.toml"), &[]);
    let aggregated = ask(&agg);
    drop(agg);

    let disagg = Graph::up(&workspace().join("graphs/llamacpp_disagg.toml"), &[]);
    let disaggregated = ask(&disagg);
    assert_eq!(
        aggregated, disaggregated,
        "greedy answers differ between the aggregated and the disaggregated llama.cpp graph"
    );
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    for ms in [150, 400, 900] {
        runtime.block_on(cancel_midway(
            &disagg.url,
            std::time::Duration::from_millis(ms),
        ));
    }
    assert_eq!(
        aggregated,
        ask(&disagg),
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
    // llama.cpp's f16 keys and values of 30 layers × 3 heads × 64 dims × 16 positions.
    assert_eq!(
        sent as u64 % (30 * 2 * 3 * 64 * 2 * 16),
        0,
        "not whole blocks: {sent}"
    );
}
