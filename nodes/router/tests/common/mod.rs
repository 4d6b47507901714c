//! A tracing subscriber that keeps the fields of every span, for the span tests (each in
//! its own test binary: a scoped subscriber shares tracing's per-callsite interest cache
//! with every thread of the process).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};
use tracing_core::span::Current;

pub type Fields = BTreeMap<String, String>;

thread_local! {
    /// The spans this thread is in, innermost last.
    static ENTERED: std::cell::RefCell<Vec<Id>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Keeps the fields of every span opened while it is the default subscriber.
#[derive(Clone, Default)]
pub struct Recorder {
    spans: Arc<Mutex<Vec<(&'static str, Fields)>>>,
    metas: Arc<Mutex<Vec<&'static Metadata<'static>>>>,
    next: Arc<AtomicU64>,
}

struct Collect<'a>(&'a mut Fields);

impl Visit for Collect<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
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

impl Recorder {
    /// The fields of every span named `name`, in the order they were opened.
    pub fn spans(&self, name: &str) -> Vec<Fields> {
        self.spans
            .lock()
            .map(|s| {
                s.iter()
                    .filter(|(n, _)| *n == name)
                    .map(|(_, f)| f.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}
