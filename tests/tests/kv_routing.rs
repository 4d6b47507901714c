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
