//! Trace replay: sends the rows of a Mooncake trace at their (scaled) arrival times as
//! streaming `/v1/completions` requests with synthetic token-id prompts, then compares
//! the engines' prefix-cache hit rate with the trace's infinite-cache ceiling.
//!
//! ```no_run
//! # async fn demo() -> Result<(), dynamo_bench::BenchError> {
//! let args = dynamo_bench::ReplayArgs::parse_from([
//!     "replay", "mooncake_conversation_trace.jsonl", "--time-scale", "0.1",
//!     "--max-requests", "200",
//! ])
//! .map_err(|e| dynamo_bench::BenchError::InvalidArgs(e.to_string()))?;
//! let report = dynamo_bench::replay(args).await?;
//! println!("{}", report.to_text());
//! # Ok(()) }
//! ```

mod args;
mod blocks;
mod compare;
mod ideal;
mod metrics;
mod report;
mod schedule;
mod trace;

use std::sync::Arc;

pub use args::{LongPrompt, ReplayArgs};
pub use blocks::{TOKEN_END, TOKEN_MIN};
pub use compare::{Better, ComparedFigure, ComparedRun, ReplayComparison, Side};
pub use ideal::IdealHitRate;
pub use metrics::{KvReport, WorkerId, WorkerShare, PREFIX_HIT_TOKENS, PROMPT_TOKENS};
pub use report::{ReplayReport, TraceSummary};

use crate::args::Endpoint;
use crate::client::{self, Target};
use crate::report::Header;
use crate::{BenchError, LatencySummary, Report};

/// [`replay`] on a multi-threaded tokio runtime of its own, for synchronous callers. Must
/// not be called from inside a tokio runtime.
pub fn replay_blocking(args: ReplayArgs) -> Result<ReplayReport, BenchError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?;
    runtime.block_on(replay(args))
}

/// Replays the trace window the flags describe. Fails on bad flags, an unreadable trace or
/// a bad row in the window (before anything is sent), or an unreachable model list (when
/// `--model` is not given); failed requests are counted in the report.
pub async fn replay(args: ReplayArgs) -> Result<ReplayReport, BenchError> {
    args.validate()?;
    let timeout = args.timeout_duration()?;
    let path = args.trace.display().to_string();
    let text = tokio::fs::read_to_string(&args.trace)
        .await
        .map_err(|source| BenchError::TraceRead {
            path: path.clone(),
            source,
        })?;
    let limits = trace::Limits {
        start_offset: args.start_offset,
        max_requests: args.max_requests,
        max_duration: args.max_duration()?,
        time_scale: args.time_scale,
        block_tokens: args.block_tokens,
        max_input_tokens: args.max_input_tokens,
        long_prompts: args.long_prompts,
        max_output_tokens: args.max_output_tokens,
        context_tokens: args.context_tokens,
    };
    let selection = trace::select(&text, &path, &limits)?;
    drop(text);
    let client = client::build_client(args.concurrency_limit, timeout)?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => client::first_model(&client, &args.url, timeout).await?,
    };
    let before = metrics::scrape(&client, &args.url, timeout).await;
    let target = Arc::new(Target {
        client: client.clone(),
        url: args.url.clone(),
        model: model.clone(),
        endpoint: Endpoint::Completions,
        stream: true,
        timeout,
    });
    let sending = schedule::Sending {
        seed: args.seed,
        block_tokens: args.block_tokens,
        concurrency_limit: args.concurrency_limit,
        deadline: limits.max_duration,
    };
    let sent = schedule::send_all(target, &selection.rows, sending).await;
    let (kv, kv_note) = match before {
        Err(note) => (None, Some(note)),
        Ok(before) => {
            tokio::time::sleep(args.metrics_wait_duration()?).await;
            let after = metrics::scrape(&client, &args.url, timeout).await;
            match after.and_then(|after| metrics::kv_report(&before, &after)) {
                Ok(kv) => (Some(kv), None),
                Err(note) => (None, Some(note)),
            }
        }
    };
    let rows = selection.rows.get(..sent.sent).unwrap_or(&selection.rows);
    let ideal = ideal::ideal_hit_rate(
        rows.iter().map(|r| (&r.hash_ids[..], r.prompt_tokens)),
        args.block_tokens,
    );
    let header = Header {
        url: args.url.clone(),
        model,
        endpoint: Endpoint::Completions.name().into(),
        stream: true,
        concurrency: None,
        request_rate: None,
        max_concurrency: Some(args.concurrency_limit),
        warmup_requests: 0,
    };
    let mut run = Report::build(header, &sent.outcomes, sent.elapsed, None);
    run.mode = "replay".into();
    let first_ms = rows.first().map_or(0.0, |r| r.timestamp_ms);
    let last_ms = rows.last().map_or(0.0, |r| r.timestamp_ms);
    let trace = TraceSummary {
        path,
        start_offset: args.start_offset,
        rows_planned: selection.rows.len() as u64,
        rows_sent: sent.sent as u64,
        rows_skipped_too_long: selection.skipped_long,
        rows_truncated: rows.iter().filter(|r| r.truncated).count() as u64,
        outputs_capped: rows.iter().filter(|r| r.output_capped).count() as u64,
        max_input_tokens: args.max_input_tokens,
        prompt_tokens_sent: rows.iter().map(|r| r.prompt_tokens as u64).sum(),
        time_scale: args.time_scale,
        trace_span_s: (last_ms - first_ms) / 1000.0,
    };
    let summary = |ds: &[std::time::Duration]| {
        LatencySummary::from_ms(ds.iter().map(|d| d.as_secs_f64() * 1000.0).collect())
    };
    Ok(ReplayReport {
        run,
        trace,
        start_lag_ms: summary(&sent.start_lag),
        ttft_from_schedule_ms: summary(&sent.ttft_from_schedule),
        e2e_from_schedule_ms: summary(&sent.e2e_from_schedule),
        ideal,
        kv,
        kv_note,
    })
}
