//! The router's per-request span carries the chosen instance and the routing overhead, and
//! for a KV router the prompt's blocks, how many of them the chosen worker holds, its cost
//! and how many candidates were weighed.
//!
//! In its own test binary: a scoped subscriber shares tracing's per-callsite interest cache
//! with every thread of the process, so other tests hitting the same span concurrently
//! could make it flaky.

mod common;

use std::sync::Arc;

use dynamo_protocol::{block_hashes, KvEvent, KvEventData, StoredBlock, TokenDelta, TokenRequest};
use dynamo_router::{KvConfig, KvMode, RouterMode, RouterService};
use dynamo_runtime::{
    error_stream, InstanceSet, RequestContext, ResponseStream, ServeError, Service,
};
use futures::StreamExt;

use common::{Fields, Recorder};

/// A worker that is gone: every call fails with `Unavailable` before any item.
struct Dead;
impl Service<TokenRequest, TokenDelta> for Dead {
    fn call(&self, _: TokenRequest, _: RequestContext) -> ResponseStream<TokenDelta> {
        error_stream(ServeError::unavailable("connection refused"))
    }
}

/// A worker that answers with one delta.
struct Alive;
impl Service<TokenRequest, TokenDelta> for Alive {
    fn call(&self, _: TokenRequest, _: RequestContext) -> ResponseStream<TokenDelta> {
        Box::pin(futures::stream::iter([Ok(TokenDelta::default())]))
    }
}

fn request() -> TokenRequest {
    TokenRequest {
        model: "m".into(),
        token_ids: vec![1, 2, 3],
        sampling: Default::default(),
        stop: Default::default(),
    }
}

#[test]
fn each_request_has_a_span_with_its_instance_and_overhead() {
    let set = Arc::new(InstanceSet::new("decode"));
    set.add(1, Arc::new(Dead));
    set.add(2, Arc::new(Alive));
    let router = RouterService::new(RouterMode::RoundRobin, set).named("r9");
    let kv_set = Arc::new(InstanceSet::new("decode"));
    kv_set.add(5, Arc::new(Alive));
    kv_set.add(6, Arc::new(Alive));
    let config = KvConfig {
        block_size: 2,
        ..KvConfig::default()
    };
    let kv_router = RouterService::with_kv(KvMode::Events, config, kv_set).expect("valid");
    let held: Vec<StoredBlock> = block_hashes(&[1, 2, 3, 4], 2, config.hash_seed)
        .into_iter()
        .map(|hash| StoredBlock { hash })
        .collect();
    let event = KvEvent {
        worker_id: 6,
        event_id: 0,
        data: KvEventData::Stored {
            parent: None,
            blocks: held,
        },
    };
    kv_router.kv_handle().map(|h| h.apply_event(event));
    let recorder = Recorder::default();
    tracing::subscriber::with_default(recorder.clone(), || {
        for id in ["retried", "direct"] {
            let items: Vec<_> = futures::executor::block_on(
                router.call(request(), RequestContext::new(id)).collect(),
            );
            assert!(items.iter().all(Result::is_ok), "{items:?}");
            assert_eq!(items.len(), 1);
        }
        let kv_request = TokenRequest {
            token_ids: vec![1, 2, 3, 4, 5, 6, 7],
            ..request()
        };
        let items: Vec<_> = futures::executor::block_on(
            kv_router
                .call(kv_request, RequestContext::new("kv"))
                .collect(),
        );
        assert_eq!(items.len(), 1);
    });
    let spans: Vec<Fields> = recorder.spans("router");
    assert_eq!(spans.len(), 3, "{spans:?}");
    let get = |span: &Fields, key: &str| span.get(key).cloned();
    for (span, id) in spans.iter().zip(["retried", "direct"]) {
        assert_eq!(get(span, "router").as_deref(), Some("r9"));
        assert_eq!(get(span, "request_id").as_deref(), Some(id));
        assert_eq!(get(span, "instance").as_deref(), Some("2"));
        let overhead = get(span, "overhead_us").and_then(|v| v.parse::<u64>().ok());
        assert!(overhead.is_some(), "overhead_us recorded: {span:?}");
    }
    assert_eq!(get(&spans[0], "retried_from").as_deref(), Some("1"));
    assert_eq!(get(&spans[1], "retried_from"), None);
    assert_eq!(get(&spans[1], "overlap_blocks"), None, "not a KV router");
    // Worker 6 holds the first two of the three full blocks.
    assert_eq!(get(&spans[2], "instance").as_deref(), Some("6"));
    assert_eq!(get(&spans[2], "overlap_blocks").as_deref(), Some("2"));
    assert_eq!(get(&spans[2], "prompt_blocks").as_deref(), Some("3"));
    assert_eq!(get(&spans[2], "candidates").as_deref(), Some("2"));
    let cost = get(&spans[2], "cost").and_then(|v| v.parse::<f64>().ok());
    // Two blocks to prefill (the third full one and the partial one) at the default
    // weight, nothing in flight.
    assert_eq!(
        cost,
        Some(2.0 * dynamo_router::kv::DEFAULT_OVERLAP_WEIGHT),
        "{:?}",
        spans[2]
    );
    assert_eq!(get(&spans[1], "cost"), None, "not a KV router");
}
