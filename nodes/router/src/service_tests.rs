//! The router against fake workers that stream, fail, hang and record cancellation.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use dynamo_protocol::TokenRequest;
use dynamo_runtime::{ErrorKind, InstanceSet, RequestContext, Service};

use crate::test_fakes::{collect, in_flight, next, request, set_of, worker, Behaviour, Fake, WAIT};
use crate::{RouterMode, RouterService};

#[tokio::test]
async fn round_robin_spreads_evenly_and_streams_everything() {
    let fakes = [1, 2, 3].map(|id| Fake::new(id, Behaviour::Stream(4)));
    let router = RouterService::new(RouterMode::RoundRobin, set_of(&fakes.each_ref()));
    let mut seen = BTreeMap::new();
    for i in 0..30 {
        let items = collect(router.call(request(), RequestContext::new(format!("r{i}")))).await;
        assert_eq!(items.len(), 4);
        let first = worker(&items[0]);
        assert!(
            items.iter().all(|d| worker(d) == first),
            "one request, one worker"
        );
        *seen.entry(first).or_insert(0) += 1;
    }
    assert_eq!(seen, BTreeMap::from([(1, 10), (2, 10), (3, 10)]));
    assert_eq!(router.stats(), vec![(1, 0, 10), (2, 0, 10), (3, 0, 10)]);
}

#[tokio::test]
async fn random_reaches_every_instance() {
    let fakes = [1, 2, 3, 4].map(|id| Fake::new(id, Behaviour::Stream(1)));
    let router = RouterService::new(RouterMode::Random, set_of(&fakes.each_ref()));
    for _ in 0..400 {
        collect(router.call(request(), RequestContext::new("r"))).await;
    }
    let routed: Vec<_> = router.stats().iter().map(|s| s.2).collect();
    assert_eq!(routed.iter().sum::<u64>(), 400);
    assert!(
        routed.iter().all(|&n| n > 0),
        "every instance is hit: {routed:?}"
    );
    assert!(fakes.iter().all(|f| f.calls() > 0));
}

#[tokio::test]
async fn least_loaded_avoids_a_busy_instance_and_spreads_ties() {
    let busy = Fake::new(1, Behaviour::HangAfter(1));
    let set = set_of(&[&busy]);
    let router = RouterService::new(RouterMode::LeastLoaded, set.clone());
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = router.call(request(), RequestContext::new("held"));
        assert_eq!(next(&mut s).await.as_ref().map(worker), Some(1));
        held.push(s);
    }
    let idle = [2, 3].map(|id| Fake::new(id, Behaviour::HangAfter(1)));
    for f in &idle {
        set.add(f.id, f.clone());
    }
    let mut seen = BTreeMap::new();
    for _ in 0..4 {
        let mut s = router.call(request(), RequestContext::new("new"));
        let first = next(&mut s).await.as_ref().map(worker);
        *seen.entry(first).or_insert(0) += 1;
        held.push(s);
    }
    assert_eq!(seen, BTreeMap::from([(Some(2), 2), (Some(3), 2)]));
    assert_eq!(in_flight(&router), vec![(1, 3), (2, 2), (3, 2)]);
    drop(held);
    assert_eq!(in_flight(&router), vec![(1, 0), (2, 0), (3, 0)]);
}

#[tokio::test]
async fn counters_return_to_zero_on_end_error_and_drop() {
    let ends = Fake::new(1, Behaviour::Stream(3));
    let fails = Fake::new(2, Behaviour::FailAfter(1, ErrorKind::Internal));
    let hangs = Fake::new(3, Behaviour::HangAfter(1));
    let router = RouterService::new(RouterMode::RoundRobin, set_of(&[&ends, &fails, &hangs]));

    let mut s = router.call(request(), RequestContext::new("ends"));
    while next(&mut s).await.is_some() {}
    assert_eq!(
        in_flight(&router)[0],
        (1, 0),
        "released at the end, before drop"
    );
    drop(s);

    let mut s = router.call(request(), RequestContext::new("fails"));
    assert_eq!(next(&mut s).await.as_ref().map(worker), Some(2));
    assert_eq!(in_flight(&router)[1], (2, 1));
    let err = next(&mut s).await.and_then(Result::err).map(|e| e.kind);
    assert_eq!(err, Some(ErrorKind::Internal), "passed through unchanged");
    assert_eq!(
        in_flight(&router)[1],
        (2, 0),
        "released at the error, before drop"
    );
    assert!(next(&mut s).await.is_none(), "an error ends the stream");
    drop(s);

    let mut s = router.call(request(), RequestContext::new("dropped"));
    assert_eq!(next(&mut s).await.as_ref().map(worker), Some(3));
    assert_eq!(in_flight(&router)[2], (3, 1));
    drop(s);

    assert_eq!(router.stats(), vec![(1, 0, 1), (2, 0, 1), (3, 0, 1)]);
}

#[tokio::test]
async fn no_instance_is_unavailable_naming_the_router() {
    let router = RouterService::new(
        RouterMode::LeastLoaded,
        Arc::new(InstanceSet::new("decode")),
    )
    .named("r0");
    let items = collect(router.call(request(), RequestContext::new("r"))).await;
    assert_eq!(items.len(), 1);
    let err = items.into_iter().next().and_then(Result::err);
    assert_eq!(err.as_ref().map(|e| e.kind), Some(ErrorKind::Unavailable));
    let message = err.map(|e| e.message).unwrap_or_default();
    assert!(message.contains("`r0`"), "{message}");
    assert!(router.stats().is_empty());
}

#[tokio::test]
async fn a_dead_instance_before_the_first_item_is_retried_elsewhere() {
    let dead = Fake::new(1, Behaviour::FailAfter(0, ErrorKind::Unavailable));
    let alive = Fake::new(2, Behaviour::Stream(2));
    let router = RouterService::new(RouterMode::RoundRobin, set_of(&[&dead, &alive]));
    for _ in 0..6 {
        let items = collect(router.call(request(), RequestContext::new("r"))).await;
        assert_eq!(items.iter().map(worker).collect::<Vec<_>>(), vec![2, 2]);
    }
    assert_eq!(
        dead.calls(),
        3,
        "round-robin sent every other request to the dead one"
    );
    assert_eq!(alive.calls(), 6);
    assert_eq!(dead.streams_dropped.load(Ordering::SeqCst), 3);
    assert!(
        dead.contexts().iter().all(RequestContext::is_cancelled),
        "the abandoned attempt is cancelled"
    );
    assert_eq!(router.stats(), vec![(1, 0, 3), (2, 0, 6)]);
}

#[tokio::test]
async fn errors_that_are_not_retried_pass_through() {
    // Unavailable after the first item, with migration off.
    let mid = Fake::new(1, Behaviour::FailAfter(1, ErrorKind::Unavailable));
    // Another kind before the first item: the request itself failed.
    let invalid = Fake::new(2, Behaviour::FailAfter(0, ErrorKind::InvalidRequest));
    let spare = Fake::new(3, Behaviour::Stream(1));
    let router = RouterService::new(RouterMode::RoundRobin, set_of(&[&mid, &invalid, &spare]))
        .migration_limit(0);

    let items = collect(router.call(request(), RequestContext::new("mid"))).await;
    assert_eq!(items.len(), 2);
    assert_eq!(worker(&items[0]), 1);
    assert_eq!(
        items[1].as_ref().map_err(|e| e.kind),
        Err(ErrorKind::Unavailable)
    );

    let items = collect(router.call(request(), RequestContext::new("invalid"))).await;
    assert_eq!(items.len(), 1);
    assert_eq!(
        items[0].as_ref().map_err(|e| e.kind),
        Err(ErrorKind::InvalidRequest)
    );
    assert_eq!(spare.calls(), 0, "nothing was retried");

    // A lone dead instance has nowhere to retry: its error comes back.
    let dead = Fake::new(9, Behaviour::FailAfter(0, ErrorKind::Unavailable));
    let lone = RouterService::new(RouterMode::RoundRobin, set_of(&[&dead]));
    let items = collect(lone.call(request(), RequestContext::new("lone"))).await;
    assert_eq!(items.len(), 1);
    assert_eq!(
        items[0].as_ref().map_err(|e| e.kind),
        Err(ErrorKind::Unavailable)
    );
    assert_eq!(lone.stats(), vec![(9, 0, 1)]);
}

#[tokio::test]
async fn dropping_the_router_stream_cancels_the_worker() {
    let hangs = Fake::new(1, Behaviour::HangAfter(1));
    let router = RouterService::new(RouterMode::RoundRobin, set_of(&[&hangs]));
    let caller = RequestContext::new("req-7").with_traceparent(Some("00-abc-def-01".into()));
    let mut s = router.call(request(), caller.clone());
    assert!(next(&mut s).await.is_some());
    let worker_ctx = hangs.contexts().pop();
    let worker_ctx = worker_ctx
        .as_ref()
        .map(|c| (c.request_id.as_str(), c.traceparent.as_deref(), c));
    let Some((id, trace, worker_ctx)) = worker_ctx else {
        panic!("the worker saw no request");
    };
    assert_eq!((id, trace), ("req-7", Some("00-abc-def-01")));
    assert!(!worker_ctx.is_cancelled());

    drop(s);
    tokio::time::timeout(WAIT, worker_ctx.cancelled())
        .await
        .unwrap_or_else(|_| panic!("the worker's request was not cancelled within {WAIT:?}"));
    assert_eq!(hangs.streams_dropped.load(Ordering::SeqCst), 1);
    assert!(!caller.is_cancelled(), "cancellation flows forward only");
}

#[tokio::test]
async fn cancelling_the_caller_reaches_the_worker_and_a_finished_call_is_not_cancelled() {
    let hangs = Fake::new(1, Behaviour::HangAfter(0));
    let ends = Fake::new(2, Behaviour::Stream(1));
    let router = RouterService::new(RouterMode::RoundRobin, set_of(&[&hangs, &ends]));

    let caller = RequestContext::new("hangs");
    let _held = router.call(request(), caller.clone());
    caller.cancel();
    let worker_ctx = hangs.contexts().pop();
    let Some(worker_ctx) = worker_ctx else {
        panic!("the worker saw no request");
    };
    tokio::time::timeout(WAIT, worker_ctx.cancelled())
        .await
        .unwrap_or_else(|_| panic!("cancel did not reach the worker within {WAIT:?}"));

    collect(router.call(request(), RequestContext::new("ends"))).await;
    assert!(
        ends.contexts().iter().all(|c| !c.is_cancelled()),
        "a call that ended normally is not cancelled afterwards"
    );
}

#[tokio::test]
async fn a_removed_instance_stays_in_stats_until_its_streams_drain() {
    let a = Fake::new(1, Behaviour::HangAfter(1));
    let b = Fake::new(2, Behaviour::HangAfter(1));
    let set = set_of(&[&a, &b]);
    let router = RouterService::new(RouterMode::RoundRobin, set.clone());
    let mut on_a = router.call(request(), RequestContext::new("a"));
    assert_eq!(next(&mut on_a).await.as_ref().map(worker), Some(1));

    assert!(set.remove(1));
    assert_eq!(router.stats(), vec![(1, 1, 1), (2, 0, 0)]);
    for _ in 0..3 {
        let mut s = router.call(request(), RequestContext::new("b"));
        assert_eq!(next(&mut s).await.as_ref().map(worker), Some(2));
    }
    drop(on_a);
    assert_eq!(router.stats(), vec![(2, 0, 3)], "drained, so gone");
    // Back while a stream is open: the same counters carry on.
    let mut on_b = router.call(request(), RequestContext::new("b"));
    assert!(next(&mut on_b).await.is_some());
    assert!(set.remove(2));
    set.add(3, Fake::new(3, Behaviour::Stream(1)));
    assert_eq!(router.stats(), vec![(2, 1, 4), (3, 0, 0)]);
    set.add(2, b.clone());
    assert_eq!(router.stats(), vec![(2, 1, 4), (3, 0, 0)]);
    drop(on_b);
    assert_eq!(router.stats(), vec![(2, 0, 4), (3, 0, 0)]);
}

#[tokio::test]
async fn with_retry_off_a_dead_instance_fails_the_request() {
    let dead = Fake::new(1, Behaviour::FailAfter(0, ErrorKind::Unavailable));
    let alive = Fake::new(2, Behaviour::Stream(1));
    let router = RouterService::new(RouterMode::RoundRobin, set_of(&[&dead, &alive]))
        .retry_unavailable(false);
    let items = collect(router.call(request(), RequestContext::new("r"))).await;
    assert_eq!(items.len(), 1);
    assert_eq!(
        items[0].as_ref().map_err(|e| e.kind),
        Err(ErrorKind::Unavailable)
    );
    assert_eq!(alive.calls(), 0);
}

fn budget(max_tokens: u32) -> TokenRequest {
    let mut r = request();
    r.stop.max_tokens = max_tokens;
    r
}

#[tokio::test]
async fn a_worker_dying_mid_stream_has_its_request_continued_elsewhere() {
    let dies = Fake::new(1, Behaviour::FailAfter(2, ErrorKind::Unavailable));
    let spare = Fake::new(2, Behaviour::Stream(3));
    let router = RouterService::new(RouterMode::RoundRobin, set_of(&[&dies, &spare]));
    let items = collect(router.call(budget(5), RequestContext::new("m"))).await;
    let from: Vec<_> = items.iter().map(worker).collect();
    assert_eq!(from, vec![1, 1, 2, 2, 2], "one stream, no error");
    // The spare continued from the prompt plus what was streamed, with the rest of the
    // budget, under the caller's request id.
    let sent = spare.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].token_ids, vec![1, 2, 3, 1, 1]);
    assert_eq!(sent[0].stop.max_tokens, 3);
    assert_eq!(spare.contexts()[0].request_id, "m");
    assert_eq!(
        in_flight(&router),
        vec![(1, 0), (2, 0)],
        "both slots released"
    );
}

#[tokio::test]
async fn migration_stops_at_its_limit_and_when_turned_off() {
    let a = Fake::new(1, Behaviour::FailAfter(1, ErrorKind::Unavailable));
    let b = Fake::new(2, Behaviour::FailAfter(1, ErrorKind::Unavailable));
    let once = RouterService::new(RouterMode::RoundRobin, set_of(&[&a, &b])).migration_limit(1);
    let items = collect(once.call(budget(10), RequestContext::new("x"))).await;
    assert_eq!(items.len(), 3, "a's token, b's token, then b's error");
    assert_eq!((worker(&items[0]), worker(&items[1])), (1, 2));
    assert_eq!(
        items[2].as_ref().map_err(|e| e.kind),
        Err(ErrorKind::Unavailable)
    );

    let c = Fake::new(3, Behaviour::FailAfter(1, ErrorKind::Unavailable));
    let d = Fake::new(4, Behaviour::Stream(5));
    let off = RouterService::new(RouterMode::RoundRobin, set_of(&[&c, &d])).migration_limit(0);
    let items = collect(off.call(budget(10), RequestContext::new("y"))).await;
    assert_eq!(items.len(), 2);
    assert!(items[1].is_err());
    assert_eq!(d.calls(), 0, "nothing migrated");
}

#[tokio::test]
async fn a_request_that_used_its_whole_budget_is_not_migrated() {
    // The worker streamed all 2 tokens and died before its end-of-stream.
    let dies = Fake::new(1, Behaviour::FailAfter(2, ErrorKind::Unavailable));
    let spare = Fake::new(2, Behaviour::Stream(1));
    let router = RouterService::new(RouterMode::RoundRobin, set_of(&[&dies, &spare]));
    let items = collect(router.call(budget(2), RequestContext::new("z"))).await;
    assert_eq!(items.len(), 3);
    assert!(items[2].is_err());
    assert_eq!(spare.calls(), 0);
}
