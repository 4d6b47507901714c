//! The native model inside the engine shell: continuous batching, chunked prefill,
//! preemption and prefix caching must not change what a request gets.

// The preprocessor's test helper that finds the cached model (or skips visibly).
#[path = "../../preprocessor/tests/common/mod.rs"]
mod common;

use dynamo_native::{start, NativeConfig};
use dynamo_protocol::{SamplingOptions, StopConditions, TokenRequest};
use dynamo_runtime::{RequestContext, Service};
use futures::StreamExt;
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    prompts: Vec<Prompt>,
}

#[derive(Deserialize)]
struct Prompt {
    prompt_ids: Vec<u32>,
}

fn prompts() -> Vec<Vec<u32>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/llamacpp_greedy.json"
    );
    let g: Golden =
        serde_json::from_str(&std::fs::read_to_string(path).expect("golden")).expect("json");
    g.prompts.into_iter().map(|p| p.prompt_ids).collect()
}

fn request(prompt: &[u32], max_tokens: u32, sampling: SamplingOptions) -> TokenRequest {
    TokenRequest {
        model: "smollm2".into(),
        token_ids: prompt.to_vec(),
        sampling,
        stop: StopConditions {
            max_tokens,
            stop_token_ids: Vec::new(),
            ignore_eos: true,
        },
    }
}

fn greedy() -> SamplingOptions {
    SamplingOptions {
        temperature: 0.0,
        ..SamplingOptions::default()
    }
}

/// The tokens of one request, and the cached prompt tokens its first delta reported.
async fn run(
    engine: &dyn Service<TokenRequest, dynamo_protocol::TokenDelta>,
    req: TokenRequest,
) -> (Vec<u32>, u32) {
    let mut stream = engine.call(req, RequestContext::new("test"));
    let (mut tokens, mut cached) = (Vec::new(), 0);
    while let Some(delta) = stream.next().await {
        let delta = delta.expect("delta");
        if let Some(c) = delta.cached_tokens {
            cached = c;
        }
        tokens.extend(delta.token_ids);
    }
    (tokens, cached)
}

fn config(test: &str) -> Option<NativeConfig> {
    let path = common::model_or_skip(test)?;
    let mut c = NativeConfig::new(path);
    c.enable_prefix_caching = false;
    Some(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_chunked_and_preempted_requests_get_their_solo_tokens() {
    let Some(mut c) = config("batched_chunked_and_preempted_requests_get_their_solo_tokens") else {
        return;
    };
    let prompts: Vec<Vec<u32>> = prompts().into_iter().take(5).collect();
    let solo_engine = start(&c).expect("engine");
    let mut solo = Vec::new();
    for p in &prompts {
        solo.push(run(&solo_engine, request(p, 20, greedy())).await.0);
    }
    solo_engine.shutdown().await;

    // Chunks of 48 tokens, and a pool too small for every sequence at once.
    c.max_batched_tokens = 48;
    c.num_blocks = 26;
    let engine = std::sync::Arc::new(start(&c).expect("engine"));
    let runs = prompts.iter().map(|p| {
        let e = engine.clone();
        let req = request(p, 20, greedy());
        tokio::spawn(async move { run(e.as_ref(), req).await.0 })
    });
    let together: Vec<Vec<u32>> = futures::future::join_all(runs)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();
    let stats = engine.stats();
    assert_eq!(together, solo, "batching changed a request's tokens");
    assert!(
        stats.preemptions > 0,
        "the small pool should have preempted: {stats:?}"
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_repeats_and_a_repeated_prompt_hits_the_cache() {
    let Some(mut c) = config("seeded_sampling_repeats_and_a_repeated_prompt_hits_the_cache") else {
        return;
    };
    c.enable_prefix_caching = true;
    let engine = start(&c).expect("engine");
    let prompt = &prompts()[4];
    let sampled = |seed| SamplingOptions {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(seed),
        ..SamplingOptions::default()
    };
    let (a, cached_a) = run(&engine, request(prompt, 24, sampled(42))).await;
    let (b, cached_b) = run(&engine, request(prompt, 24, sampled(42))).await;
    let (other, _) = run(&engine, request(prompt, 24, sampled(7))).await;
    assert_eq!(a, b, "the same seed gave different tokens");
    assert_ne!(a, other, "different seeds gave the same 24 tokens");
    assert_eq!(cached_a, 0);
    let full = (prompt.len() / 16 * 16) as u32;
    assert!(
        cached_b + 16 >= full,
        "the repeated prompt found {cached_b} of {} tokens cached",
        prompt.len()
    );
    engine.shutdown().await;
}
