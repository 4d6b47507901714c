//! KV-aware routing end to end (`graphs/agg_router.toml`: a `kv` router over four mocker
//! workers in their own processes, KV events flowing back over feedback edges): requests
//! that share a long prefix land on the worker that holds it, and the hit rate shows on
//! `/metrics`.

use std::collections::BTreeMap;
use std::time::Duration;

use dynamo_tests::{metrics_text as metrics, model_cached, workspace, Graph};

/// `metric{...replica="N"...} value` lines of one family, by replica.
fn by_replica(metrics: &str, family: &str) -> BTreeMap<String, f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter_map(|l| {
            let replica = l.split("replica=\"").nth(1)?.split('"').next()?.to_string();
            let value = l.rsplit(' ').next()?.parse().ok()?;
            Some((replica, value))
        })
        .collect()
}

fn total(metrics: &str, family: &str) -> f64 {
    by_replica(metrics, family).values().sum()
}

async fn complete(client: &reqwest::Client, url: &str, prompt: &str) {
    let body = serde_json::json!({"model": "smollm2", "prompt": prompt, "max_tokens": 2});
    let r = client
        .post(format!("{url}/v1/completions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("the server answers");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefixes_land_on_the_worker_that_holds_them() {
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh"
    );
    let g = Graph::up(
        &workspace().join("graphs/agg_router.toml"),
        &["worker.speedup=inf"],
    );
    let client = reqwest::Client::new();
    // Four documents of ~400 tokens, each asked about five times.
    let docs: Vec<String> = (0..4)
        .map(|d| {
            (0..200)
                .map(|w| format!("doc{d}word{w}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    for (d, doc) in docs.iter().enumerate() {
        complete(&client, &g.url, &format!("{doc} first question")).await;
        // Longer than the router's 2 s prediction window: from here on only the worker's
        // own KV events can tell the router where this prefix lives.
        tokio::time::sleep(Duration::from_millis(2_300)).await;
        let before = by_replica(
            &metrics(&client, &g.url).await,
            "dynamo_engine_prompt_tokens_total",
        );
        for q in 0..4 {
            complete(&client, &g.url, &format!("{doc} question number {q}")).await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await; // metrics refresh every 500 ms
        let after = by_replica(
            &metrics(&client, &g.url).await,
            "dynamo_engine_prompt_tokens_total",
        );
        let grew: Vec<&String> = after
            .iter()
            .filter(|(r, v)| before.get(*r).copied().unwrap_or(0.0) < **v)
            .map(|(r, _)| r)
            .collect();
        assert_eq!(
            grew.len(),
            1,
            "document {d}: follow-up requests went to several workers: {before:?} -> {after:?}"
        );
    }
    let m = metrics(&client, &g.url).await;
    let hit = total(&m, "dynamo_engine_prefix_hit_tokens_total")
        / total(&m, "dynamo_engine_prompt_tokens_total");
    assert!(hit > 0.6, "prefix hit rate {hit:.2} (engines)");
    let router_hit = total(&m, "dynamo_router_kv_hit_blocks_total")
        / total(&m, "dynamo_router_kv_prompt_blocks_total");
    assert!(router_hit > 0.6, "prefix hit rate {router_hit:.2} (router)");
    assert!(
        total(&m, "dynamo_router_kv_events_total") >= 4.0,
        "the router applied the workers' KV events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_is_forgotten_by_the_index_not_silently_trusted() {
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh"
    );
    let g = Graph::up(
        &workspace().join("graphs/agg_router.toml"),
        &["worker.speedup=inf"],
    );
    let client = reqwest::Client::new();
    let doc: String = (0..200)
        .map(|w| format!("restartword{w}"))
        .collect::<Vec<_>>()
        .join(" ");
    complete(&client, &g.url, &format!("{doc} first")).await;
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    complete(&client, &g.url, &format!("{doc} second")).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let m = metrics(&client, &g.url).await;
    assert!(
        total(&m, "dynamo_router_kv_hit_blocks_total") > 0.0,
        "the second request hit the cache"
    );
    // Find the worker that holds the document and kill it.
    let holder = by_replica(&m, "dynamo_engine_prompt_tokens_total")
        .into_iter()
        .find(|(_, v)| *v > 0.0)
        .map(|(r, _)| r)
        .expect("a worker served the document");
    let pid = g
        .process_pid(&format!("worker-{holder}"))
        .expect("its process");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    // Wait (bounded) until it is back and the router has its fresh, empty snapshot.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let back = g
            .process_pid(&format!("worker-{holder}"))
            .is_some_and(|p| p != pid);
        if back {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "worker-{holder} was not restarted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = total(
        &metrics(&client, &g.url).await,
        "dynamo_router_kv_hit_blocks_total",
    );
    complete(&client, &g.url, &format!("{doc} third")).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let after = total(
        &metrics(&client, &g.url).await,
        "dynamo_router_kv_hit_blocks_total",
    );
    assert_eq!(
        after - before,
        0.0,
        "the router still believed the restarted worker held the document"
    );
}

/// A Mooncake-format trace of `rows` requests in five prefix groups (request `i` in group
/// `i mod 5`), each prompt six shared 512-token blocks and one of its own, 100 ms apart.
/// Five groups over eight workers: round-robin sends each group's requests to a different
/// worker every time, KV routing back to the one that holds the group's prefix.
fn grouped_trace(rows: usize) -> String {
    (0..rows)
        .map(|i| {
            let group = (i % 5) as u64;
            let mut ids: Vec<u64> = (0..6).map(|k| 1000 * group + k).collect();
            ids.push(100_000 + i as u64);
            let row = serde_json::json!({
                "timestamp": i * 100,
                "input_length": 6 * 512 + 100,
                "output_length": 4,
                "hash_ids": ids,
            });
            format!("{row}\n")
        })
        .collect()
}

#[test]
fn bench_replay_compares_kv_routing_with_round_robin_round_by_round() {
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh"
    );
    let dir = std::env::temp_dir().join(format!("dynamo-replay-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let trace = dir.join("grouped.jsonl");
    std::fs::write(&trace, grouped_trace(40)).expect("the trace is written");
    let out = std::process::Command::new(dynamo_tests::dynamo_bin())
        .args(["bench", "replay"])
        .arg(&trace)
        .arg("--graph")
        .arg(workspace().join("graphs/kv_replay.toml"))
        .args([
            "--set",
            "worker.speedup=inf",
            "--baseline",
            "router.mode=round-robin",
        ])
        .args([
            "--rounds",
            "2",
            "--time-scale",
            "0.5",
            "--metrics-wait",
            "1.5",
        ])
        .args(["--timeout", "60", "--json"])
        .output()
        .expect("dynamo bench replay runs");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let c: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    let runs = c["runs"].as_array().cloned().unwrap_or_default();
    let order: Vec<(String, u64)> = (runs.iter())
        .map(|r| {
            (
                r["side"].as_str().unwrap_or("").to_string(),
                r["round"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let at = |side: &str, round: u64| (side.to_string(), round);
    assert_eq!(
        order,
        [
            at("candidate", 1),
            at("baseline", 1),
            at("baseline", 2),
            at("candidate", 2)
        ],
        "each round runs both sides, the order alternated"
    );
    let hit = |r: &serde_json::Value| {
        (r["report"]["kv"]["hit_rate"].as_f64()).unwrap_or_else(|| panic!("no KV hit rate: {r}"))
    };
    for r in &runs {
        assert_eq!(r["report"]["requests_ok"], 40, "{r}");
        assert_eq!(r["report"]["requests_failed"], 0, "{r}");
        // Each row of the 35 after its group's first reuses 6 of its 6.2 blocks: 84.7%.
        let ideal = r["report"]["ideal"]["token_rate"].as_f64().unwrap_or(0.0);
        assert!((ideal - 0.847).abs() < 0.01, "ideal {ideal}");
        if r["side"] == "candidate" {
            assert!(
                hit(r) > 0.8,
                "KV routing finds each group's worker: {}",
                hit(r)
            );
        } else {
            assert!(
                hit(r) < 0.05,
                "round-robin never returns to a group's worker: {}",
                hit(r)
            );
        }
    }
    let figure = |name: &str| {
        (c["figures"].as_array().into_iter().flatten())
            .find(|f| f["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("figure {name} in {c}"))
    };
    assert_eq!(c["rounds"], 2);
    let rate = figure("kv_hit_rate");
    let cand: Vec<f64> = (runs.iter())
        .filter(|r| r["side"] == "candidate")
        .map(hit)
        .collect();
    let mean = (cand[0] + cand[1]) / 2.0;
    assert!(
        (rate["candidate"].as_f64().unwrap_or(0.0) - mean).abs() < 1e-9,
        "{rate}"
    );
    assert!(rate["baseline"].as_f64().unwrap_or(1.0) < 0.05, "{rate}");
    assert_eq!(c["rounds_requested"], 2);
    assert!(c["error"].is_null(), "{}", c["error"]);
    // The TTFT gain of each round is that round's baseline p50 over its candidate p50.
    let p50 = |side: &str, round: u64| {
        (runs.iter())
            .find(|r| r["side"] == side && r["round"] == round)
            .and_then(|r| r["report"]["ttft_ms"]["p50"].as_f64())
            .unwrap_or(f64::NAN)
    };
    let ttft = figure("ttft_p50_ms");
    for round in [1u64, 2] {
        let want = p50("baseline", round) / p50("candidate", round);
        let got = ttft["gains"][round as usize - 1]
            .as_f64()
            .unwrap_or(f64::NAN);
        assert!((got - want).abs() < 1e-9, "round {round}: {got} vs {want}");
    }
}
