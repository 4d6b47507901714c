//! llama.cpp in process (`engine = "llamacpp"`) end to end: `graphs/llamacpp.toml`
//! (aggregated, KV-routed) and `graphs/llamacpp_disagg.toml` (prefill and decode in
//! separate processes) as shipped, asked through the official `openai` client. In the
//! disaggregated graph the prompt's KV leaves the prefill worker's llama.cpp cache as pool
//! blocks of its shared pool, which the decode process copies from (the plan picks `shm`
//! for the kv edge) and loads into its llama.cpp cache; no /dev/shm file remains; the
//! greedy answer is the aggregated one, also after requests cancelled in the middle of
//! their prefill and hand-off. The test binary is built with the `llamacpp` feature
//! (scripts/test.sh).

mod common;

use common::{ask, check_hand_offs, dev_shm, need_model};
use dynamo_tests::{workspace, Graph};

#[test]
fn aggregated_and_disaggregated_llamacpp_graphs_answer_alike() {
    need_model();
    let shm_before = dev_shm();
    let agg = Graph::up(&workspace().join("graphs/llamacpp.toml"), &[]);
    let aggregated = ask(&agg);
    drop(agg);

    let disagg = Graph::up(&workspace().join("graphs/llamacpp_disagg.toml"), &[]);
    let disaggregated = ask(&disagg);
    assert_eq!(
        aggregated, disaggregated,
        "greedy answers differ between the aggregated and the disaggregated llama.cpp graph"
    );
    // The hand-off went through shared memory: the decode process maps the prefill
    // worker's pool besides its own (two memfd segments, told apart by inode).
    let decode = disagg.process_pid("decode-0").expect("the decode process");
    let maps = std::fs::read_to_string(format!("/proc/{decode}/maps")).unwrap_or_default();
    let pools: std::collections::BTreeSet<&str> = maps
        .lines()
        .filter(|l| l.contains("memfd:dynamo-kv-pool"))
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect();
    assert!(
        pools.len() >= 2,
        "the decode process maps {} KV pool(s), not the prefill worker's:\n{maps}",
        pools.len()
    );
    check_hand_offs(&disagg, &aggregated);
    drop(disagg);
    assert_eq!(dev_shm(), shm_before, "the graph left files in /dev/shm");
}
