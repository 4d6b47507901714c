//! The span layer: each exported `tracing` span becomes one OpenTelemetry [`SpanData`]
//! when it closes, handed to the batch processor (which the OTLP exporter drains).
//!
//! Why not `tracing-opentelemetry`: its spans go through a `SpanBuilder`, then an SDK
//! `Span` behind a mutex, then `SpanData`, and every propagation (`Span::context`) clones
//! an OpenTelemetry `Context`. Profiled on `bench serve`, that was about 45 µs of CPU per
//! request in the pipeline process (five spans), the larger part of the cost of tracing.
//! Here a span is one plain record in the registry's extensions: ids, start time, kind,
//! status and attributes, filled as fields are recorded and turned into `SpanData` once.
//! The OpenTelemetry SDK still batches and `opentelemetry-otlp` still exports.
//!
//! What it understands of `tracing`: a span's parent is its explicit parent or the
//! current span (this layer's, so spans another filter drops are skipped); `otel.kind`
//! (`server`, `client`, `producer`, `consumer`, `internal`) sets the kind and
//! `otel.status_code` (`OK`, `ERROR`) the status; an event inside a span becomes a span
//! event, and an `ERROR` event marks the span failed. Recording a field again replaces
//! its value.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::SystemTime;

use opentelemetry::trace::{
    Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, Key, KeyValue, Value};
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, SpanData, SpanEvents, SpanLinks, SpanProcessor,
};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event as TracingEvent, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, Registry};

/// A span's identity and what it will export, kept in the registry's extensions.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// Invalid for a root span.
    pub parent_span_id: SpanId,
    pub parent_is_remote: bool,
    /// Exported when it closes; the flag travels to the next hop either way.
    pub sampled: bool,
    start: SystemTime,
    kind: SpanKind,
    status: Status,
    attributes: Vec<KeyValue>,
    dropped_attributes: u32,
    events: Vec<Event>,
    dropped_events: u32,
}

/// At most this many attributes, and this many events, per span (the SDK's defaults): a
/// long-lived span cannot grow without bound, nor one span outgrow the collector's
/// message limit. What is past them is counted as dropped.
const MAX_ATTRIBUTES: usize = 128;
const MAX_EVENTS: usize = 128;

impl Recorded {
    /// Takes `parent` (a W3C context from another process) as this span's parent.
    pub fn follow(&mut self, parent: &SpanContext) {
        self.trace_id = parent.trace_id();
        self.parent_span_id = parent.span_id();
        self.parent_is_remote = true;
        self.sampled = parent.is_sampled();
    }

    /// The W3C `traceparent` that makes a span of another process this one's child.
    pub fn traceparent(&self) -> String {
        let flags = if self.sampled { 1 } else { 0 };
        format!("00-{}-{}-{flags:02x}", self.trace_id, self.span_id)
    }

    /// Takes what `fields` recorded: a field recorded again replaces its value.
    fn update(&mut self, fields: Fields) {
        for kv in fields.attributes {
            let full = self.attributes.len() >= MAX_ATTRIBUTES;
            match self.attributes.iter_mut().find(|a| a.key == kv.key) {
                Some(old) => *old = kv,
                None if full => self.dropped_attributes += 1,
                None => self.attributes.push(kv),
            }
        }
        if let Some(kind) = fields.kind {
            self.kind = kind;
        }
        if let Some(status) = fields.status {
            self.set_status(status);
        }
    }

    /// As OpenTelemetry has it: `Ok` is final, an error stays an error (keeping its
    /// first description), and `Unset` changes nothing.
    fn set_status(&mut self, status: Status) {
        match (&self.status, status) {
            (Status::Ok, _) | (_, Status::Unset) => {}
            (Status::Error { .. }, Status::Error { .. }) => {}
            (_, status) => self.status = status,
        }
    }
}

/// Runs `f` on the record of `span`, if this process's span layer keeps one for it.
pub(crate) fn with_recorded<T>(
    span: &tracing::Span,
    f: impl FnOnce(&mut Recorded) -> T,
) -> Option<T> {
    let mut f = Some(f);
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<Registry>()?;
        let data = registry.span(id)?;
        let mut extensions = data.extensions_mut();
        let recorded = extensions.get_mut::<Recorded>()?;
        f.take().map(|f| f(recorded))
    })
    .flatten()
}

/// Turns closed spans into [`SpanData`] for `processor`.
pub(crate) struct SpanLayer<P> {
    processor: Arc<P>,
    ids: RandomIdGenerator,
    /// A new trace is sampled when the low 63 bits of its id are below this.
    sample_below: u64,
    sample_all: bool,
    scope: InstrumentationScope,
}

impl<P: SpanProcessor> SpanLayer<P> {
    pub fn new(processor: Arc<P>, sampling_ratio: f64) -> Self {
        let ratio = sampling_ratio.clamp(0.0, 1.0);
        SpanLayer {
            processor,
            ids: RandomIdGenerator::default(),
            // As the SDK's `TraceIdRatioBased`, so ratios mean the same in both.
            sample_below: (ratio * (1u64 << 63) as f64) as u64,
            sample_all: ratio >= 1.0,
            scope: InstrumentationScope::builder("dynamo").build(),
        }
    }

    fn samples(&self, trace_id: TraceId) -> bool {
        if self.sample_all {
            return true;
        }
        let bytes = trace_id.to_bytes();
        let mut low = [0u8; 8];
        low.copy_from_slice(&bytes[8..]);
        (u64::from_be_bytes(low) >> 1) < self.sample_below
    }
}

impl<S, P> Layer<S> for SpanLayer<P>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    P: SpanProcessor + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        // The registry's parent (explicit, else the current span), skipping spans this
        // layer's filter drops: a child of a transport's span joins its nearest
        // exported ancestor.
        let parent = span.parent();
        let parent = parent.and_then(|p| {
            let ext = p.extensions();
            let r = ext.get::<Recorded>()?;
            Some((r.trace_id, r.span_id, r.sampled))
        });
        let (trace_id, parent_span_id, sampled) = match parent {
            Some(ids) => ids,
            None => {
                let trace_id = self.ids.new_trace_id();
                (trace_id, SpanId::INVALID, self.samples(trace_id))
            }
        };
        let meta = attrs.metadata();
        let mut fields = Fields {
            attributes: Vec::with_capacity(meta.fields().len() + 1),
            ..Fields::default()
        };
        // The exporter tells the nodes of one process apart by it (a static string:
        // no copy).
        (fields.attributes).push(KeyValue::new("target", meta.target()));
        // Fields are kept even when unsampled: a remote parent may still sample it.
        attrs.record(&mut fields);
        let recorded = Recorded {
            trace_id,
            span_id: self.ids.new_span_id(),
            parent_span_id,
            parent_is_remote: false,
            sampled,
            start: SystemTime::now(),
            kind: fields.kind.unwrap_or(SpanKind::Internal),
            status: fields.status.unwrap_or(Status::Unset),
            attributes: fields.attributes,
            dropped_attributes: 0,
            events: Vec::new(),
            dropped_events: 0,
        };
        span.extensions_mut().insert(recorded);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        // Formatted before the span's extensions are locked: a value's `Debug` that logs
        // in this span must not find them locked.
        let mut fields = Fields::default();
        values.record(&mut fields);
        let mut ext = span.extensions_mut();
        if let Some(recorded) = ext.get_mut::<Recorded>().filter(|r| r.sampled) {
            recorded.update(fields);
        }
    }

    fn on_event(&self, event: &TracingEvent<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.event_span(event) else {
            return;
        };
        if !span
            .extensions()
            .get::<Recorded>()
            .is_some_and(|r| r.sampled)
        {
            return;
        }
        let meta = event.metadata();
        let mut fields = EventFields {
            message: None,
            attributes: vec![KeyValue::new("level", meta.level().as_str())],
        };
        event.record(&mut fields);
        let name: Cow<'static, str> = match fields.message {
            Some(m) => m.into(),
            None => meta.name().into(),
        };
        let failed = (*meta.level() == tracing::Level::ERROR).then(|| Status::error(name.clone()));
        let event = Event::new(name, SystemTime::now(), fields.attributes, 0);
        let mut ext = span.extensions_mut();
        if let Some(recorded) = ext.get_mut::<Recorded>() {
            if let Some(status) = failed {
                recorded.set_status(status);
            }
            if recorded.events.len() < MAX_EVENTS {
                recorded.events.push(event);
            } else {
                recorded.dropped_events += 1;
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(r) = span.extensions_mut().remove::<Recorded>() else {
            return;
        };
        if !r.sampled {
            return;
        }
        let mut events = SpanEvents::default();
        events.events = r.events;
        events.dropped_count = r.dropped_events;
        self.processor.on_end(SpanData {
            span_context: SpanContext::new(
                r.trace_id,
                r.span_id,
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: r.parent_span_id,
            parent_span_is_remote: r.parent_is_remote,
            span_kind: r.kind,
            name: Cow::Borrowed(span.metadata().name()),
            start_time: r.start,
            end_time: SystemTime::now(),
            attributes: r.attributes,
            dropped_attributes_count: r.dropped_attributes,
            events,
            links: SpanLinks::default(),
            status: r.status,
            instrumentation_scope: self.scope.clone(),
        });
    }
}

/// A span's fields as attributes, and its `otel.*` fields as kind and status.
#[derive(Default)]
struct Fields {
    attributes: Vec<KeyValue>,
    kind: Option<SpanKind>,
    status: Option<Status>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        (self.attributes).push(KeyValue::new(Key::from_static_str(field.name()), value));
    }
}

impl Visit for Fields {
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::I64(i64::try_from(value).unwrap_or(i64::MAX)));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "otel.kind" => self.kind = Some(span_kind(value)),
            "otel.status_code" => {
                if value.eq_ignore_ascii_case("error") {
                    self.status = Some(Status::error(""));
                } else if value.eq_ignore_ascii_case("ok") {
                    self.status = Some(Status::Ok);
                }
            }
            _ => self.put(field, value.to_string().into()),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        self.record_str(field, &text);
    }
}

fn span_kind(s: &str) -> SpanKind {
    match s {
        "server" => SpanKind::Server,
        "client" => SpanKind::Client,
        "producer" => SpanKind::Producer,
        "consumer" => SpanKind::Consumer,
        _ => SpanKind::Internal,
    }
}

/// An event's message (the span event's name) and its other fields.
struct EventFields {
    message: Option<String>,
    attributes: Vec<KeyValue>,
}

impl Visit for EventFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = Some(value.to_string());
        } else {
            self.attributes.push(KeyValue::new(
                Key::from_static_str(field.name()),
                value.to_string(),
            ));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

#[cfg(test)]
#[path = "spans_tests.rs"]
mod tests;
