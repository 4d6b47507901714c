//! The router's per-request span carries the chosen instance and the routing overhead, and
//! for a KV router the prompt's blocks and how many of them the chosen worker holds.
//!
//! In its own test binary: a scoped subscriber shares tracing's per-callsite interest cache
//! with every thread of the process, so other tests hitting the same span concurrently
//! could make it flaky.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dynamo_protocol::{block_hashes, KvEvent, KvEventData, StoredBlock, TokenDelta, TokenRequest};
use dynamo_router::{KvConfig, KvMode, RouterMode, RouterService};
use dynamo_runtime::{
    error_stream, InstanceSet, RequestContext, ResponseStream, ServeError, Service,
};
use futures::StreamExt;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};
use tracing_core::span::Current;

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

type Fields = BTreeMap<String, String>;

thread_local! {
    /// The spans this thread is in, innermost last.
    static ENTERED: std::cell::RefCell<Vec<Id>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Keeps the fields of every span opened while it is the default subscriber.
#[derive(Clone, Default)]
struct Recorder {
    spans: Arc<Mutex<Vec<(&'static str, Fields)>>>,
    metas: Arc<Mutex<Vec<&'static Metadata<'static>>>>,
    next: Arc<AtomicU64>,
}

struct Collect<'a>(&'a mut Fields);

impl Visit for Collect<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut fields = Fields::new();
        span.record(&mut Collect(&mut fields));
        if let Ok(mut spans) = self.spans.lock() {
            spans.push((span.metadata().name(), fields));
            if let Ok(mut metas) = self.metas.lock() {
                metas.push(span.metadata());
            }
        }
        Id::from_u64(self.next.fetch_add(1, Ordering::SeqCst) + 1)
    }
    fn record(&self, span: &Id, values: &Record<'_>) {
        let at = span.into_u64() as usize - 1;
        if let Ok(mut spans) = self.spans.lock() {
            if let Some((_, fields)) = spans.get_mut(at) {
                values.record(&mut Collect(fields));
            }
        }
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    // `Span::current()` (used by the KV policy to record its fields) needs these.
    fn enter(&self, span: &Id) {
        ENTERED.with(|e| e.borrow_mut().push(span.clone()));
    }
    fn exit(&self, _: &Id) {
        ENTERED.with(|e| e.borrow_mut().pop());
    }
    fn current_span(&self) -> Current {
        let top = ENTERED.with(|e| e.borrow().last().cloned());
        let meta = top.as_ref().and_then(|id| {
            let metas = self.metas.lock().ok()?;
            metas.get(id.into_u64() as usize - 1).copied()
        });
        match (top, meta) {
            (Some(id), Some(meta)) => Current::new(id, meta),
            _ => Current::none(),
        }
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
    let spans: Vec<Fields> = recorder
        .spans
        .lock()
        .map(|s| {
            s.iter()
                .filter(|(name, _)| *name == "router")
                .map(|(_, f)| f.clone())
                .collect()
        })
        .unwrap_or_default();
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
}
