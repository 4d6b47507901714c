//! llama.cpp inside the engine shell, on the real SmolLM2 model: its greedy tokens are
//! llama.cpp's (the golden file made with llama-cpp-python), and batching, chunked
//! prefill, preemption, the prefix cache and a KV hand-off between two engines do not
//! change what a request gets.
//!
//! Tolerance: llama.cpp's result for a position depends in the last bits on the batch it
//! was computed in (matmul kernels by batch size), on the build's SIMD level and on its
//! version. Where the two best tokens are closer than [`NEAR_TIE`] logits, either is a
//! correct greedy choice of this 4-bit model, so two runs may part there and only there:
//! every comparison below allows a divergence only at or after a near-tie of the
//! reference run.

// The preprocessor's test helper that finds the cached model (or skips visibly).
#[path = "../../preprocessor/tests/common/mod.rs"]
mod common;

use std::sync::Arc;

use dynamo_llamacpp::{start, LlamaCppConfig};
use dynamo_mocker::MockerEngine;
use dynamo_protocol::{block_hashes, SamplingOptions, StopConditions, TokenRequest};
use dynamo_runtime::{RequestContext, Service};
use futures::StreamExt;

const NEAR_TIE: f32 = 0.5;

struct Golden {
    name: String,
    prompt: Vec<u32>,
    /// llama-cpp-python's greedy tokens and, per step, the margin to the runner-up.
    greedy: Vec<(u32, f32)>,
}

fn golden() -> Vec<Golden> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../native/tests/data/llamacpp_greedy.json"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("golden")).expect("json");
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect()
    };
    v["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| Golden {
            name: p["name"].as_str().expect("name").to_string(),
            prompt: ids(&p["prompt_ids"]),
            greedy: p["greedy"]
                .as_array()
                .expect("greedy")
                .iter()
                .map(|s| {
                    (
                        s["id"].as_u64().expect("id") as u32,
                        s["margin"].as_f64().expect("margin") as f32,
                    )
                })
                .collect(),
        })
        .collect()
}

fn request(prompt: &[u32], max_tokens: u32) -> TokenRequest {
    TokenRequest {
        model: "smollm2".into(),
        token_ids: prompt.to_vec(),
        sampling: SamplingOptions {
            temperature: 0.0,
            // The two best alternatives: their gap is the step's margin.
            logprobs: Some(2),
            ..SamplingOptions::default()
        },
        stop: StopConditions {
            max_tokens,
            stop_token_ids: Vec::new(),
            ignore_eos: true,
        },
    }
}

/// A request's tokens with each step's margin, and the cached prompt tokens reported.
struct Run {
    steps: Vec<(u32, f32)>,
    cached: u32,
}

impl Run {
    fn tokens(&self) -> Vec<u32> {
        self.steps.iter().map(|s| s.0).collect()
    }
}

async fn run(engine: &MockerEngine, req: TokenRequest) -> Run {
    let mut stream = engine.call(req, RequestContext::new("test"));
    let mut out = Run {
        steps: Vec::new(),
        cached: 0,
    };
    while let Some(delta) = stream.next().await {
        let delta = delta.expect("delta");
        if let Some(c) = delta.cached_tokens {
            out.cached = c;
        }
        assert_eq!(
            delta.logprobs.len(),
            delta.token_ids.len(),
            "one log-prob per token"
        );
        for (t, lp) in delta.token_ids.iter().zip(&delta.logprobs) {
            let margin = match lp.top.as_slice() {
                [a, b, ..] => a.1 - b.1,
                _ => f32::INFINITY,
            };
            out.steps.push((*t, margin));
        }
    }
    out
}

/// `ours` equals `reference` up to the reference's first near-tie (if they part at all).
fn agree(what: &str, reference: &[(u32, f32)], ours: &[u32]) -> bool {
    let theirs: Vec<u32> = reference.iter().map(|s| s.0).collect();
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    match ours.iter().zip(&theirs).position(|(a, b)| a != b) {
        None => true,
        Some(i) => {
            let tie = reference[..=i].iter().position(|s| s.1 < NEAR_TIE);
            assert!(
                tie.is_some_and(|t| t <= i),
                "{what}: diverged at step {i} (ours {:?}, reference {:?}) with no near-tie before",
                &ours[..=i],
                &theirs[..=i]
            );
            false
        }
    }
}

fn config(test: &str) -> Option<LlamaCppConfig> {
    let path = common::model_or_skip(test)?;
    Some(LlamaCppConfig::new(path))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_tokens_are_llama_cpps_own() {
    let Some(mut c) = config("greedy_tokens_are_llama_cpps_own") else {
        return;
    };
    c.enable_prefix_caching = false;
    let engine = start(&c).expect("engine");
    let mut identical = 0;
    for g in golden() {
        let ours = run(&engine, request(&g.prompt, g.greedy.len() as u32)).await;
        if agree(&g.name, &g.greedy, &ours.tokens()) {
            identical += 1;
        }
    }
    eprintln!("llamacpp engine: {identical} of 8 golden prompts identical for all 32 tokens");
    // Measured: 3 of 8 with the baseline x86-64 build (the golden file was made with AVX2),
    // the others parting at a near-tie.
    assert!(identical >= 2, "only {identical} of 8 prompts identical");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_chunked_and_preempted_requests_get_their_solo_tokens() {
    let Some(mut c) = config("batched_chunked_and_preempted_requests_get_their_solo_tokens") else {
        return;
    };
    c.enable_prefix_caching = false;
    let prompts: Vec<Vec<u32>> = golden().into_iter().take(5).map(|g| g.prompt).collect();
    let solo_engine = start(&c).expect("engine");
    let mut solo = Vec::new();
    for p in &prompts {
        solo.push(run(&solo_engine, request(p, 20)).await);
    }
    solo_engine.shutdown().await;

    // Chunks of 48 tokens, and a pool too small for every sequence at once.
    c.max_batched_tokens = 48;
    c.num_blocks = 26;
    let engine = Arc::new(start(&c).expect("engine"));
    let runs = prompts.iter().map(|p| {
        let e = engine.clone();
        let req = request(p, 20);
        tokio::spawn(async move { run(e.as_ref(), req).await.tokens() })
    });
    let together: Vec<Vec<u32>> = futures::future::join_all(runs)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();
    for (i, (s, t)) in solo.iter().zip(&together).enumerate() {
        agree(&format!("prompt {i} batched"), &s.steps, t);
    }
    let stats = engine.stats();
    assert!(
        stats.preemptions > 0,
        "the small pool should have preempted: {stats:?}"
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_and_handed_over_blocks_give_the_same_tokens() {
    let Some(c) = config("cached_and_handed_over_blocks_give_the_same_tokens") else {
        return;
    };
    let prompt = golden().into_iter().nth(4).expect("prompt 4").prompt;
    let full = (prompt.len() / c.block_size * c.block_size) as u32;
    assert!(full >= 64, "a prompt of several blocks");

    let a = start(&c).expect("engine a");
    let first = run(&a, request(&prompt, 24)).await;
    assert_eq!(first.cached, 0);
    // The same prompt again: its blocks come back from the pool into llama.cpp.
    let again = run(&a, request(&prompt, 24)).await;
    assert_eq!(
        again.cached, full,
        "the repeated prompt's full blocks are cached"
    );
    agree("from the prefix cache", &first.steps, &again.tokens());

    // The prompt's blocks, exported as a prefill worker does, into a second engine.
    let hashes = block_hashes(&prompt, c.block_size, a.config().hash_seed);
    let bytes = a.export_blocks(&hashes).await.expect("export");
    assert_eq!(
        bytes.len(),
        hashes.len() * a.kv_layout().bytes_per_block() as usize
    );
    assert!(bytes.iter().any(|&b| b != 0), "exported blocks hold KV");
    let b = start(&LlamaCppConfig {
        worker_id: 1,
        ..c.clone()
    })
    .expect("engine b");
    let imported = b
        .import_blocks(None, &hashes, bytes.clone(), &a.kv_layout())
        .await
        .expect("import");
    assert_eq!(imported as usize, hashes.len());
    let handed = run(&b, request(&prompt, 24)).await;
    assert_eq!(
        handed.cached, full,
        "the decode side found the handed-over blocks"
    );
    agree("after the hand-off", &first.steps, &handed.tokens());
    // Blocks exported by the second engine are the bytes it was given.
    assert_eq!(b.export_blocks(&hashes).await.expect("export b"), bytes);

    // Bytes that are not these blocks' KV change the answer: the imported KV is used.
    let c2 = start(&LlamaCppConfig {
        worker_id: 2,
        ..c.clone()
    })
    .expect("engine c");
    let noise: Vec<u8> = (0..bytes.len())
        .map(|i| (i * 7 % 251) as u8 & 0x3b)
        .collect();
    c2.import_blocks(None, &hashes, noise.clone(), &a.kv_layout())
        .await
        .expect("import noise");
    let garbled = run(&c2, request(&prompt, 24)).await;
    assert_ne!(
        garbled.tokens(),
        first.tokens(),
        "imported KV bytes are not used"
    );
    for e in [a, b, c2] {
        e.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_requests_prefix_is_shared_and_unknown_tokens_are_refused() {
    let Some(c) = config("a_running_requests_prefix_is_shared_and_unknown_tokens_are_refused")
    else {
        return;
    };
    let prompt = golden().into_iter().nth(4).expect("prompt 4").prompt;
    let full = (prompt.len() / c.block_size * c.block_size) as u32;
    let engine = Arc::new(start(&c).expect("engine"));
    let solo = run(&engine, request(&prompt, 24)).await;
    engine.clear_cache();

    // The second request arrives while the first decodes: it finds the first one's blocks
    // cached and takes their KV from the running sequence itself.
    let mut first = engine.call(request(&prompt, 24), RequestContext::new("first"));
    let mut tokens = Vec::new();
    let delta = first.next().await.expect("a first token").expect("delta");
    assert_eq!(delta.cached_tokens, Some(0));
    tokens.extend(delta.token_ids);
    let second = run(&engine, request(&prompt, 24)).await;
    while let Some(delta) = first.next().await {
        tokens.extend(delta.expect("delta").token_ids);
    }
    assert_eq!(
        second.cached, full,
        "the second request found the first's blocks"
    );
    agree("the first of two", &solo.steps, &tokens);
    agree("sharing a running prefix", &solo.steps, &second.tokens());

    // A prompt with an id outside the vocabulary is refused; the engine serves on.
    let mut bad = prompt.clone();
    bad[3] = 1_000_000;
    let mut refused = engine.call(request(&bad, 4), RequestContext::new("bad"));
    let err = refused
        .next()
        .await
        .expect("an answer")
        .expect_err("an unknown token id is refused");
    assert!(err.to_string().contains("1000000"), "{err}");
    let after = run(&engine, request(&prompt, 24)).await;
    agree("after a refused request", &solo.steps, &after.tokens());
}
