//! CPU cost of the mocker itself in instant mode, per request and per token, so that a
//! pipeline measurement can tell the engine's share from the rest.
//!
//! `cargo run --release -p dynamo-mocker --example instant_cost -- [requests] [concurrency]
//! [prompt_tokens] [max_tokens] [speedup]` (defaults 4000 64 512 64 inf). Runs on one
//! thread, so in instant mode wall time is CPU time. With a finite speedup it shows the
//! timing model instead: mean time to first token and between tokens.

use std::sync::Arc;
use std::time::Instant;

use dynamo_mocker::{MockerConfig, MockerEngine};
use dynamo_protocol::{SamplingOptions, StopConditions, TokenRequest};
use dynamo_runtime::{RequestContext, Service};
use futures::StreamExt;

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let requests = arg(1, 4_000);
    let concurrency = arg(2, 64).max(1);
    let prompt_tokens = arg(3, 512);
    let max_tokens = arg(4, 64) as u32;
    let speedup: f64 = std::env::args()
        .nth(5)
        .and_then(|a| a.parse().ok())
        .unwrap_or(f64::INFINITY);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let engine = Arc::new(MockerEngine::start(MockerConfig {
            speedup,
            ..MockerConfig::default()
        })?);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for worker in 0..concurrency {
            let engine = engine.clone();
            tasks.push(tokio::spawn(async move {
                let (mut tokens, mut ttft, mut itl, mut gaps) = (0usize, 0f64, 0f64, 0usize);
                for r in (worker..requests).step_by(concurrency) {
                    // Half of each prompt is a prefix shared by every request.
                    let prompt: Vec<u32> = (0..prompt_tokens as u32)
                        .map(|t| if t < prompt_tokens as u32 / 2 { 3 + t } else { 3 + (t * 31 + r as u32) % 30_000 })
                        .collect();
                    let req = TokenRequest {
                        model: "mock".into(),
                        token_ids: prompt,
                        sampling: SamplingOptions::default(),
                        stop: StopConditions { max_tokens, stop_token_ids: vec![2], ignore_eos: true },
                    };
                    let sent = Instant::now();
                    let mut last: Option<Instant> = None;
                    let mut stream = engine.call(req, RequestContext::new(r.to_string()));
                    while let Some(delta) = stream.next().await {
                        tokens += delta.map(|d| d.token_ids.len()).unwrap_or(0);
                        let now = Instant::now();
                        match last {
                            None => ttft += (now - sent).as_secs_f64(),
                            Some(prev) => {
                                itl += (now - prev).as_secs_f64();
                                gaps += 1;
                            }
                        }
                        last = Some(now);
                    }
                }
                (tokens, ttft, itl, gaps)
            }));
        }
        let (mut tokens, mut ttft, mut itl, mut gaps) = (0, 0.0, 0.0, 0);
        for t in tasks {
            let (n, a, b, g) = t.await?;
            tokens += n;
            ttft += a;
            itl += b;
            gaps += g;
        }
        let elapsed = started.elapsed();
        let s = engine.stats();
        println!(
            "{requests} requests, {tokens} tokens in {:.3} s: {:.1} µs/request, {:.2} µs/token, {} steps, prefix hits {}/{} prompt tokens",
            elapsed.as_secs_f64(),
            elapsed.as_secs_f64() * 1e6 / requests as f64,
            elapsed.as_secs_f64() * 1e6 / tokens.max(1) as f64,
            s.steps,
            s.prefix_hit_tokens,
            s.prompt_tokens,
        );
        println!(
            "mean time to first token {:.2} ms, mean inter-token gap {:.3} ms, {} preemptions",
            ttft * 1e3 / requests.max(1) as f64,
            itl * 1e3 / gaps.max(1) as f64,
            s.preemptions,
        );
        engine.shutdown().await;
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
