//! Trace replay against a fake OpenAI server in the test process. The fake keeps the
//! token-id prompts it receives and serves engine counters on `/metrics` as a perfect
//! prefix cache would: a request's hit is its longest common prefix with any earlier one.
//! Counts are exact; timing checks are loose.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use dynamo_bench::{replay, BenchError, ReplayArgs, ReplayReport, TOKEN_END, TOKEN_MIN};
use serde_json::{json, Value};

/// Workers the fake's metrics list; requests go round-robin to the first three, the
/// fourth stays idle.
const WORKERS: usize = 4;

#[derive(Default)]
struct Fake {
    serve_metrics: bool,
    bodies: Vec<Value>,
    prompts: Vec<Vec<u64>>,
    /// (prompt tokens, prefix-hit tokens) per worker, from before the replay on.
    counters: [(u64, u64); WORKERS],
}

type Shared = Arc<Mutex<Fake>>;

async fn start(serve_metrics: bool) -> (String, Shared) {
    let fake = Arc::new(Mutex::new(Fake {
        serve_metrics,
        // Earlier traffic: the replay must report only its own growth.
        counters: [(1000, 400), (10, 0), (0, 0), (5, 5)],
        ..Fake::default()
    }));
    let router = Router::new()
        .route(
            "/v1/models",
            get(|| async { Json(json!({"data": [{"id": "fake"}]})) }),
        )
        .route("/v1/completions", post(complete))
        .route("/metrics", get(metrics))
        .with_state(fake.clone());
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => panic!("cannot bind a loopback port: {e}"),
    };
    let url = match listener.local_addr() {
        Ok(a) => format!("http://{a}"),
        Err(e) => panic!("no local address: {e}"),
    };
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (url, fake)
}

struct Json(Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        ([("content-type", "application/json")], self.0.to_string()).into_response()
    }
}

fn common_prefix(a: &[u64], b: &[u64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

async fn complete(State(fake): State<Shared>, body: Bytes) -> Response {
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let prompt: Vec<u64> = req["prompt"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let n = req["max_tokens"].as_u64().unwrap_or(1).min(64);
    let len = prompt.len() as u64;
    if let Ok(mut f) = fake.lock() {
        let hit = f
            .prompts
            .iter()
            .map(|p| common_prefix(p, &prompt))
            .max()
            .unwrap_or(0) as u64;
        let worker = f.prompts.len() % (WORKERS - 1);
        f.counters[worker].0 += len;
        f.counters[worker].1 += hit;
        f.prompts.push(prompt);
        f.bodies.push(req);
    }
    let mut chunks: Vec<String> = (0..n)
        .map(|_| {
            format!(
                "data: {}\n\n",
                json!({"choices": [{"index": 0, "text": " w"}]})
            )
        })
        .collect();
    let usage = json!({"choices": [], "usage": {"prompt_tokens": len, "completion_tokens": n}});
    chunks.push(format!("data: {usage}\n\ndata: [DONE]\n\n"));
    let stream = futures::stream::unfold(chunks.into_iter(), |mut it| async move {
        let c = it.next()?;
        tokio::time::sleep(Duration::from_millis(1)).await;
        Some((Ok::<_, Infallible>(Bytes::from(c)), it))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn metrics(State(fake): State<Shared>) -> Response {
    let Ok(f) = fake.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    if !f.serve_metrics {
        return StatusCode::NOT_FOUND.into_response();
    }
    let mut s = String::from("# TYPE dynamo_engine_prompt_tokens counter\n");
    for (i, (prompt, _)) in f.counters.iter().enumerate() {
        let _ = writeln!(
            s,
            "dynamo_engine_prompt_tokens_total{{node=\"worker\",replica=\"{i}\"}} {prompt}"
        );
    }
    s.push_str("# TYPE dynamo_engine_prefix_hit_tokens counter\n");
    for (i, (_, hit)) in f.counters.iter().enumerate() {
        let _ = writeln!(
            s,
            "dynamo_engine_prefix_hit_tokens_total{{node=\"worker\",replica=\"{i}\"}} {hit}"
        );
    }
    s.push_str("# EOF\n");
    s.into_response()
}

/// 20 rows, 100 ms apart: four conversations (row i is turn i/4 of conversation i%4) that
/// share block 0 (a system prompt) and grow by a block per turn. Turns 3 and 4 are longer
/// than 1,800 tokens; outputs are 3..=7 tokens.
fn write_trace(name: &str) -> PathBuf {
    let mut text = String::new();
    for i in 0..20u64 {
        let (conv, turn) = (i % 4, i / 4);
        let mut ids = vec![0u64];
        ids.extend((0..=turn).map(|k| 100 * (conv + 1) + k));
        let input = 512 * (turn + 1) + 50 + i;
        let row = json!({"timestamp": i * 100, "input_length": input,
                         "output_length": 3 + i % 5, "hash_ids": ids});
        let _ = writeln!(text, "{row}");
    }
    let path = std::env::temp_dir().join(format!("dynamo-bench-{}-{name}", std::process::id()));
    if let Err(e) = std::fs::write(&path, text) {
        panic!("cannot write {}: {e}", path.display());
    }
    path
}

async fn run(url: &str, trace: &Path, extra: &[&str]) -> Result<ReplayReport, BenchError> {
    let trace = trace.display().to_string();
    let mut flags = vec![
        "replay",
        trace.as_str(),
        "--url",
        url,
        "--metrics-wait",
        "0",
    ];
    flags.extend_from_slice(extra);
    let args = match ReplayArgs::parse_from(flags) {
        Ok(a) => a,
        Err(e) => panic!("flags {extra:?}: {e}"),
    };
    match tokio::time::timeout(Duration::from_secs(60), replay(args)).await {
        Ok(r) => r,
        Err(_) => panic!("the replay did not finish within 60 s"),
    }
}

/// Prompt and output limits of the replays below: turns 3 and 4 of the trace are cut,
/// outputs of 7 capped.
const LIMITS: [&str; 6] = [
    "--max-input-tokens",
    "1800",
    "--context-tokens",
    "2048",
    "--max-output-tokens",
    "6",
];

fn expect(r: Result<ReplayReport, BenchError>) -> ReplayReport {
    match r {
        Ok(r) => r,
        Err(e) => panic!("replay failed: {e}"),
    }
}

#[tokio::test]
async fn replays_a_trace_with_shared_prefixes_and_reports_the_hit_rate() {
    let (url, fake) = start(true).await;
    let trace = write_trace("shared.jsonl");
    let flags = [&["--time-scale", "0.05"][..], &LIMITS].concat();
    let r = expect(run(&url, &trace, &flags).await);
    let text = r.to_text();
    assert_eq!(
        (r.run.requests_ok, r.run.requests_failed),
        (20, 0),
        "{text}"
    );
    assert_eq!(r.run.mode, "replay");
    assert_eq!((r.trace.rows_planned, r.trace.rows_sent), (20, 20));
    assert_eq!(
        r.trace.rows_truncated, 8,
        "turns 3 and 4 are over 1,800 tokens"
    );
    assert_eq!(r.trace.outputs_capped, 4, "outputs of 7 are capped at 6");
    assert!((r.trace.trace_span_s - 1.9).abs() < 1e-9);
    assert_eq!(
        r.run.output_tokens,
        (0..20).map(|i| (3 + i % 5).min(6)).sum::<u64>()
    );

    let (bodies, prompts) = match fake.lock() {
        Ok(f) => (f.bodies.clone(), f.prompts.clone()),
        Err(_) => panic!("the fake's lock is poisoned"),
    };
    assert_eq!(bodies.len(), 20);
    for b in &bodies {
        assert_eq!(b["model"], "fake");
        assert_eq!(
            (b["ignore_eos"].clone(), b["stream"].clone()),
            (json!(true), json!(true))
        );
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert!(
            matches!(b["max_tokens"].as_u64(), Some(3..=6)),
            "{}",
            b["max_tokens"]
        );
    }
    let mut lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
    lengths.sort_unstable();
    let mut want: Vec<usize> = (0..20u64)
        .map(|i| (512 * (i / 4 + 1) + 50 + i).min(1800) as usize)
        .collect();
    want.sort_unstable();
    assert_eq!(
        lengths, want,
        "exact prompt lengths, long ones cut to 1,800"
    );
    assert_eq!(
        r.trace.prompt_tokens_sent,
        want.iter().sum::<usize>() as u64
    );
    assert!(prompts
        .iter()
        .flatten()
        .all(|&t| (u64::from(TOKEN_MIN)..u64::from(TOKEN_END)).contains(&t)));
    // Every prompt starts with block 0; conversations part at token 512, and within one
    // each turn's prompt is a prefix of the next.
    let mut by_conversation: BTreeMap<u64, Vec<&Vec<u64>>> = BTreeMap::new();
    for p in &prompts {
        assert!(common_prefix(p, &prompts[0]) >= 512, "block 0 is shared");
        by_conversation.entry(p[512]).or_default().push(p);
    }
    assert_eq!(by_conversation.len(), 4);
    for turns in by_conversation.values_mut() {
        assert_eq!(turns.len(), 5);
        turns.sort_by_key(|p| p.len());
        for pair in turns.windows(2) {
            assert_eq!(common_prefix(pair[0], pair[1]), pair[0].len());
        }
    }
    for (a, b) in by_conversation
        .values()
        .zip(by_conversation.values().skip(1))
    {
        assert_eq!(
            common_prefix(a[0], b[0]),
            512,
            "conversations share only block 0"
        );
    }

    // The fake is a perfect prefix cache, so its hits are the trace's ideal hits.
    let kv = match &r.kv {
        Some(kv) => kv,
        None => panic!("no KV report: {:?}", r.kv_note),
    };
    assert_eq!(
        kv.prompt_tokens, r.trace.prompt_tokens_sent,
        "Δ, not the totals"
    );
    assert_eq!(kv.prefix_hit_tokens, r.ideal.hit_tokens, "{text}");
    assert!(
        r.ideal.token_rate > 0.5 && r.ideal.token_rate < 1.0,
        "{:?}",
        r.ideal
    );
    assert!((kv.hit_rate - r.ideal.token_rate).abs() < 1e-12);
    assert_eq!(kv.workers.len(), WORKERS);
    let shares: f64 = kv.workers.iter().map(|w| w.share).sum();
    assert!((shares - 1.0).abs() < 1e-9);
    assert_eq!(kv.workers[3].prompt_tokens, 0, "the idle worker is listed");
    assert!(
        kv.busiest_vs_mean > 1.1 && kv.busiest_vs_mean < 1.8,
        "{}",
        kv.busiest_vs_mean
    );
    assert!(r.start_lag_ms.count == 20 && r.run.duration_s < 30.0);
    let j = r.to_json();
    assert_eq!(j["requests_ok"], 20);
    assert_eq!(j["trace"]["rows_truncated"], 8);
    assert!(j["kv"]["hit_rate"].is_number() && j["ideal"]["token_rate"].is_number());
    assert!(
        text.contains("KV hit rate") && text.contains("busiest"),
        "{text}"
    );
    let _ = std::fs::remove_file(trace);
}

/// One request at a time and rows due every 0.1 ms: each row waits for the ones before
/// it. TTFT from the send leaves that wait out; from the schedule it counts.
#[tokio::test]
async fn a_capped_replay_counts_the_wait_from_the_schedule() {
    let (url, _fake) = start(true).await;
    let trace = write_trace("capped.jsonl");
    let flags = [
        &["--time-scale", "0.001", "--concurrency-limit", "1"][..],
        &LIMITS,
    ]
    .concat();
    let r = expect(run(&url, &trace, &flags).await);
    let text = r.to_text();
    assert_eq!(r.run.requests_ok, 20, "{text}");
    let (sent, sched, lag) = (&r.run.ttft_ms, &r.ttft_from_schedule_ms, &r.start_lag_ms);
    assert_eq!((sched.count, r.e2e_from_schedule_ms.count), (20, 20));
    // Each row's TTFT from the schedule is its TTFT plus its start lag.
    assert!(
        (sched.mean - (sent.mean + lag.mean)).abs() < 1e-6,
        "{sched:?} {sent:?} {lag:?}"
    );
    assert!(sched.max >= lag.max, "{sched:?} {lag:?}");
    // The middle row waited for ten answers of at least 4 ms each (the fake streams a
    // chunk a millisecond).
    assert!(sched.p50 >= sent.p50 + 20.0, "{sched:?} {sent:?}");
    assert!(
        r.e2e_from_schedule_ms.p50 >= r.run.e2e_ms.p50 + 20.0,
        "{:?}",
        r.e2e_from_schedule_ms
    );
    assert!(r.to_json()["ttft_from_schedule_ms"]["p99"].is_number());
    assert_eq!(
        text.contains("TTFT sch."),
        lag.max > 100.0,
        "the rows show with the note: {text}"
    );
    let _ = std::fs::remove_file(trace);
}

#[tokio::test]
async fn without_metrics_the_hit_rate_is_omitted_with_a_note() {
    let (url, fake) = start(false).await;
    let trace = write_trace("nometrics.jsonl");
    let flags = [
        "--time-scale",
        "1",
        "--max-duration",
        "0.45",
        "--start-offset",
        "2",
    ];
    let r = expect(run(&url, &trace, &flags).await);
    // Rows 3..=7 of the trace are at 0..=400 ms from the first replayed one.
    assert_eq!(
        (r.run.requests_ok, r.trace.rows_sent),
        (5, 5),
        "{}",
        r.to_text()
    );
    assert_eq!(fake.lock().map(|f| f.bodies.len()).ok(), Some(5));
    assert!(r.kv.is_none());
    let note = r.kv_note.clone().unwrap_or_default();
    assert!(note.contains("/metrics") && note.contains("404"), "{note}");
    assert!(r.to_text().contains("not measured"));
    assert!(r.ideal.token_rate > 0.0, "the ideal needs no metrics");
    let _ = std::fs::remove_file(trace);
}

#[tokio::test]
async fn a_bad_row_fails_before_anything_is_sent() {
    let (url, fake) = start(true).await;
    let trace = write_trace("bad.jsonl");
    let mut text = std::fs::read_to_string(&trace).unwrap_or_default();
    text.push_str(
        "{\"timestamp\": 5000, \"input_length\": 600, \"output_length\": 1, \"hash_ids\": [1]}\n",
    );
    if let Err(e) = std::fs::write(&trace, text) {
        panic!("{e}");
    }
    let err = run(&url, &trace, &["--time-scale", "0"]).await;
    assert!(
        matches!(&err, Err(BenchError::TraceRow { line: 21, .. })),
        "{:?}",
        err.map(|r| r.to_text())
    );
    assert_eq!(fake.lock().map(|f| f.bodies.len()).ok(), Some(0));
    let missing = run(&url, &PathBuf::from("/nonexistent/trace.jsonl"), &[]).await;
    assert!(matches!(missing, Err(BenchError::TraceRead { .. })));
    let _ = std::fs::remove_file(trace);
}
