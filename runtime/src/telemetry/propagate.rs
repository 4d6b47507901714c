//! The W3C trace context between a [`RequestContext`] and `tracing` spans.
//!
//! On the way in, a hop's span takes the caller's `traceparent` as its parent
//! ([`follow`]); on the way out, the child context carries the hop's own span
//! ([`child_context`]), so the next process parents its span on this one.

use std::sync::OnceLock;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;

use super::spans::with_recorded;
use crate::RequestContext;

const TRACEPARENT: &str = "traceparent";

fn propagator() -> &'static TraceContextPropagator {
    static P: OnceLock<TraceContextPropagator> = OnceLock::new();
    P.get_or_init(TraceContextPropagator::new)
}

/// A carrier holding at most one `traceparent`.
struct Carrier(Option<String>);

impl Extractor for Carrier {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0.as_deref()).flatten()
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

impl Injector for Carrier {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = Some(value);
        }
    }
}

/// Makes `span` a child of the caller's span that `ctx` carries. Call it right after
/// creating the span, before entering it. A no-op when this process exports nothing,
/// the span is disabled, or `ctx` has no (valid) `traceparent`.
pub fn follow(span: &tracing::Span, ctx: &RequestContext) {
    follow_traceparent(span, ctx.traceparent.as_deref());
}

/// [`follow`] for a bare `traceparent` (an HTTP header).
pub fn follow_traceparent(span: &tracing::Span, traceparent: Option<&str>) {
    if !super::enabled() || span.is_disabled() {
        return;
    }
    let Some(tp) = traceparent else { return };
    let parent = propagator().extract(&Carrier(Some(tp.to_string())));
    let parent = parent.span().span_context().clone();
    if parent.is_valid() {
        with_recorded(span, |r| r.follow(&parent));
    }
}

/// The W3C `traceparent` of `span`, when it is exported by this process.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !super::enabled() || span.is_disabled() {
        return None;
    }
    with_recorded(span, |r| r.traceparent())
}

/// The context for the next hop: `ctx.child()` carrying `span` as the caller, or
/// `ctx`'s own `traceparent` when `span` is not exported here.
pub fn child_context(ctx: &RequestContext, span: &tracing::Span) -> RequestContext {
    let child = ctx.child();
    match traceparent_of(span) {
        Some(tp) => child.with_traceparent(Some(tp)),
        None => child,
    }
}

/// The trace id of `span` as 32 hex digits, when it is exported by this process.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    if !super::enabled() || span.is_disabled() {
        return None;
    }
    with_recorded(span, |r| r.trace_id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_carrier_round_trips_a_traceparent() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let cx = propagator().extract(&Carrier(Some(tp.to_string())));
        assert!(cx.span().span_context().is_valid());
        let mut out = Carrier(None);
        propagator().inject_context(&cx, &mut out);
        assert_eq!(out.0.as_deref(), Some(tp));
    }

    #[test]
    fn without_an_exporter_the_incoming_traceparent_passes_through() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let ctx = RequestContext::new("r").with_traceparent(Some(tp.to_string()));
        let span = tracing::info_span!("hop");
        follow(&span, &ctx);
        assert_eq!(child_context(&ctx, &span).traceparent.as_deref(), Some(tp));
        assert_eq!(trace_id(&span), None);
    }
}
