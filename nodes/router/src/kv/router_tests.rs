//! The KV router against fake workers: prefix affinity from events, the approximate mode's
//! memory of its own decisions, and the in-flight account over a request's life.

use std::collections::BTreeMap;
use std::time::Duration;

use dynamo_protocol::{block_hashes, KvEvent, KvEventData, StoredBlock, TokenRequest};
use dynamo_runtime::{ErrorKind, RequestContext, Service};

use crate::kv::cost::WorkerLoad;
use crate::kv::{EventOutcome, KvConfig, KvMode};
use crate::test_fakes::{collect, next, set_of, worker, Behaviour, Fake};
use crate::{RouterMode, RouterService};

const BS: usize = 4;

fn config(mode: KvMode) -> KvConfig {
    KvConfig {
        block_size: BS,
        // More shards than this machine may have cores: every lookup merges parts.
        index_shards: 3,
        ..KvConfig::for_mode(mode)
    }
}

fn request(tokens: Vec<u32>) -> TokenRequest {
    TokenRequest {
        token_ids: tokens,
        ..crate::test_fakes::request()
    }
}

/// A prompt of `shared` common tokens followed by `own` tokens unique to `tag`.
fn prompt(shared: u32, own: u32, tag: u32) -> Vec<u32> {
    (0..shared)
        .chain((0..own).map(|i| 1_000_000 * (tag + 1) + i))
        .collect()
}

fn stored(worker: u64, event_id: u64, tokens: &[u32]) -> KvEvent {
    let blocks = block_hashes(tokens, BS, KvConfig::default().hash_seed)
        .into_iter()
        .map(|hash| StoredBlock { hash })
        .collect();
    KvEvent {
        worker_id: worker,
        event_id,
        data: KvEventData::Stored {
            parent: None,
            blocks,
        },
    }
}

#[tokio::test]
async fn requests_sharing_a_long_prefix_land_on_the_worker_that_holds_it() {
    let fakes = [1, 2, 3].map(|id| Fake::new(id, Behaviour::Stream(2)));
    let router = RouterService::with_kv(
        KvMode::Events,
        config(KvMode::Events),
        set_of(&fakes.each_ref()),
    )
    .expect("valid config");
    let kv = router.kv_handle().expect("a KV router has a handle");
    let held = prompt(64, 0, 0);
    assert_eq!(kv.apply_event(stored(2, 0, &held)), EventOutcome::Applied);

    let mut seen = BTreeMap::new();
    for i in 0..10 {
        let items = collect(router.call(request(prompt(64, 8, i)), RequestContext::new("r"))).await;
        *seen.entry(worker(&items[0])).or_insert(0) += 1;
    }
    assert_eq!(seen, BTreeMap::from([(2, 10)]));
    let m = kv.metrics();
    assert_eq!(m.requests, 10);
    assert_eq!(m.kv_prompt_blocks_total, 10 * 18);
    assert_eq!(m.kv_hit_blocks_total, 10 * 16);
    assert_eq!(m.events_applied_total, 1);
    assert_eq!(
        m.routing_overhead_us_buckets.iter().sum::<u64>(),
        10,
        "every request in one bucket"
    );
    assert_eq!(m.chosen_total, vec![(2, 10)], "the chosen worker, counted");
    // 16 blocks of overlap each: the (8, 16] bucket.
    assert_eq!(
        m.overlap_blocks_buckets[5], 10,
        "{:?}",
        m.overlap_blocks_buckets
    );

    // Unrelated prompts spread over the idle workers: no worker is favoured by cost.
    let mut spread = BTreeMap::new();
    for i in 0..30 {
        let items =
            collect(router.call(request(prompt(0, 32, 100 + i)), RequestContext::new("u"))).await;
        *spread.entry(worker(&items[0])).or_insert(0) += 1;
    }
    assert_eq!(spread.len(), 3, "{spread:?}");
    let chosen = kv.metrics().chosen_total;
    let total: u64 = chosen.iter().map(|c| c.1).sum();
    assert_eq!((chosen.len(), total), (3, 40), "{chosen:?}");
}

#[tokio::test]
async fn a_busy_holder_loses_to_an_idle_worker_once_its_load_outweighs_the_hit() {
    let fakes = [1, 2].map(|id| Fake::new(id, Behaviour::HangAfter(1)));
    // Weight 1: a block to prefill weighs as much as a block held for decode.
    let config = KvConfig {
        overlap_weight: 1.0,
        ..config(KvMode::Events)
    };
    let router = RouterService::with_kv(KvMode::Events, config, set_of(&fakes.each_ref()))
        .expect("valid config");
    let kv = router.kv_handle().expect("handle");
    kv.apply_event(stored(1, 0, &prompt(32, 0, 0)));
    // A held request keeps its 9 blocks on its worker for decode; the hit saves 8.
    let mut held = Vec::new();
    let mut picks = Vec::new();
    for i in 0..2 {
        let mut s = router.call(request(prompt(32, 4, i)), RequestContext::new("h"));
        picks.push(next(&mut s).await.as_ref().map(worker));
        held.push(s);
    }
    assert_eq!(picks, vec![Some(1), Some(2)]);
}

/// Where two requests sharing the prefix worker 1 holds go, with both still prefilling
/// (their workers never answer): the second has worker 1's queue to wait behind.
async fn second_of_two_prefilling(weight_queue_tokens: u64) -> (u64, u64) {
    let fakes = [1, 2].map(|id| Fake::new(id, Behaviour::HangAfter(0)));
    let config = KvConfig {
        overlap_weight: 1.0,
        weight_queue_tokens,
        ..config(KvMode::Events)
    };
    let router = RouterService::with_kv(KvMode::Events, config, set_of(&fakes.each_ref()))
        .expect("valid config");
    let kv = router.kv_handle().expect("handle");
    kv.apply_event(stored(1, 0, &prompt(32, 0, 0)));
    let mut held = Vec::new();
    for i in 0..2 {
        let mut s = router.call(request(prompt(32, 4, i)), RequestContext::new("q"));
        // Nothing comes back; polling once routes and dispatches it.
        let _ = tokio::time::timeout(Duration::from_millis(50), next(&mut s)).await;
        held.push(s);
    }
    (kv.load_of(1).requests, kv.load_of(2).requests)
}

#[tokio::test]
async fn a_prefill_queue_raises_the_weight_of_a_cache_hit() {
    // Fixed weight 1: worker 1 costs 1 × (1 new + 1 queued) + 9 held = 11 for the
    // second request, worker 2 costs 1 × 9 new = 9: the hit loses to the idle worker.
    assert_eq!(second_of_two_prefilling(0).await, (1, 1));
    // With 1 block (4 tokens) queued over 2 workers and `weight_queue_tokens` 1, the
    // weight in effect is 1 × (1 + 2 / 1) = 3: worker 1 costs 3 × 2 + 9 = 15, worker 2
    // 3 × 9 = 27, so the request waits behind the short queue and keeps its hit.
    assert_eq!(second_of_two_prefilling(1).await, (2, 0));
    // The queue is counted in tokens and averaged over the workers: at 4 the weight is
    // 1.5 (12 against 13.5: worker 1), at 8 it is 1.25 (11.5 against 11.25: worker 2).
    // Blocks instead of tokens, or a sum instead of the mean, flip one of the two.
    assert_eq!(second_of_two_prefilling(4).await, (2, 0));
    assert_eq!(second_of_two_prefilling(8).await, (1, 1));
}

#[test]
fn the_weight_in_effect_grows_with_the_queue_only_when_asked() {
    use crate::kv::config::effective_weight;
    let fixed = KvConfig {
        overlap_weight: 8.0,
        weight_queue_tokens: 0,
        ..KvConfig::default()
    };
    assert_eq!(effective_weight(&fixed, 10_000.0), 8.0);
    let scaled = KvConfig {
        weight_queue_tokens: 2048,
        ..fixed
    };
    assert_eq!(effective_weight(&scaled, 0.0), 8.0);
    assert_eq!(effective_weight(&scaled, 2048.0), 16.0);
    assert_eq!(effective_weight(&scaled, 1024.0), 12.0);
    assert_eq!(effective_weight(&scaled, -5.0), 8.0, "no queue below empty");
}

#[tokio::test]
async fn the_in_flight_account_follows_first_token_and_end() {
    let fake = Fake::new(7, Behaviour::HangAfter(1));
    let router = RouterService::with_kv(KvMode::Events, config(KvMode::Events), set_of(&[&fake]))
        .expect("valid config");
    let kv = router.kv_handle().expect("handle");
    let mut s = router.call(request((0..10).collect()), RequestContext::new("r"));
    // Dispatched: 3 prompt blocks (the partial one too) pending prefill and held.
    let dispatched = WorkerLoad {
        prefill_blocks: 3,
        decode_blocks: 3,
        requests: 1,
    };
    assert_eq!(kv.load_of(7), dispatched);
    assert!(next(&mut s).await.is_some());
    assert_eq!(
        kv.load_of(7).prefill_blocks,
        0,
        "prefill done at the first token"
    );
    assert_eq!(kv.load_of(7).decode_blocks, 3);
    drop(s);
    assert_eq!(kv.load_of(7), WorkerLoad::default());

    // A failure releases it too.
    let failing = Fake::new(8, Behaviour::FailAfter(0, ErrorKind::Internal));
    let router =
        RouterService::with_kv(KvMode::Events, config(KvMode::Events), set_of(&[&failing]))
            .expect("valid config");
    let kv = router.kv_handle().expect("handle");
    let items = collect(router.call(request((0..10).collect()), RequestContext::new("f"))).await;
    assert!(items[0].is_err());
    assert_eq!(kv.load_of(8), WorkerLoad::default());
}

#[tokio::test]
async fn a_retry_moves_the_account_and_the_prediction() {
    let dead = Fake::new(1, Behaviour::FailAfter(0, ErrorKind::Unavailable));
    let alive = Fake::new(2, Behaviour::HangAfter(1));
    let router = RouterService::with_kv(
        KvMode::Events,
        config(KvMode::Events),
        set_of(&[&dead, &alive]),
    )
    .expect("valid config");
    let kv = router.kv_handle().expect("handle");
    let tokens = prompt(16, 0, 0);
    // Worker 1 holds the prefix, so it is chosen; it is dead, so the request moves to 2.
    kv.apply_event(stored(1, 0, &tokens));
    let mut s = router.call(request(tokens.clone()), RequestContext::new("r"));
    assert_eq!(next(&mut s).await.as_ref().map(worker), Some(2));
    assert_eq!(kv.load_of(1), WorkerLoad::default());
    assert_eq!(kv.load_of(2).decode_blocks, 4);
    assert_eq!(kv.overlaps(&tokens).sorted(), vec![(1, 4), (2, 4)]);
}

#[tokio::test]
async fn approx_mode_remembers_its_decisions() {
    let fakes = [1, 2, 3, 4].map(|id| Fake::new(id, Behaviour::HangAfter(1)));
    let config = KvConfig {
        block_size: 16,
        overlap_weight: 2.0,
        ..KvConfig::for_mode(KvMode::Approx)
    };
    let router = RouterService::with_kv(KvMode::Approx, config, set_of(&fakes.each_ref()))
        .expect("valid config");
    // Each conversation grows by one block a turn; its streams stay open, so the load
    // pushes the next conversation elsewhere while the cache pulls its turns together.
    let mut held = Vec::new();
    let mut firsts = BTreeMap::new();
    for conversation in 0..4u32 {
        let mut turns = Vec::new();
        for turn in 0..3 {
            let tokens = prompt(0, 80 + 16 * turn, conversation);
            let mut s = router.call(request(tokens), RequestContext::new("t"));
            turns.push(next(&mut s).await.as_ref().map(worker));
            held.push(s);
        }
        assert!(
            turns.iter().all(|&w| w == turns[0]),
            "one conversation, one worker: {turns:?}"
        );
        firsts.insert(turns[0], conversation);
    }
    assert_eq!(firsts.len(), 4, "conversations spread: {firsts:?}");
}

#[test]
fn kv_modes_built_from_the_mode_have_a_handle_with_their_defaults() {
    let fake = Fake::new(1, Behaviour::Stream(1));
    let approx = RouterService::new(RouterMode::KvApprox, set_of(&[&fake]));
    let kv = approx.kv_handle().expect("a kv-approx router has a handle");
    assert_eq!(kv.mode(), KvMode::Approx);
    assert_eq!(kv.config().ttl, Duration::from_secs(120));
    let exact = RouterService::new(RouterMode::Kv, set_of(&[&fake]));
    assert_eq!(
        exact.kv_handle().map(|h| h.config().ttl),
        Some(Duration::from_secs(2))
    );
    let named = exact.named("r").retry_unavailable(false);
    assert!(named.kv_handle().is_some(), "builders keep the handle");
    assert!(RouterService::new(RouterMode::RoundRobin, set_of(&[&fake]))
        .kv_handle()
        .is_none());
    let bad = KvConfig {
        block_size: 0,
        ..KvConfig::default()
    };
    assert!(RouterService::with_kv(KvMode::Events, bad, set_of(&[&fake])).is_err());
}

#[tokio::test]
async fn pending_prefill_is_the_part_the_worker_did_not_hold() {
    let fake = Fake::new(7, Behaviour::HangAfter(1));
    let router = RouterService::with_kv(KvMode::Events, config(KvMode::Events), set_of(&[&fake]))
        .expect("valid config");
    let kv = router.kv_handle().expect("handle");
    kv.apply_event(stored(7, 0, &prompt(32, 0, 0)));
    // 40 tokens = 10 blocks, the first 8 cached: 2 blocks to prefill, all 10 held.
    let mut s = router.call(request(prompt(32, 8, 1)), RequestContext::new("c"));
    assert_eq!(
        kv.load_of(7),
        WorkerLoad {
            prefill_blocks: 2,
            decode_blocks: 10,
            requests: 1,
        }
    );
    assert!(next(&mut s).await.is_some());
    assert_eq!(kv.load_of(7).prefill_blocks, 0);
    drop(s);
    assert_eq!(kv.load_of(7), WorkerLoad::default());
}
