//! The disaggregated router's per-request span carries its choices: the decode and prefill
//! instances, the path taken, the prefill latency and, with a KV prefill policy, the
//! prompt's blocks and how many the chosen prefill worker holds.
//!
//! In its own test binary, like `span.rs`: a scoped subscriber shares tracing's
//! per-callsite interest cache with every thread of the process.

mod common;

use std::sync::Arc;

use dynamo_protocol::{
    block_hashes, KvEvent, KvEventData, PrefillRequest, PrefillResult, StoredBlock, TokenDelta,
    TokenRequest,
};
use dynamo_router::{
    DisaggConfig, DisaggRouter, KvConfig, KvMode, KvRouterHandle, LeastLoaded, RoundRobin,
};
use dynamo_runtime::{InstanceSet, RequestContext, ResponseStream, Service};
use futures::StreamExt;

use common::{Fields, Recorder};

struct Prefiller;
impl Service<PrefillRequest, PrefillResult> for Prefiller {
    fn call(&self, _: PrefillRequest, _: RequestContext) -> ResponseStream<PrefillResult> {
        Box::pin(futures::stream::iter([Ok(PrefillResult::default())]))
    }
}

struct Decoder;
impl Service<TokenRequest, TokenDelta> for Decoder {
    fn call(&self, _: TokenRequest, _: RequestContext) -> ResponseStream<TokenDelta> {
        Box::pin(futures::stream::iter([Ok(TokenDelta::default())]))
    }
}

fn request(tokens: u32) -> TokenRequest {
    TokenRequest {
        model: "m".into(),
        token_ids: (1..=tokens).collect(),
        sampling: Default::default(),
        stop: Default::default(),
    }
}

fn run(router: &DisaggRouter, tokens: u32, id: &str) {
    let items: Vec<_> = futures::executor::block_on(
        router
            .call(request(tokens), RequestContext::new(id))
            .collect(),
    );
    assert_eq!(items.len(), 1, "{items:?}");
    assert!(items.iter().all(Result::is_ok), "{items:?}");
}

#[test]
fn each_request_has_a_span_with_its_prefill_and_decode_choices() {
    let config = KvConfig {
        block_size: 2,
        ..KvConfig::default()
    };
    let kv = KvRouterHandle::new(KvMode::Events, config).expect("valid");
    let blocks = block_hashes(&[1, 2, 3, 4], 2, config.hash_seed)
        .into_iter()
        .map(|hash| StoredBlock { hash })
        .collect();
    kv.apply_event(KvEvent {
        worker_id: 11,
        event_id: 0,
        data: KvEventData::Stored {
            parent: None,
            blocks,
        },
    });
    let prefill = Arc::new(InstanceSet::<PrefillRequest, PrefillResult>::new("prefill"));
    prefill.add(10, Arc::new(Prefiller));
    prefill.add(11, Arc::new(Prefiller));
    let decode = Arc::new(InstanceSet::<TokenRequest, TokenDelta>::new("decode"));
    decode.add(1, Arc::new(Decoder));
    let disagg = DisaggConfig {
        prefill_threshold: 4,
        enforce: false,
        ..DisaggConfig::default()
    };
    let router = DisaggRouter::new(
        disagg,
        prefill,
        kv.policy(),
        decode.clone(),
        Arc::new(LeastLoaded::default()),
    )
    .named("r9");
    let no_prefill = DisaggRouter::new(
        disagg,
        Arc::new(InstanceSet::new("prefill")),
        Arc::new(RoundRobin::default()),
        decode,
        Arc::new(LeastLoaded::default()),
    )
    .named("r9");

    let recorder = Recorder::default();
    tracing::subscriber::with_default(recorder.clone(), || {
        run(&router, 7, "remote");
        run(&router, 3, "short");
        run(&no_prefill, 7, "fallback");
    });
    let spans: Vec<Fields> = recorder.spans("disagg_router");
    assert_eq!(spans.len(), 3, "{spans:?}");
    let get = |span: &Fields, key: &str| span.get(key).cloned();
    for (span, id) in spans.iter().zip(["remote", "short", "fallback"]) {
        assert_eq!(get(span, "router").as_deref(), Some("r9"));
        assert_eq!(get(span, "request_id").as_deref(), Some(id));
        assert_eq!(get(span, "decode_instance").as_deref(), Some("1"));
    }
    let remote = &spans[0];
    assert_eq!(get(remote, "path").as_deref(), Some("prefill"));
    // Worker 11 holds the first two of the prompt's three full blocks.
    assert_eq!(get(remote, "prefill_instance").as_deref(), Some("11"));
    assert_eq!(get(remote, "overlap_blocks").as_deref(), Some("2"));
    assert_eq!(get(remote, "prompt_blocks").as_deref(), Some("3"));
    assert!(get(remote, "prefill_us").is_some(), "{remote:?}");
    assert_eq!(get(&spans[1], "path").as_deref(), Some("local"));
    assert_eq!(get(&spans[1], "prefill_instance"), None);
    assert_eq!(get(&spans[2], "path").as_deref(), Some("fallback"));
    assert_eq!(get(&spans[2], "prefill_instance"), None);
}
