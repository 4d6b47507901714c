//! Seeing a graph work: per-edge metrics on the graph's `/metrics`, the live graph page
//! in a real headless Chromium, and `dynamo graph top --once`, all against
//! `graphs/disagg.toml` with mocker engines (prefill and decode in their own processes).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dynamo_tests::{dynamo_bin, model_cached, system_binary, workspace, Graph};

const MOCKER: [&str; 2] = ["prefill.engine=mocker", "decode.engine=mocker"];

fn graph() -> PathBuf {
    workspace().join("graphs/disagg.toml")
}

async fn chat(client: &reqwest::Client, url: &str, max_tokens: u32) -> u16 {
    let body = serde_json::json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Tell me about Paris, the capital of France, in some detail please."}],
        "max_tokens": max_tokens,
    });
    let r = dynamo_tests::post_chat(client, url, &body).await;
    let status = r.status().as_u16();
    let _ = r.bytes().await;
    status
}

async fn get_text(url: &str) -> String {
    reqwest::get(url)
        .await
        .expect("answers")
        .text()
        .await
        .expect("a text body")
}

/// The graph as the admin server describes it: `(from, to, kind)` of every edge, and
/// every node name.
async fn plan_of(admin: &str) -> (Vec<(String, String, String)>, Vec<String>) {
    let v: serde_json::Value =
        serde_json::from_str(&get_text(&format!("http://{admin}/api/graph")).await)
            .expect("/api/graph is JSON");
    let edges = v["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (s("from"), s("to"), s("kind"))
        })
        .collect();
    let nodes = v["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["name"].as_str().unwrap_or_default().to_string())
        .collect();
    (edges, nodes)
}

/// Sums a sample over every series matching `name` and the `want` labels.
fn metric(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((head, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, labels) = head.split_once('{').unwrap_or((head, ""));
        if n != name {
            continue;
        }
        if want
            .iter()
            .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
        {
            let v: f64 = value.parse().unwrap_or(f64::NAN);
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_edge_is_metered_on_the_graph_metrics() {
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh"
    );
    let g = Graph::up(&graph(), &MOCKER);
    let admin = g.admin.clone().expect("graph up serves an admin server");
    let client = reqwest::Client::new();
    const N: u32 = 3;
    for _ in 0..N {
        assert_eq!(chat(&client, &g.url, 8).await, 200);
    }
    let (edges, _) = plan_of(&admin).await;
    let calls: Vec<_> = edges.iter().filter(|e| e.2 == "call").collect();
    assert!(calls.len() >= 5, "{edges:?}");
    // Peers' samples reach the frontend's process every 500 ms.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = get_text(&format!("{}/metrics", g.url)).await;
        let all_in = calls.iter().all(|(from, to, _)| {
            metric(
                &text,
                "dynamo_edge_request_duration_seconds_count",
                &[("from", from), ("to", to)],
            )
            .unwrap_or(0.0)
                >= f64::from(N)
        });
        if all_in || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for family in [
        "# TYPE dynamo_edge_messages counter",
        "# TYPE dynamo_edge_bytes counter",
        "# TYPE dynamo_edge_errors counter",
        "# TYPE dynamo_edge_inflight_requests gauge",
        "# TYPE dynamo_edge_request_duration_seconds histogram",
        "# TYPE dynamo_edge_first_response_seconds histogram",
    ] {
        assert!(text.contains(family), "no `{family}` on /metrics:\n{text}");
    }
    let edge_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("dynamo_edge_"))
        .collect();
    let listing = edge_lines.join("\n");
    for (from, to, _) in &calls {
        let l = [("from", from.as_str()), ("to", to.as_str())];
        let with = |dir: &'static str| [l[0], l[1], ("direction", dir)];
        let requests = metric(&text, "dynamo_edge_messages_total", &with("request"))
            .unwrap_or_else(|| panic!("no request count for {from} -> {to}:\n{listing}"));
        let responses =
            metric(&text, "dynamo_edge_messages_total", &with("response")).unwrap_or(0.0);
        let errors = metric(&text, "dynamo_edge_errors_total", &l).unwrap_or(f64::NAN);
        let ended = metric(&text, "dynamo_edge_request_duration_seconds_count", &l).unwrap_or(0.0);
        // The KV hand-off may take several chunks per request; every other edge one call.
        if from == "prefill.kv" {
            assert!(
                requests >= f64::from(N),
                "{from} -> {to}: {requests}\n{listing}"
            );
        } else {
            assert_eq!(requests, f64::from(N), "{from} -> {to}\n{listing}");
        }
        assert!(
            responses >= requests,
            "{from} -> {to}: {responses} responses\n{listing}"
        );
        assert_eq!(errors, 0.0, "{from} -> {to}\n{listing}");
        assert_eq!(
            ended, requests,
            "every call ended: {from} -> {to}\n{listing}"
        );
        // Every transport but in-process serialises (the mocker's KV bytes travel inside
        // the messages on its `shm` edge: it has no shared pool).
        let serialised = text.lines().any(|t| {
            t.contains(&format!("from=\"{from}\",to=\"{to}\",transport="))
                && !t.contains("transport=\"in-process\"")
        });
        let bytes = metric(&text, "dynamo_edge_bytes_total", &with("request"));
        if serialised {
            assert!(
                bytes.unwrap_or(0.0) > 0.0,
                "no bytes on {from} -> {to}:\n{listing}"
            );
        } else {
            assert!(
                bytes.is_none(),
                "bytes on an in-process edge {from} -> {to}:\n{listing}"
            );
        }
    }
    // The KV blocks are the big payload: more bytes than the token requests.
    let kv = metric(
        &text,
        "dynamo_edge_bytes_total",
        &[("from", "prefill.kv"), ("direction", "request")],
    );
    let tokens = metric(
        &text,
        "dynamo_edge_bytes_total",
        &[("from", "router.prefill"), ("direction", "request")],
    );
    assert!(kv > tokens, "kv {kv:?} vs token requests {tokens:?}");
}

/// Requests in a loop on `concurrency` tasks until `stop`.
fn load(url: &str, concurrency: usize, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<u32>> {
    (0..concurrency)
        .map(|_| {
            let (url, stop) = (url.to_string(), stop.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut ok = 0;
                while !stop.load(Ordering::Relaxed) {
                    if chat(&client, &url, 24).await == 200 {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect()
}

fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("creates target/test-artifacts");
    dir
}

/// Headless Chromium on `url` with the flags that keep it off the network, plus `extra`.
fn chromium(url: &str, extra: &[&str]) -> std::process::Output {
    let bin = system_binary("chromium");
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let profile = std::env::temp_dir().join(format!(
        "dynamo-chromium-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let out = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=4000",
            "--window-size=1900,560",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium runs");
    let _ = std::fs::remove_dir_all(&profile);
    out
}

/// The text of every `<text class="CLASS" …>…</text>` in a DOM dump, in order.
fn texts_of(dom: &str, class: &str) -> Vec<String> {
    let open = format!("<text class=\"{class}\"");
    dom.match_indices(&open)
        .filter_map(|(i, _)| {
            let rest = &dom[i..];
            let start = rest.find('>')? + 1;
            let end = rest.find("</text>")?;
            Some(rest[start..end].to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_graph_page_draws_every_node_and_edge_and_its_figures_move() {
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh"
    );
    // Fails (does not skip) without Chromium: scripts/setup-tests.sh installs it.
    system_binary("chromium");
    let g = Graph::up(&graph(), &MOCKER);
    let admin = g.admin.clone().expect("graph up serves an admin server");
    let page = format!("http://{admin}/");
    let (edges, nodes) = plan_of(&admin).await;

    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&g.url, 3, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let first = tokio::task::spawn_blocking({
        let page = page.clone();
        move || chromium(&page, &["--dump-dom"])
    })
    .await
    .expect("joins");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let shot = artifacts().join("graph-page.png");
    let _ = std::fs::remove_file(&shot);
    let (second, shot_out) = tokio::task::spawn_blocking({
        let (page, shot) = (page.clone(), shot.clone());
        move || {
            let dom = chromium(&page, &["--dump-dom"]);
            let s = chromium(&page, &[&format!("--screenshot={}", shot.display())]);
            (dom, s)
        }
    })
    .await
    .expect("joins");
    stop.store(true, Ordering::Relaxed);
    let mut served = 0;
    for w in workers {
        served += w.await.unwrap_or(0);
    }
    assert!(served > 0, "the load got no answer");

    let dom1 = String::from_utf8_lossy(&first.stdout).to_string();
    let dom2 = String::from_utf8_lossy(&second.stdout).to_string();
    assert!(
        dom2.contains("<svg"),
        "no page from chromium: {}\n{}",
        String::from_utf8_lossy(&second.stderr),
        dom2
    );
    for n in &nodes {
        assert!(
            dom2.contains(&format!("data-node=\"{n}\"")),
            "node {n} not drawn:\n{dom2}"
        );
        assert!(
            dom2.contains(&format!("id=\"replica-{n}-0\"")),
            "replica of {n} not drawn"
        );
    }
    for (from, to, _) in &edges {
        assert!(
            dom2.contains(&format!("data-from=\"{from}\" data-to=\"{to}\"")),
            "edge {from} -> {to} not drawn:\n{dom2}"
        );
    }
    let rates1 = texts_of(&dom1, "rate");
    let rates2 = texts_of(&dom2, "rate");
    assert_eq!(rates2.len(), edges.len(), "{rates2:?}");
    assert!(
        rates2.iter().all(|t| t.contains("/s")),
        "every edge shows a rate once the page has figures: {rates2:?}"
    );
    assert_ne!(rates1, rates2, "the figures did not change under load");
    let up = dom2.matches("class=\"replica up\"").count();
    assert_eq!(up, nodes.len(), "every replica is up:\n{dom2}");

    let meta = std::fs::metadata(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot at {} ({e}): {}",
            shot.display(),
            String::from_utf8_lossy(&shot_out.stderr)
        )
    });
    assert!(meta.len() > 1000, "screenshot is {} bytes", meta.len());
    eprintln!(
        "screenshot of the graph page under load: {}",
        shot.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_top_once_prints_every_node_and_edge() {
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh"
    );
    let g = Graph::up(&graph(), &MOCKER);
    let admin = g.admin.clone().expect("graph up serves an admin server");
    let client = reqwest::Client::new();
    for _ in 0..2 {
        assert_eq!(chat(&client, &g.url, 8).await, 200);
    }
    let (edges, nodes) = plan_of(&admin).await;
    // The figures are scraped every second: wait until the table counts both calls.
    let deadline = Instant::now() + Duration::from_secs(10);
    let table = loop {
        let out = Command::new(dynamo_bin())
            .args(["graph", "top", "--once", "--admin", &admin])
            .output()
            .expect("graph top runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let table = String::from_utf8_lossy(&out.stdout).to_string();
        let counted = table
            .lines()
            .find(|l| l.starts_with("frontend.out -> "))
            .and_then(|l| l.split_whitespace().last()?.parse::<u32>().ok());
        if counted == Some(2) || Instant::now() > deadline {
            break table;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    eprintln!("{table}");
    let rows: BTreeMap<&str, &str> = table
        .lines()
        .filter_map(|l| Some((l.split_whitespace().next()?, l)))
        .collect();
    for n in &nodes {
        let row = rows
            .get(n.as_str())
            .unwrap_or_else(|| panic!("no row for {n}:\n{table}"));
        assert!(row.contains(" ok ") && row.contains("1/1 up"), "{row}");
    }
    for (from, to, kind) in &edges {
        let arrow = if kind == "feedback" { "~>" } else { "->" };
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("{from} {arrow} {to} ")))
            .unwrap_or_else(|| panic!("no row for {from} {arrow} {to}:\n{table}"));
        if from == "frontend.out" {
            assert!(row.trim_end().ends_with(" 2"), "two calls counted: {row}");
        }
    }
}

async fn stats(admin: &str) -> serde_json::Value {
    serde_json::from_str(&get_text(&format!("http://{admin}/api/stats")).await)
        .expect("/api/stats is JSON")
}

/// `(replica state, node health)` of replica 0 of `node`.
fn health_of(stats: &serde_json::Value, node: &str) -> (String, String) {
    let n = stats["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["node"] == node)
        .cloned()
        .unwrap_or_default();
    (
        n["replicas"][0]["state"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        n["health"].as_str().unwrap_or_default().to_string(),
    )
}

/// Waits (bounded) until replica 0 of `node` is `state`; returns the last figures.
async fn until_state(admin: &str, node: &str, state: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = stats(admin).await;
        if health_of(&s, node).0 == state || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_stops_answering_shows_down_and_comes_back() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh"
    );
    let g = Graph::up(&graph(), &MOCKER);
    let admin = g.admin.clone().expect("graph up serves an admin server");
    let s = until_state(&admin, "decode", "up").await;
    assert_eq!(health_of(&s, "decode"), ("up".into(), "ok".into()), "{s}");
    let pid = g.process_pid("decode-0").expect("the decode process runs");
    let pid = Pid::from_raw(pid);
    // Frozen, not killed: the supervisor does not restart it, it just stops answering.
    kill(pid, Signal::SIGSTOP).expect("stops the decode process");
    let s = until_state(&admin, "decode", "down").await;
    let _ = kill(pid, Signal::SIGCONT);
    assert_eq!(
        health_of(&s, "decode"),
        ("down".into(), "down".into()),
        "{s}"
    );
    assert_eq!(
        health_of(&s, "prefill").0,
        "up",
        "only the frozen process is down: {s}"
    );
    let s = until_state(&admin, "decode", "up").await;
    assert_eq!(health_of(&s, "decode"), ("up".into(), "ok".into()), "{s}");
}

/// `[admin] address` in the file puts the graph page there; `--admin` overrides it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_files_admin_section_says_where_the_graph_page_is() {
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let text = std::fs::read_to_string(graph()).expect("disagg.toml");
    let file = std::env::temp_dir().join(format!("dynamo-admin-{}.toml", std::process::id()));
    std::fs::write(
        &file,
        format!("{text}\n[admin]\naddress = \"127.0.0.1:{port}\"\n"),
    )
    .expect("writes the graph");

    let mut g = Graph::up(&file, &MOCKER);
    let admin = g.admin.clone().expect("graph up serves an admin server");
    assert_eq!(admin, format!("127.0.0.1:{port}"));
    let (_, nodes) = plan_of(&admin).await;
    assert!(nodes.iter().any(|n| n == "decode"), "{nodes:?}");
    assert!(g.stop(Duration::from_secs(20)), "stops");

    let mut g = Graph::up_with(&file, &MOCKER, &["--admin", "127.0.0.1:0"]);
    let admin = g.admin.clone().expect("graph up serves an admin server");
    assert_ne!(admin, format!("127.0.0.1:{port}"), "the flag wins");
    assert!(g.stop(Duration::from_secs(20)), "stops");
    let _ = std::fs::remove_file(&file);
}
