//! The disaggregated router against fake prefill and decode workers.

use std::sync::Arc;
use std::time::Duration;

use dynamo_protocol::{PrefillRequest, PrefillResult, TokenDelta, TokenRequest};
use dynamo_runtime::{ErrorKind, InstanceSet, RequestContext, ResponseStream, Service};
use futures::StreamExt;

use super::fake_prefill::{prefill_set, FakePrefill, Prefill};
use crate::test_fakes::{collect, next, set_of, worker, Behaviour, Fake, WAIT};
use crate::{DisaggConfig, DisaggMetrics, DisaggRouter, LeastLoaded, RoundRobin};

/// How long a test waits to see that something does *not* happen.
const QUIET: Duration = Duration::from_millis(100);

fn request(tokens: usize) -> TokenRequest {
    TokenRequest {
        token_ids: (1..=tokens as u32).collect(),
        ..crate::test_fakes::request()
    }
}

fn router(
    config: DisaggConfig,
    prefill: Arc<InstanceSet<PrefillRequest, PrefillResult>>,
    decode: Arc<InstanceSet<TokenRequest, TokenDelta>>,
) -> DisaggRouter {
    DisaggRouter::new(
        config,
        prefill,
        Arc::new(RoundRobin::default()),
        decode,
        Arc::new(LeastLoaded::default()),
    )
    .named("r1")
}

fn always() -> DisaggConfig {
    DisaggConfig::default()
}

/// Whether the stream stays silent for [`QUIET`].
async fn stays_pending(stream: &mut ResponseStream<TokenDelta>) -> bool {
    tokio::time::timeout(QUIET, stream.next()).await.is_err()
}

async fn cancelled_within_wait(ctx: &RequestContext) -> bool {
    tokio::time::timeout(WAIT, ctx.cancelled()).await.is_ok()
}

/// The decision counters add up to the requests (none left undecided).
fn assert_adds_up(m: &DisaggMetrics) {
    let decided = m.prefill_total
        + m.local_prefill_total
        + m.fallback_total
        + m.prefill_errors_total
        + m.rejected_total
        + m.cancelled_total;
    assert_eq!(decided, m.requests_total, "{m:?}");
}

#[tokio::test]
async fn prefills_on_p_then_streams_from_d_with_the_same_request() {
    let (p, open) = FakePrefill::gated(10);
    let d = Fake::new(1, Behaviour::Stream(3));
    let r = router(always(), prefill_set(&[&p]), set_of(&[&d]));
    let req = request(8);
    let trace = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned());
    let ctx = RequestContext::new("req-7").with_traceparent(trace.clone());
    let mut stream = r.call(req.clone(), ctx);

    // P is working: nothing from D yet, and D's slot is already held.
    assert!(stays_pending(&mut stream).await);
    assert_eq!(p.calls().len(), 1);
    assert_eq!(d.calls(), 0, "decode must wait for the prefill result");
    assert_eq!(r.decode_stats(), vec![(1, 1, 0)], "held, not yet sent");
    assert_eq!(r.prefill_stats(), vec![(10, 1, 1)]);

    let _ = open.send(());
    let items = collect(stream).await;
    assert_eq!(items.len(), 3);
    assert!(items.iter().all(|i| worker(i) == 1));

    let (sent, p_ctx) = p.calls().remove(0);
    assert_eq!(
        sent,
        PrefillRequest {
            request: req.clone(),
            handoff_id: "req-7".into(),
            decode_instance: 1,
        }
    );
    assert_eq!(p_ctx.request_id, "req-7");
    assert_eq!(
        p_ctx.traceparent, trace,
        "the trace travels to the prefill worker"
    );
    assert!(
        !p_ctx.is_cancelled(),
        "a prefill that answered is not cancelled"
    );
    assert_eq!(d.requests(), vec![req]);
    assert_eq!(d.contexts()[0].request_id, "req-7");
    assert_eq!(
        r.decode_stats(),
        vec![(1, 0, 1)],
        "routed once, slot released"
    );
    assert_eq!(r.prefill_stats(), vec![(10, 0, 1)]);
    let m = r.metrics();
    assert_eq!((m.requests_total, m.prefill_total), (1, 1));
    assert_eq!(m.prefill_latency_us_buckets.iter().sum::<u64>(), 1);
    assert_adds_up(&m);
}

#[tokio::test]
async fn decode_goes_to_the_least_loaded_worker_and_p_is_told_which() {
    let p = FakePrefill::new(10, Prefill::Answer);
    let busy = Fake::new(1, Behaviour::HangAfter(1));
    let idle = Fake::new(2, Behaviour::HangAfter(1));
    let r = router(always(), prefill_set(&[&p]), set_of(&[&busy, &idle]));
    let mut held = Vec::new();
    for i in 0..3 {
        let mut s = r.call(request(4), RequestContext::new(format!("q{i}")));
        next(&mut s).await;
        held.push(s);
    }
    // 1 and 2 hold requests 2:1 or 1:2; the next goes to the one with fewer.
    let stats = r.decode_stats();
    let least = if stats[0].1 < stats[1].1 { 1 } else { 2 };
    let mut s = r.call(request(4), RequestContext::new("q3"));
    assert_eq!(next(&mut s).await.as_ref().map(worker), Some(least));
    let last = p.calls().pop().map(|(req, _)| req.decode_instance);
    assert_eq!(last, Some(least));
}

#[tokio::test]
async fn short_prompts_are_prefilled_by_the_decode_worker() {
    let p = FakePrefill::new(10, Prefill::Answer);
    let d = Fake::new(1, Behaviour::Stream(2));
    let config = DisaggConfig {
        prefill_threshold: 4,
        enforce: true,
        ..DisaggConfig::default()
    };
    let r = router(config, prefill_set(&[&p]), set_of(&[&d]));
    assert_eq!(
        collect(r.call(request(3), RequestContext::new("a")))
            .await
            .len(),
        2
    );
    assert!(p.calls().is_empty(), "3 < 4 tokens: no prefill worker");
    // At the threshold the prompt goes to the prefill worker.
    assert_eq!(
        collect(r.call(request(4), RequestContext::new("b")))
            .await
            .len(),
        2
    );
    assert_eq!(p.calls().len(), 1);
    let m = r.metrics();
    assert_eq!((m.local_prefill_total, m.prefill_total), (1, 1));
    assert_adds_up(&m);
}

#[tokio::test]
async fn a_dead_prefill_worker_is_replaced_by_another() {
    let dead = FakePrefill::new(10, Prefill::Fail(ErrorKind::Unavailable));
    let alive = FakePrefill::new(11, Prefill::Answer);
    let d = Fake::new(1, Behaviour::Stream(2));
    let r = router(always(), prefill_set(&[&dead, &alive]), set_of(&[&d]));
    // Round-robin starts at the lowest id: the dead one.
    let items = collect(r.call(request(8), RequestContext::new("x"))).await;
    assert_eq!(items.len(), 2);
    assert!(items.iter().all(|i| worker(i) == 1));
    assert_eq!((dead.calls().len(), alive.calls().len()), (1, 1));
    assert_eq!(alive.calls()[0].0.handoff_id, "x");
    let m = r.metrics();
    assert_eq!(
        (m.prefill_total, m.prefill_retries_total, m.fallback_total),
        (1, 1, 0)
    );
    assert_eq!(r.prefill_stats(), vec![(10, 0, 1), (11, 0, 1)]);
    assert_adds_up(&m);
}

#[tokio::test]
async fn without_prefill_workers_decode_serves_alone_unless_enforced() {
    let d = Fake::new(1, Behaviour::Stream(2));
    // None live.
    let r = router(always(), prefill_set(&[]), set_of(&[&d]));
    assert_eq!(
        collect(r.call(request(8), RequestContext::new("a")))
            .await
            .len(),
        2
    );
    // Both tried and gone.
    let gone = [10, 11].map(|id| FakePrefill::new(id, Prefill::Fail(ErrorKind::Unavailable)));
    let r2 = router(always(), prefill_set(&gone.each_ref()), set_of(&[&d]));
    let items = collect(r2.call(request(8), RequestContext::new("b"))).await;
    assert_eq!(items.len(), 2);
    assert!(gone.iter().all(|p| p.calls().len() == 1));
    assert_eq!(d.calls(), 2);
    for m in [r.metrics(), r2.metrics()] {
        assert_eq!((m.fallback_total, m.prefill_total), (1, 0));
        assert_adds_up(&m);
    }
}

#[tokio::test]
async fn enforced_disaggregation_without_prefill_workers_is_unavailable() {
    let d = Fake::new(1, Behaviour::Stream(2));
    let enforce = DisaggConfig {
        prefill_threshold: 0,
        enforce: true,
        ..DisaggConfig::default()
    };
    let gone = FakePrefill::new(10, Prefill::Fail(ErrorKind::Unavailable));
    for set in [prefill_set(&[]), prefill_set(&[&gone])] {
        let r = router(enforce, set, set_of(&[&d]));
        let items = collect(r.call(request(8), RequestContext::new("a"))).await;
        let [Err(e)] = items.as_slice() else {
            panic!("expected one error, got {items:?}");
        };
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert!(e.message.contains("router `r1`"), "{e}");
        assert!(e.message.contains("no live prefill worker"), "{e}");
        assert_eq!(
            r.decode_stats(),
            vec![(1, 0, 0)],
            "slot released, never routed"
        );
        assert_eq!(r.metrics().rejected_total, 1);
        assert_adds_up(&r.metrics());
    }
    assert_eq!(d.calls(), 0);
}

#[tokio::test]
async fn a_prefill_error_fails_the_request_with_its_kind() {
    let bad = FakePrefill::new(10, Prefill::Fail(ErrorKind::InvalidRequest));
    let other = FakePrefill::new(11, Prefill::Answer);
    let d = Fake::new(1, Behaviour::Stream(2));
    let r = router(always(), prefill_set(&[&bad, &other]), set_of(&[&d]));
    let items = collect(r.call(request(8), RequestContext::new("a"))).await;
    let [Err(e)] = items.as_slice() else {
        panic!("expected one error, got {items:?}");
    };
    assert_eq!(e.kind, ErrorKind::InvalidRequest);
    assert!(
        e.message.contains("router `r1`: prefill worker 10 failed"),
        "{e}"
    );
    assert!(
        other.calls().is_empty(),
        "only `Unavailable` moves a prefill"
    );
    assert_eq!(d.calls(), 0);
    assert_eq!(r.decode_stats(), vec![(1, 0, 0)]);
    assert_eq!(r.metrics().prefill_errors_total, 1);
    assert_adds_up(&r.metrics());
}

#[tokio::test]
async fn dropping_the_stream_during_prefill_cancels_the_prefill_worker() {
    let p = FakePrefill::new(10, Prefill::Hang);
    let d = Fake::new(1, Behaviour::Stream(2));
    let r = router(always(), prefill_set(&[&p]), set_of(&[&d]));
    let caller = RequestContext::new("a");
    let mut stream = r.call(request(8), caller.clone());
    assert!(stays_pending(&mut stream).await);
    let (_, p_ctx) = p.calls().remove(0);
    assert!(!p_ctx.is_cancelled());
    drop(stream);
    assert!(
        cancelled_within_wait(&p_ctx).await,
        "P's context was not cancelled"
    );
    assert!(
        !caller.is_cancelled(),
        "the caller's own context is the caller's"
    );
    assert_eq!(d.calls(), 0);
    assert_eq!(r.decode_stats(), vec![(1, 0, 0)]);
    assert_eq!(r.prefill_stats(), vec![(10, 0, 1)]);
    assert_eq!(r.metrics().cancelled_total, 1);
    assert_adds_up(&r.metrics());
}

#[tokio::test]
async fn cancelling_the_caller_during_prefill_ends_the_request() {
    let p = FakePrefill::new(10, Prefill::Hang);
    let d = Fake::new(1, Behaviour::Stream(2));
    let r = router(always(), prefill_set(&[&p]), set_of(&[&d]));
    let caller = RequestContext::new("a");
    let mut stream = r.call(request(8), caller.clone());
    assert!(stays_pending(&mut stream).await);
    caller.cancel();
    let items = collect(stream).await;
    assert_eq!(items.len(), 1);
    assert_eq!(
        items[0].as_ref().err().map(|e| e.kind),
        Some(ErrorKind::Cancelled)
    );
    assert!(p.calls()[0].1.is_cancelled());
    assert_eq!(d.calls(), 0);
    assert_eq!(r.metrics().cancelled_total, 1);
}

#[tokio::test]
async fn dropping_the_stream_during_decode_cancels_the_decode_worker() {
    let p = FakePrefill::new(10, Prefill::Answer);
    let d = Fake::new(1, Behaviour::HangAfter(1));
    let r = router(always(), prefill_set(&[&p]), set_of(&[&d]));
    let mut stream = r.call(request(8), RequestContext::new("a"));
    assert_eq!(next(&mut stream).await.as_ref().map(worker), Some(1));
    drop(stream);
    assert!(cancelled_within_wait(&d.contexts()[0]).await);
    assert_eq!(r.decode_stats(), vec![(1, 0, 1)]);
}

#[tokio::test]
async fn without_decode_workers_the_request_is_unavailable_and_p_is_not_called() {
    let p = FakePrefill::new(10, Prefill::Answer);
    let r = router(always(), prefill_set(&[&p]), set_of(&[]));
    let items = collect(r.call(request(8), RequestContext::new("a"))).await;
    let [Err(e)] = items.as_slice() else {
        panic!("expected one error, got {items:?}");
    };
    assert_eq!(e.kind, ErrorKind::Unavailable);
    assert!(e.message.contains("no live decode worker"), "{e}");
    assert!(p.calls().is_empty());
    assert_eq!(r.metrics().rejected_total, 1);
}

#[tokio::test]
async fn counters_add_up_over_a_mix_of_requests() {
    let p = FakePrefill::new(10, Prefill::Answer);
    let d = Fake::new(1, Behaviour::Stream(1));
    let prefill = prefill_set(&[&p]);
    let config = DisaggConfig {
        prefill_threshold: 4,
        enforce: false,
        ..DisaggConfig::default()
    };
    let r = router(config, prefill.clone(), set_of(&[&d]));
    for (i, tokens) in [2, 8, 3, 16, 8].into_iter().enumerate() {
        collect(r.call(request(tokens), RequestContext::new(format!("m{i}")))).await;
    }
    prefill.remove(10);
    collect(r.call(request(8), RequestContext::new("m5"))).await;
    let m = r.metrics();
    assert_eq!(m.requests_total, 6);
    assert_eq!(
        (m.prefill_total, m.local_prefill_total, m.fallback_total),
        (3, 2, 1)
    );
    assert_eq!(m.prefill_latency_us_buckets.iter().sum::<u64>(), 3);
    assert_adds_up(&m);
    assert_eq!(r.decode_stats(), vec![(1, 0, 6)]);
}

#[tokio::test]
async fn a_decode_worker_gone_after_the_prefill_is_replaced() {
    let p = FakePrefill::new(10, Prefill::Answer);
    let gone = Fake::new(1, Behaviour::FailAfter(0, ErrorKind::Unavailable));
    let alive = Fake::new(2, Behaviour::Stream(2));
    let r = DisaggRouter::new(
        always(),
        prefill_set(&[&p]),
        Arc::new(RoundRobin::default()),
        set_of(&[&gone, &alive]),
        Arc::new(RoundRobin::default()),
    );
    let items = collect(r.call(request(8), RequestContext::new("a"))).await;
    assert_eq!(items.iter().map(worker).collect::<Vec<_>>(), vec![2, 2]);
    assert_eq!(
        p.calls()[0].0.decode_instance,
        1,
        "the blocks went to the first choice"
    );
    assert_eq!(r.decode_stats(), vec![(1, 0, 1), (2, 0, 1)]);
}

#[tokio::test]
async fn a_request_dropped_before_it_is_polled_counts_as_cancelled() {
    let p = FakePrefill::new(10, Prefill::Answer);
    let d = Fake::new(1, Behaviour::Stream(1));
    let r = router(always(), prefill_set(&[&p]), set_of(&[&d]));
    drop(r.call(request(8), RequestContext::new("a")));
    assert!(p.calls().is_empty());
    assert_eq!(r.decode_stats(), vec![(1, 0, 0)]);
    assert_eq!(r.metrics().cancelled_total, 1);
    assert_adds_up(&r.metrics());
}

#[tokio::test]
async fn a_full_prefill_queue_sends_prompts_to_the_decode_worker() {
    let (p, open) = FakePrefill::gated(10);
    let d = Fake::new(1, Behaviour::Stream(2));
    let config = DisaggConfig {
        max_prefill_queue: 1,
        ..DisaggConfig::default()
    };
    let r = router(config, prefill_set(&[&p]), set_of(&[&d]));
    // The first request occupies the only prefill worker...
    let mut first = r.call(request(8), RequestContext::new("a"));
    assert!(stays_pending(&mut first).await);
    assert_eq!(p.calls().len(), 1);
    // ...so the second is prefilled by the decode worker instead of queueing.
    let second = collect(r.call(request(8), RequestContext::new("b"))).await;
    assert_eq!(second.len(), 2);
    assert_eq!(
        p.calls().len(),
        1,
        "the busy prefill worker got no second request"
    );
    let _ = open.send(());
    assert_eq!(collect(first).await.len(), 2);
    let m = r.metrics();
    assert_eq!((m.prefill_total, m.local_prefill_total), (1, 1));
    assert_adds_up(&m);
}

#[tokio::test]
async fn the_threshold_counts_only_what_the_decode_worker_has_not_cached() {
    use dynamo_protocol::{block_hashes, KvEvent, KvEventData, StoredBlock};

    use crate::{KvConfig, KvMode, KvRouterHandle};

    let p = FakePrefill::new(10, Prefill::Answer);
    let d = Fake::new(1, Behaviour::Stream(2));
    let config = DisaggConfig {
        prefill_threshold: 16,
        ..DisaggConfig::default()
    };
    let kv_config = KvConfig {
        block_size: 4,
        ..KvConfig::default()
    };
    let kv = KvRouterHandle::new(KvMode::Events, kv_config).expect("valid");
    let r = DisaggRouter::new(
        config,
        prefill_set(&[&p]),
        kv.policy(),
        set_of(&[&d]),
        Arc::new(LeastLoaded::default()),
    );
    // 40 tokens, none cached: 40 ≥ 16, prefilled elsewhere.
    collect(r.call(request(40), RequestContext::new("cold"))).await;
    assert_eq!(p.calls().len(), 1);
    // The decode worker now holds the first 8 blocks (32 tokens): 8 uncached < 16.
    let held = block_hashes(&request(32).token_ids, 4, kv_config.hash_seed);
    let event = KvEvent {
        worker_id: 1,
        event_id: 0,
        data: KvEventData::Stored {
            parent: None,
            blocks: held.into_iter().map(|hash| StoredBlock { hash }).collect(),
        },
    };
    kv.apply_event(event);
    collect(r.call(request(40), RequestContext::new("warm"))).await;
    assert_eq!(p.calls().len(), 1, "prefilled by the decode worker");
    // 52 tokens: 20 uncached ≥ 16, back to the prefill worker.
    collect(r.call(request(52), RequestContext::new("longer"))).await;
    assert_eq!(p.calls().len(), 2);
    let m = r.metrics();
    assert_eq!((m.local_prefill_total, m.prefill_total), (1, 2));
    assert_adds_up(&m);

    // A policy without KV state counts the whole prompt: 40 ≥ 16.
    let plain = router(config, prefill_set(&[&p]), set_of(&[&d]));
    collect(plain.call(request(40), RequestContext::new("plain"))).await;
    assert_eq!(p.calls().len(), 3);
}
