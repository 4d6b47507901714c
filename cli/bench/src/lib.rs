//! `dynamo bench serve`: a load generator for OpenAI-compatible servers.
//!
//! ```no_run
//! # async fn demo() -> Result<(), dynamo_bench::BenchError> {
//! let args = dynamo_bench::BenchArgs::parse_from([
//!     "bench", "--url", "http://127.0.0.1:8000", "--concurrency", "8", "--requests", "200",
//! ])
//! .map_err(|e| dynamo_bench::BenchError::InvalidArgs(e.to_string()))?;
//! let report = dynamo_bench::run(args).await?;
//! println!("{}", report.to_text());
//! # Ok(()) }
//! ```
//!
//! Per request it measures time to first token (first non-empty content chunk), the gap
//! between consecutive content chunks (inter-token latency), end-to-end latency (to
//! `data: [DONE]`), and output tokens (the usage chunk's count when the server sends one,
//! else the number of content chunks). Failed requests are counted by kind and the run
//! goes on.

mod args;
mod client;
mod cpu;
mod error;
mod prompt;
mod replay;
mod report;
mod rng;
mod runner;
mod sse;
mod stats;

use std::sync::Arc;

pub use args::{BenchArgs, Endpoint, DEFAULT_REQUESTS};
pub use cpu::{measure_process_cpu, try_measure_process_cpu};
pub use error::{BenchError, ErrorKind};
pub use prompt::{Prompt, PromptGenerator};
pub use replay::{
    replay, replay_blocking, Better, ComparedFigure, ComparedRun, IdealHitRate, KvReport,
    LongPrompt, ReplayArgs, ReplayComparison, ReplayReport, Side, TraceSummary, WorkerId,
    WorkerShare, PREFIX_HIT_TOKENS, PROMPT_TOKENS, TOKEN_END, TOKEN_MIN,
};
pub use report::{CpuReport, Report};
pub use sse::{SseParser, StreamEvent, Usage};
pub use stats::{percentile_sorted, LatencySummary};

use args::{Bound, Load};
use client::Target;
use runner::{run_phase, Plan};

/// [`run`] on a multi-threaded tokio runtime of its own, for synchronous callers such as
/// the `dynamo` binary's `main`. Must not be called from inside a tokio runtime.
pub fn run_blocking(args: BenchArgs) -> Result<Report, BenchError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?;
    runtime.block_on(run(args))
}

/// Runs the benchmark the flags describe: warmup (not reported), then the measured phase.
/// Fails only on bad flags, an unreachable model list (when `--model` is not given) or an
/// unreadable `--server-pids` process; failed requests are counted in the report.
pub async fn run(args: BenchArgs) -> Result<Report, BenchError> {
    args.validate()?;
    let timeout = args.timeout_duration()?;
    let load = args.load()?;
    let bound = args.bound()?;
    let max_in_flight = match load {
        Load::Closed { concurrency } => concurrency,
        Load::Open {
            max_concurrency, ..
        } => max_concurrency.unwrap_or(64),
    };
    if !args.server_pids.is_empty() {
        try_measure_process_cpu(&args.server_pids)?;
    }
    let client = client::build_client(max_in_flight, timeout)?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => client::first_model(&client, &args.url, timeout).await?,
    };
    let stream = args.streaming();
    let target = Target {
        client,
        url: args.url.clone(),
        model: model.clone(),
        endpoint: args.endpoint,
        stream,
        timeout,
    };
    let plan = Plan {
        target: Arc::new(target),
        prompts: Arc::new(PromptGenerator::new(
            args.seed,
            args.input_tokens,
            args.shared_prefix_tokens,
            args.prefix_groups,
        )),
        load,
        seed: args.seed,
        output_tokens: args.output_tokens,
    };
    if args.warmup > 0 {
        let warm = Bound {
            requests: Some(args.warmup),
            duration: None,
        };
        let phase = run_phase(&plan, warm, 0).await;
        tracing::info!(requests = phase.outcomes.len(), "warmup done");
    }
    let cpu_before = (!args.server_pids.is_empty()).then(|| measure_process_cpu(&args.server_pids));
    let phase = run_phase(&plan, bound, args.warmup).await;
    let cpu = cpu_before.map(|before| {
        let after = measure_process_cpu(&args.server_pids);
        (args.server_pids.clone(), after.saturating_sub(before))
    });
    let (concurrency, request_rate, max_concurrency) = match load {
        Load::Closed { concurrency } => (Some(concurrency), None, None),
        Load::Open {
            rate,
            max_concurrency,
        } => (None, Some(rate), max_concurrency),
    };
    let header = report::Header {
        url: args.url,
        model,
        endpoint: args.endpoint.name().into(),
        stream,
        concurrency,
        request_rate,
        max_concurrency,
        warmup_requests: args.warmup,
    };
    Ok(Report::build(header, &phase.outcomes, phase.elapsed, cpu))
}
