//! The mocker engine through its public edge: `Service<TokenRequest, TokenDelta>`.

use std::time::Duration;

use dynamo_mocker::{EngineError, MockerConfig, MockerEngine, MockerStats};
use dynamo_protocol::{
    block_hashes, FinishReason, KvEventData, SamplingOptions, StopConditions, TokenDelta,
    TokenRequest,
};
use dynamo_runtime::{ErrorKind, RequestContext, ServeError, Service};
use futures::StreamExt;

fn request(prompt: Vec<u32>, max_tokens: u32) -> TokenRequest {
    TokenRequest {
        model: "mock".into(),
        token_ids: prompt,
        sampling: SamplingOptions::default(),
        stop: StopConditions {
            max_tokens,
            stop_token_ids: vec![2],
            ignore_eos: true,
        },
    }
}

async fn collect(engine: &MockerEngine, req: TokenRequest) -> Vec<Result<TokenDelta, ServeError>> {
    engine
        .call(req, RequestContext::new("test"))
        .collect()
        .await
}

/// Waits (bounded) until the engine's counters satisfy `cond`.
async fn wait_for(engine: &MockerEngine, cond: impl Fn(&MockerStats) -> bool) -> MockerStats {
    for _ in 0..2_000 {
        let s = engine.stats();
        if cond(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("condition never held: {:?}", engine.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_64_concurrent_requests_in_instant_mode() {
    let engine = std::sync::Arc::new(MockerEngine::start(MockerConfig::instant()).unwrap());
    let mut tasks = Vec::new();
    for i in 0..64u32 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let max_tokens = 20 + i;
            let prompt: Vec<u32> = (0..100 + i).map(|t| 3 + (t * 7 + i) % 1000).collect();
            let deltas = collect(&engine, request(prompt, max_tokens)).await;
            (max_tokens, deltas)
        }));
    }
    for task in tasks {
        let (max_tokens, deltas) = task.await.unwrap();
        let deltas: Vec<TokenDelta> = deltas.into_iter().map(Result::unwrap).collect();
        let n: usize = deltas.iter().map(|d| d.token_ids.len()).sum();
        assert_eq!(n, max_tokens as usize);
        assert!(deltas[0].cached_tokens.is_some());
        assert!(deltas[1..].iter().all(|d| d.cached_tokens.is_none()));
        let last = deltas.last().unwrap();
        assert_eq!(last.finish_reason, Some(FinishReason::Length));
        assert!(deltas[..deltas.len() - 1]
            .iter()
            .all(|d| d.finish_reason.is_none()));
        assert!(deltas
            .iter()
            .flat_map(|d| &d.token_ids)
            .all(|&t| (3..32_000).contains(&t)));
    }
    let s = wait_for(&engine, |s| s.running == 0 && s.waiting == 0).await;
    assert_eq!(s.blocks_active, 0, "{s:?}");
    assert_eq!(s.blocks_cached + s.blocks_free, s.blocks_total);
    assert_eq!(s.prompt_tokens, (0..64).map(|i| 100 + i).sum::<u64>());
    engine.shutdown().await;
}

#[tokio::test]
async fn a_repeated_prefix_is_served_from_the_cache_and_announced() {
    let engine = MockerEngine::start(MockerConfig::instant()).unwrap();
    let mut events = engine.subscribe_events();
    let prompt: Vec<u32> = (1_000..1_040).collect(); // 2 full blocks of 16 and 8 more
    let first = collect(&engine, request(prompt.clone(), 4)).await;
    assert_eq!(first[0].as_ref().unwrap().cached_tokens, Some(0));
    let second = collect(&engine, request(prompt.clone(), 4)).await;
    assert_eq!(second[0].as_ref().unwrap().cached_tokens, Some(32));
    assert_eq!(engine.stats().prefix_hit_tokens, 32);

    // The router's view: the prompt's blocks, chained, stored once.
    let expected = block_hashes(&prompt, 16, engine.config().hash_seed);
    let event = events.recv().await.unwrap();
    assert_eq!(event.event_id, 0);
    assert_eq!(event.worker_id, engine.config().worker_id);
    match event.data {
        KvEventData::Stored { parent, blocks } => {
            assert_eq!(parent, None);
            let hashes: Vec<u64> = blocks.iter().map(|b| b.hash).collect();
            assert_eq!(hashes, expected);
        }
        other => panic!("expected Stored, got {other:?}"),
    }
}

#[tokio::test]
async fn the_same_seed_gives_the_same_tokens() {
    let engine = MockerEngine::start(MockerConfig::instant()).unwrap();
    let seeded = |seed| {
        let mut r = request(vec![5; 10], 12);
        r.sampling.seed = Some(seed);
        r
    };
    let ids = |deltas: Vec<Result<TokenDelta, ServeError>>| -> Vec<u32> {
        deltas
            .into_iter()
            .flat_map(|d| d.unwrap().token_ids)
            .collect()
    };
    let a = ids(collect(&engine, seeded(7)).await);
    let b = ids(collect(&engine, seeded(7)).await);
    let c = ids(collect(&engine, seeded(8)).await);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[tokio::test]
async fn cancelling_mid_stream_frees_every_block() {
    // Real time, so the request is still running when it is cancelled.
    let engine = MockerEngine::start(MockerConfig {
        speedup: 10.0,
        ..MockerConfig::default()
    })
    .unwrap();
    let ctx = RequestContext::new("cancel-me");
    let mut stream = engine.call(request((3..300).collect(), 10_000), ctx.clone());
    for _ in 0..3 {
        let d = stream.next().await.unwrap().unwrap();
        assert_eq!(d.finish_reason, None);
    }
    assert!(engine.stats().blocks_active > 0);
    ctx.cancel();
    let last = stream.next().await.unwrap().unwrap();
    assert_eq!(last.finish_reason, Some(FinishReason::Cancelled));
    assert!(stream.next().await.is_none());
    let s = wait_for(&engine, |s| s.blocks_active == 0).await;
    assert_eq!((s.running, s.waiting), (0, 0));
}

#[tokio::test]
async fn a_cancelled_request_is_dropped_even_if_nobody_polls_its_stream() {
    let engine = MockerEngine::start(MockerConfig {
        speedup: 10.0,
        ..MockerConfig::default()
    })
    .unwrap();
    let ctx = RequestContext::new("cancel-me");
    let mut stream = engine.call(request((3..300).collect(), 10_000), ctx.clone());
    stream.next().await.unwrap().unwrap();
    ctx.cancel();
    let s = wait_for(&engine, |s| s.blocks_active == 0).await;
    assert_eq!((s.running, s.waiting), (0, 0));
    // The stream, polled at last, says why it ended.
    let last = stream.next().await.unwrap().unwrap();
    assert_eq!(last.finish_reason, Some(FinishReason::Cancelled));
}

#[tokio::test]
async fn a_cancelled_waiting_request_leaves_the_queue() {
    let engine = MockerEngine::start(MockerConfig {
        speedup: 10.0,
        max_num_seqs: 1,
        ..MockerConfig::default()
    })
    .unwrap();
    let mut running = engine.call(
        request((3..300).collect(), 10_000),
        RequestContext::new("a"),
    );
    running.next().await.unwrap().unwrap();
    let ctx = RequestContext::new("b");
    let _waiting = engine.call(request((400..500).collect(), 10), ctx.clone());
    wait_for(&engine, |s| s.waiting == 1).await;
    ctx.cancel();
    let s = wait_for(&engine, |s| s.waiting == 0).await;
    assert_eq!(s.running, 1);
}

#[tokio::test]
async fn dropping_the_stream_frees_every_block() {
    let engine = MockerEngine::start(MockerConfig {
        speedup: 10.0,
        ..MockerConfig::default()
    })
    .unwrap();
    let mut stream = engine.call(
        request((3..300).collect(), 10_000),
        RequestContext::new("x"),
    );
    stream.next().await.unwrap().unwrap();
    assert!(engine.stats().blocks_active > 0);
    drop(stream);
    let s = wait_for(&engine, |s| s.blocks_active == 0).await;
    assert_eq!((s.running, s.waiting), (0, 0));
}

#[tokio::test]
async fn requests_that_can_never_fit_are_rejected_as_invalid() {
    let engine = MockerEngine::start(MockerConfig {
        num_blocks: 4,
        ..MockerConfig::instant()
    })
    .unwrap();
    let out = collect(&engine, request(vec![9; 65], 1)).await;
    assert_eq!(out.len(), 1);
    let err = out[0].as_ref().unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidRequest);
    assert!(err.message.contains("never fit"), "{}", err.message);
    let out = collect(&engine, request(vec![9; 8], 0)).await;
    assert_eq!(out[0].as_ref().unwrap_err().kind, ErrorKind::InvalidRequest);
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable() {
    let engine = MockerEngine::start(MockerConfig::default()).unwrap();
    let mut stream = engine.call(request(vec![9; 30], 10_000), RequestContext::new("x"));
    stream.next().await.unwrap().unwrap();
    engine.shutdown().await;
    let mut last = None;
    while let Some(item) = stream.next().await {
        last = Some(item);
    }
    assert_eq!(last.unwrap().unwrap_err().kind, ErrorKind::Unavailable);
    let refused = collect(&engine, request(vec![9; 30], 1)).await;
    assert_eq!(
        refused[0].as_ref().unwrap_err().kind,
        ErrorKind::Unavailable
    );
}

#[tokio::test]
async fn invalid_settings_are_refused_at_start() {
    let err = MockerEngine::start(MockerConfig {
        block_size: 0,
        speedup: 0.0,
        ..MockerConfig::default()
    })
    .err()
    .unwrap();
    let EngineError::Config(errors) = &err else {
        panic!("{err}");
    };
    assert_eq!(errors.len(), 2);
    assert!(err.to_string().contains("block_size"), "{err}");
}

#[test]
fn starting_outside_a_runtime_is_an_error_not_a_panic() {
    let err = MockerEngine::start(MockerConfig::default()).err().unwrap();
    assert_eq!(err, EngineError::NoRuntime);
}

fn apply(view: &mut std::collections::BTreeSet<u64>, data: &KvEventData) {
    match data {
        KvEventData::Stored { blocks, .. } => view.extend(blocks.iter().map(|b| b.hash)),
        KvEventData::Removed { blocks } => {
            for h in blocks {
                view.remove(h);
            }
        }
        KvEventData::Cleared => view.clear(),
    }
}

/// A router that subscribes late: a snapshot, then the events after it, track the cache
/// exactly (checked against a second snapshot), evictions and a reset included.
#[tokio::test]
async fn a_late_subscriber_catches_up_with_a_snapshot() {
    let engine = MockerEngine::start(MockerConfig {
        num_blocks: 24,
        block_size: 4,
        ..MockerConfig::instant()
    })
    .unwrap();
    let prompt = |k: u32| (0..30).map(|t| 10 + k * 100 + t).collect::<Vec<u32>>();
    for k in 0..3 {
        collect(&engine, request(prompt(k), 5)).await;
    }
    let mut events = engine.subscribe_events();
    let snap = engine.kv_snapshot().await.unwrap();
    let mut view = std::collections::BTreeSet::new();
    for e in &snap.events {
        apply(&mut view, e);
    }
    assert!(!view.is_empty());
    // More traffic: the pool of 24 blocks must evict to serve it.
    for k in 3..6 {
        collect(&engine, request(prompt(k), 5)).await;
    }
    engine.clear_cache();
    collect(&engine, request(prompt(0), 5)).await;
    let after = engine.kv_snapshot().await.unwrap();
    let last = snap.last_event_id.unwrap();
    let mut saw_removed = false;
    while let Ok(e) = events.try_recv() {
        if e.event_id > last {
            saw_removed |= matches!(e.data, KvEventData::Removed { .. });
            apply(&mut view, &e.data);
        }
    }
    assert!(saw_removed, "the workload should evict");
    let mut expected = std::collections::BTreeSet::new();
    for e in &after.events {
        apply(&mut expected, e);
    }
    assert_eq!(view, expected);
    assert!(!expected.is_empty());
}

/// `device = "cuda"`: the KV pool goes on GPU 0. Where there is none, the engine does not
/// start, and says why; where there is one, the pool is exported for CUDA IPC.
#[tokio::test]
async fn a_kv_pool_on_a_gpu_starts_only_where_there_is_one() {
    let config = MockerConfig {
        kv_on_gpu: true,
        num_blocks: 64,
        ..MockerConfig::default()
    };
    let gpus = dynamo_runtime::kv_transfer::cuda::device_count().unwrap_or(0);
    match MockerEngine::start(config) {
        Ok(engine) => {
            assert!(gpus > 0, "a GPU pool started without a GPU");
            let name = engine.gpu_pool().expect("the pool's export name");
            assert!(name.starts_with("dynamo-kv-cuda-"), "{name}");
        }
        Err(e) => {
            assert_eq!(gpus, 0, "a GPU was there, yet: {e}");
            let text = e.to_string();
            assert!(
                text.contains("device = \"cuda\"") && text.contains("CUDA"),
                "{text}"
            );
        }
    }
}
