use std::sync::Mutex;
use std::time::Duration;

use opentelemetry::trace::{SpanKind, Status};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};
use tracing_subscriber::layer::SubscriberExt;

use super::*;

/// Keeps every span it is handed.
#[derive(Debug, Default)]
struct Collect(Mutex<Vec<SpanData>>);

impl SpanProcessor for Collect {
    fn on_start(&self, _span: &mut Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if let Ok(mut spans) = self.0.lock() {
            spans.push(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Runs `f` under a registry with the span layer at `ratio`; returns the exported spans.
fn traced(ratio: f64, f: impl FnOnce()) -> Vec<SpanData> {
    let collect = Arc::new(Collect::default());
    let subscriber = tracing_subscriber::registry().with(SpanLayer::new(collect.clone(), ratio));
    tracing::subscriber::with_default(subscriber, f);
    let spans = collect.0.lock().map(|s| s.clone()).unwrap_or_default();
    spans
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no span `{name}` in {spans:?}"))
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    (span.attributes.iter())
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

#[test]
fn children_share_the_trace_and_name_their_parent() {
    let spans = traced(1.0, || {
        let outer =
            tracing::info_span!("outer", request_id = %"r-1", tokens = tracing::field::Empty);
        let _in = outer.enter();
        let explicit = tracing::info_span!(parent: &outer, "explicit");
        drop(explicit);
        {
            let _inner = tracing::info_span!("inner", n = 3u64).entered();
        }
        outer.record("tokens", 5u64);
        outer.record("tokens", 7u64);
    });
    assert_eq!(spans.len(), 3, "{spans:?}");
    let outer = named(&spans, "outer");
    assert_eq!(outer.parent_span_id, SpanId::INVALID, "a root");
    for child in ["explicit", "inner"] {
        let c = named(&spans, child);
        assert_eq!(c.span_context.trace_id(), outer.span_context.trace_id());
        assert_eq!(c.parent_span_id, outer.span_context.span_id());
        assert!(!c.parent_span_is_remote);
    }
    assert_eq!(
        attr(outer, "request_id"),
        Some(&Value::from("r-1".to_string()))
    );
    assert_eq!(attr(outer, "tokens"), Some(&Value::I64(7)), "replaced");
    let recorded_tokens = outer
        .attributes
        .iter()
        .filter(|kv| kv.key.as_str() == "tokens");
    assert_eq!(recorded_tokens.count(), 1);
    assert_eq!(attr(named(&spans, "inner"), "n"), Some(&Value::I64(3)));
    assert!(outer.start_time <= outer.end_time);
}

#[test]
fn a_remote_parent_gives_its_trace_and_its_sampling_decision() {
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let parent = SpanContext::new(
        TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").expect("hex"),
        SpanId::from_hex("b7ad6b7169203331").expect("hex"),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let mut traceparent = None;
    // At ratio 0 no trace of its own is sampled, but a sampled caller's is.
    let spans = traced(0.0, || {
        let hop = tracing::info_span!("hop");
        with_recorded(&hop, |r| r.follow(&parent)).expect("recorded");
        traceparent = with_recorded(&hop, |r| r.traceparent());
        let _child = tracing::info_span!(parent: &hop, "child").entered();
    });
    let hop = named(&spans, "hop");
    assert_eq!(hop.span_context.trace_id(), parent.trace_id());
    assert_eq!(hop.parent_span_id, parent.span_id());
    assert!(hop.parent_span_is_remote);
    assert_eq!(
        named(&spans, "child").parent_span_id,
        hop.span_context.span_id()
    );
    let traceparent = traceparent.expect("has one");
    assert!(traceparent.starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
    assert!(traceparent.ends_with("-01"), "{traceparent}");
    assert_ne!(traceparent, tp, "names this hop, not the caller");
    assert_eq!(traceparent.len(), tp.len());
}

#[test]
fn unsampled_traces_export_nothing_and_say_so_downstream() {
    let mut traceparent = None;
    let spans = traced(0.0, || {
        let root = tracing::info_span!("root");
        traceparent = with_recorded(&root, |r| r.traceparent());
        let _child = tracing::info_span!(parent: &root, "child").entered();
    });
    assert!(spans.is_empty(), "{spans:?}");
    assert!(traceparent.expect("ids still").ends_with("-00"));
    // Half the traces at 0.5: the decision is the trace id's, as in the SDK.
    let spans = traced(0.5, || {
        for _ in 0..400 {
            let _s = tracing::info_span!("s").entered();
        }
    });
    assert!((100..300).contains(&spans.len()), "{}", spans.len());
}

#[test]
fn otel_fields_set_kind_and_status_and_events_land_on_their_span() {
    let spans = traced(1.0, || {
        let s = tracing::info_span!(
            "http.request",
            otel.kind = "server",
            otel.status_code = tracing::field::Empty
        );
        s.in_scope(|| tracing::info!(tokens = 3u64, "first token"));
        s.record("otel.status_code", "ERROR");
        let failed = tracing::info_span!("failed");
        failed.in_scope(|| tracing::error!(status = 500u64, "request failed"));
    });
    let http = named(&spans, "http.request");
    assert_eq!(http.span_kind, SpanKind::Server);
    assert!(matches!(http.status, Status::Error { .. }));
    assert!(
        attr(http, "otel.kind").is_none(),
        "a kind, not an attribute"
    );
    let events: Vec<&str> = http.events.iter().map(|e| e.name.as_ref()).collect();
    assert_eq!(events, ["first token"]);
    assert!(http.events.events[0]
        .attributes
        .iter()
        .any(|kv| kv.key.as_str() == "tokens"));
    let failed = named(&spans, "failed");
    assert_eq!(
        failed.status,
        Status::error("request failed"),
        "an error event fails its span"
    );
    assert_eq!(attr(http, "target"), Some(&Value::from(module_path!())));
}

/// A value that logs while it is formatted.
struct Chatty;

impl std::fmt::Debug for Chatty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        tracing::info!("formatting");
        write!(f, "chatty")
    }
}

#[test]
fn a_value_that_logs_while_it_is_recorded_does_not_lock_its_span() {
    let spans = traced(1.0, || {
        let s = tracing::info_span!("s", v = tracing::field::Empty);
        let _in = s.enter();
        s.record("v", tracing::field::debug(Chatty));
    });
    let s = named(&spans, "s");
    assert_eq!(attr(s, "v"), Some(&Value::from("chatty".to_string())));
    let events: Vec<&str> = s.events.iter().map(|e| e.name.as_ref()).collect();
    assert_eq!(events, ["formatting"]);
}

#[test]
fn a_child_of_a_span_the_filter_drops_joins_the_nearest_exported_ancestor() {
    use tracing_subscriber::Layer as _;
    let collect = Arc::new(Collect::default());
    let layer = SpanLayer::new(collect.clone(), 1.0).with_filter(
        tracing_subscriber::filter::filter_fn(|m| m.name() != "hidden"),
    );
    // Another layer (the log lines', in a process) keeps every span in the registry.
    struct Everything;
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Everything {}
    let subscriber = tracing_subscriber::registry().with(layer).with(Everything);
    tracing::subscriber::with_default(subscriber, || {
        let outer = tracing::info_span!("outer");
        let hidden = tracing::info_span!(parent: &outer, "hidden");
        let _child = tracing::info_span!(parent: &hidden, "child").entered();
    });
    let spans = collect.0.lock().map(|s| s.clone()).unwrap_or_default();
    let (outer, child) = (named(&spans, "outer"), named(&spans, "child"));
    assert_eq!(child.parent_span_id, outer.span_context.span_id());
    assert_eq!(child.span_context.trace_id(), outer.span_context.trace_id());
}

#[test]
fn ok_is_final_an_error_keeps_its_first_description_and_limits_hold() {
    let spans = traced(1.0, || {
        let ok = tracing::info_span!("ok", otel.status_code = "OK");
        ok.in_scope(|| tracing::error!("too late"));
        let failed = tracing::info_span!("failed", otel.status_code = tracing::field::Empty);
        failed.in_scope(|| tracing::error!("first"));
        failed.record("otel.status_code", "ERROR");
        failed.record("otel.status_code", "bogus");
        let busy = tracing::info_span!("busy");
        busy.in_scope(|| {
            for i in 0..200u64 {
                tracing::info!(i, "tick");
            }
        });
    });
    assert_eq!(named(&spans, "ok").status, Status::Ok);
    assert_eq!(named(&spans, "failed").status, Status::error("first"));
    let busy = named(&spans, "busy");
    assert_eq!(busy.events.len(), 128);
    assert_eq!(busy.events.dropped_count, 72);
}
