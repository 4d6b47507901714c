//! The native engine end to end: `graphs/agg.toml` and `graphs/disagg.toml` as shipped
//! (SmolLM2 computed in Rust), asked through the official `openai` client; in the
//! disaggregated graph the prompt's KV blocks cross from the prefill process to the decode
//! process (through shared memory: the plan picks `shm` for the kv edge) and the greedy
//! answer is the aggregated one, also after a request cancelled in the middle of its
//! prefill and hand-off; no shared-memory file is left behind; a repeated long prefix is
//! served from the prefix cache. The same disaggregated graph with `transport = "tcp"`
//! asked for on the KV edge (as between machines: bulk calls written straight from the
//! prefill worker's pinned pool blocks) answers alike too.

use std::time::Instant;

mod common;

use common::{ask, check_hand_offs, dev_shm, metrics, need_model, sum};
use dynamo_tests::{disagg_over_tcp, workspace, Graph};

/// The transports the plan of `graphs/disagg.toml` gives the `prefill.kv -> decode.kv` links.
fn kv_transports() -> Vec<&'static str> {
    let path = workspace().join("graphs/disagg.toml");
    let text = std::fs::read_to_string(&path).expect("graphs/disagg.toml");
    let checked = dynamo_graph::check(
        dynamo_graph::SourceFile::new("disagg.toml", text),
        &dynamo_graph::Environment::default(),
    );
    let plan = checked.plan.expect("disagg.toml is valid");
    plan.edges
        .iter()
        .filter(|e| e.from.port == "kv")
        .flat_map(|e| e.links.iter().map(|l| l.transport.as_str()))
        .collect()
}

#[test]
fn aggregated_and_disaggregated_native_graphs_answer_paris_alike() {
    need_model();
    assert_eq!(
        kv_transports(),
        ["shm"],
        "the plan does not hand KV over shared memory"
    );
    let shm_before = dev_shm();
    let agg = Graph::up(&workspace().join("graphs/agg.toml"), &[]);
    let aggregated = ask(&agg);
    drop(agg);

    let disagg = Graph::up(&workspace().join("graphs/disagg.toml"), &[]);
    let disaggregated = ask(&disagg);
    assert_eq!(
        aggregated, disaggregated,
        "greedy answers differ between the aggregated and the disaggregated graph"
    );
    check_hand_offs(&disagg, &aggregated);
    drop(disagg);
    assert_eq!(dev_shm(), shm_before, "the graph left files in /dev/shm");

    let file = disagg_over_tcp("native");
    let tcp = Graph::up(&file, &[]);
    assert_eq!(
        aggregated,
        ask(&tcp),
        "greedy answers differ between the aggregated graph and KV over tcp"
    );
    check_hand_offs(&tcp, &aggregated);
    let m = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(metrics(&reqwest::Client::new(), &tcp.url));
    let over_tcp = sum(
        &m,
        "dynamo_edge_messages_total",
        &[
            "from=\"prefill.kv\"",
            "transport=\"tcp\"",
            "direction=\"request\"",
        ],
    );
    assert!(over_tcp >= 2.0, "no KV chunk went over the tcp link:\n{m}");
    drop(tcp);
    let _ = std::fs::remove_file(file);
    assert_eq!(dev_shm(), shm_before, "the graph left files in /dev/shm");
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
