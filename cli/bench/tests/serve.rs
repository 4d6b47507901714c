//! End-to-end runs against a fake OpenAI server in the test process. Timing checks are
//! loose (a loaded 2-core machine stretches every delay); counts are exact.

mod fake;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use dynamo_bench::{run, BenchArgs, BenchError, Report};
use fake::Mode;

fn args(url: &str, extra: &[&str]) -> BenchArgs {
    let mut all = vec!["bench", "--url", url];
    all.extend_from_slice(extra);
    match BenchArgs::parse_from(all) {
        Ok(a) => a,
        Err(e) => panic!("flags {extra:?}: {e}"),
    }
}

async fn bench(url: &str, extra: &[&str]) -> Report {
    // Every run is bounded by its flags; this outer bound only turns a bug into a failure.
    match tokio::time::timeout(Duration::from_secs(60), run(args(url, extra))).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("run failed: {e}"),
        Err(_) => panic!("run did not finish within 60 s"),
    }
}

const STREAM: Mode = Mode::Stream {
    ttft: Duration::from_millis(40),
    itl: Duration::from_millis(10),
};

#[tokio::test]
async fn closed_loop_stream_counts_tokens_and_latencies() {
    let (url, seen) = fake::start(STREAM).await;
    let me = std::process::id().to_string();
    let flags = [
        "--requests",
        "20",
        "--concurrency",
        "4",
        "--warmup",
        "2",
        "--output-tokens",
        "8",
        "--input-tokens",
        "32",
        "--shared-prefix-tokens",
        "16",
        "--prefix-groups",
        "2",
        "--server-pids",
        &me,
    ];
    let r = bench(&url, &flags).await;
    assert_eq!(
        (r.requests_ok, r.requests_failed),
        (20, 0),
        "{}",
        r.to_text()
    );
    assert_eq!(
        seen.requests.load(Ordering::SeqCst),
        22,
        "warmup requests are sent"
    );
    assert_eq!(r.model, "fake", "the first listed model is the default");
    assert_eq!(r.output_tokens, 160);
    // The fake reports prompt_tokens 0, so the approximation stands in.
    assert_eq!(r.input_tokens, 20 * 32);
    assert_eq!((r.ttft_ms.count, r.e2e_ms.count), (20, 20));
    assert_eq!(
        r.itl_ms.count,
        20 * 7,
        "one gap between each pair of the 8 chunks"
    );
    assert!(
        r.ttft_ms.mean >= 35.0 && r.ttft_ms.mean < 5_000.0,
        "TTFT {:?}",
        r.ttft_ms
    );
    assert!(
        r.itl_ms.p50 >= 5.0 && r.itl_ms.p50 < 2_000.0,
        "ITL {:?}",
        r.itl_ms
    );
    assert!(
        r.e2e_ms.min >= 100.0,
        "E2E {:?} below 40 + 7·10 ms",
        r.e2e_ms
    );
    assert!(r.e2e_ms.p99 >= r.e2e_ms.p50 && r.e2e_ms.p50 >= r.e2e_ms.min);
    // 20 requests of ≥110 ms, 4 at a time: at least 5 rounds.
    assert!(r.duration_s >= 0.5, "duration {}", r.duration_s);
    assert!(r.requests_per_s > 0.0 && r.output_tokens_per_s > r.requests_per_s);
    let cpu = r
        .cpu
        .as_ref()
        .map(|c| (c.cpu_ms_total, c.server_pids.clone()));
    assert!(matches!(cpu, Some((ms, ref pids)) if ms >= 0.0 && pids == &[std::process::id()]));
    let json = r.to_json();
    assert_eq!(json["requests_ok"], 20);
    assert!(json["cpu_us_per_token"].is_number());

    let bodies = seen.bodies.lock().map(|b| b.clone()).unwrap_or_default();
    assert_eq!(bodies.len(), 22);
    for b in &bodies {
        assert_eq!(b["model"], "fake");
        assert_eq!(b["max_tokens"], 8);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
    }
    let prompt = |b: &serde_json::Value| {
        b["messages"][0]["content"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let mut prompts: Vec<String> = bodies.iter().map(prompt).collect();
    assert!(prompts.iter().all(|p| p.split(' ').count() == 32));
    prompts.sort();
    prompts.dedup();
    assert_eq!(prompts.len(), 22, "every request has its own prompt");
    let prefixes: std::collections::BTreeSet<String> = prompts
        .iter()
        .map(|p| p.split(' ').take(16).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        prefixes.len(),
        2,
        "two prefix groups, two distinct prefixes"
    );
}

#[tokio::test]
async fn errors_are_counted_and_the_run_goes_on() {
    let (url, seen) = fake::start(Mode::BadRequest).await;
    let r = bench(
        &url,
        &["--requests", "10", "--concurrency", "2", "--model", "m"],
    )
    .await;
    assert_eq!((r.requests_ok, r.requests_failed), (0, 10));
    assert_eq!(seen.requests.load(Ordering::SeqCst), 10);
    assert_eq!(r.errors.get("http_400"), Some(&10));
    let example = r
        .error_examples
        .get("http_400")
        .cloned()
        .unwrap_or_default();
    assert_eq!(example, "temperature must be at most 2");
    assert_eq!(r.e2e_ms.count, 0, "failed requests have no latencies");
    assert!(r.to_text().contains("http_400"));
}

#[tokio::test]
async fn sse_errors_and_truncated_streams_are_failures() {
    let (url, _) = fake::start(Mode::ErrorMidStream).await;
    let r = bench(&url, &["--requests", "4", "--concurrency", "2"]).await;
    assert_eq!(r.errors.get("sse_error"), Some(&4), "{:?}", r.errors);
    assert_eq!(
        r.error_examples.get("sse_error").map(String::as_str),
        Some("engine went away")
    );

    let (url, _) = fake::start(Mode::Truncated).await;
    let r = bench(&url, &["--requests", "3", "--endpoint", "completions"]).await;
    assert_eq!(r.errors.get("truncated_stream"), Some(&3), "{:?}", r.errors);
}

#[tokio::test]
async fn timeouts_are_counted_and_bound_the_run() {
    let (url, _) = fake::start(Mode::Stall(Duration::from_secs(30))).await;
    let start = Instant::now();
    let r = bench(
        &url,
        &[
            "--requests",
            "3",
            "--concurrency",
            "3",
            "--timeout",
            "0.3",
            "--model",
            "m",
        ],
    )
    .await;
    assert_eq!(r.errors.get("timeout"), Some(&3), "{:?}", r.errors);
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "the timeout did not bound the run"
    );
}

#[tokio::test]
async fn refused_connections_are_counted() {
    let port = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(e) => panic!("no free port: {e}"),
    };
    let url = format!("http://127.0.0.1:{port}");
    let r = bench(&url, &["--requests", "2", "--model", "m", "--timeout", "5"]).await;
    assert_eq!(r.errors.get("connect"), Some(&2), "{:?}", r.errors);
    let err = run(args(&url, &["--requests", "1", "--timeout", "5"])).await;
    assert!(
        matches!(err, Err(BenchError::Models { .. })),
        "no model list, no default model: {err:?}"
    );
}

#[tokio::test]
async fn open_loop_with_a_duration_stops() {
    let (url, seen) = fake::start(Mode::Stream {
        ttft: Duration::from_millis(5),
        itl: Duration::from_millis(2),
    })
    .await;
    let flags = [
        "--request-rate",
        "40",
        "--max-concurrency",
        "4",
        "--duration",
        "0.5",
        "--output-tokens",
        "4",
        "--endpoint",
        "completions",
    ];
    let r = bench(&url, &flags).await;
    assert_eq!(r.requests_failed, 0, "{:?}", r.errors);
    assert!(
        r.requests_ok >= 1 && r.requests_ok <= 100,
        "{} requests in 0.5 s at 40/s",
        r.requests_ok
    );
    assert_eq!(seen.requests.load(Ordering::SeqCst), r.requests_ok);
    assert_eq!(r.output_tokens, 4 * r.requests_ok);
    assert_eq!(r.mode, "open");
    assert!(r.duration_s >= 0.0 && r.duration_s < 30.0);
}

#[tokio::test]
async fn whole_answers_without_streaming() {
    let (url, seen) = fake::start(STREAM).await;
    let r = bench(
        &url,
        &[
            "--requests",
            "4",
            "--concurrency",
            "2",
            "--no-stream",
            "--output-tokens",
            "5",
        ],
    )
    .await;
    assert_eq!((r.requests_ok, r.requests_failed), (4, 0), "{:?}", r.errors);
    assert_eq!(r.output_tokens, 20);
    assert_eq!(
        r.input_tokens, 44,
        "the server's prompt_tokens win over the approximation"
    );
    assert_eq!((r.ttft_ms.count, r.itl_ms.count, r.e2e_ms.count), (0, 0, 4));
    let bodies = seen.bodies.lock().map(|b| b.clone()).unwrap_or_default();
    assert!(bodies
        .iter()
        .all(|b| b["stream"] == false && b.get("stream_options").is_none()));
}

#[tokio::test]
async fn closed_loop_with_only_a_duration_stops() {
    let (url, seen) = fake::start(Mode::Stream {
        ttft: Duration::from_millis(5),
        itl: Duration::from_millis(2),
    })
    .await;
    let r = bench(
        &url,
        &[
            "--duration",
            "0.3",
            "--concurrency",
            "2",
            "--output-tokens",
            "3",
        ],
    )
    .await;
    assert_eq!(r.requests_failed, 0, "{:?}", r.errors);
    assert!(r.requests_ok >= 2, "{} requests", r.requests_ok);
    assert_eq!(seen.requests.load(Ordering::SeqCst), r.requests_ok);
    assert!(
        r.duration_s >= 0.3 && r.duration_s < 30.0,
        "duration {}",
        r.duration_s
    );
}

#[test]
fn run_blocking_works_without_a_runtime() {
    // The fake needs a runtime of its own, on another thread.
    let server = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => panic!("no runtime: {e}"),
    };
    let (url, _) = server.block_on(fake::start(STREAM));
    let r = dynamo_bench::run_blocking(args(&url, &["--requests", "3", "--output-tokens", "2"]));
    assert!(
        matches!(&r, Ok(r) if r.requests_ok == 3 && r.output_tokens == 6),
        "{r:?}"
    );
}

#[tokio::test]
async fn a_body_held_open_after_done_does_not_fail_the_request() {
    let (url, _) = fake::start(Mode::HangAfterDone).await;
    let start = Instant::now();
    let r = bench(
        &url,
        &["--requests", "2", "--output-tokens", "3", "--timeout", "20"],
    )
    .await;
    assert_eq!((r.requests_ok, r.requests_failed), (2, 0), "{:?}", r.errors);
    assert!(r.e2e_ms.max < 1_000.0, "E2E ends at [DONE]: {:?}", r.e2e_ms);
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "the run waited for the body"
    );
}
