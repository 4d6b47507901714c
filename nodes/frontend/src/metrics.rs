//! Prometheus metrics of the frontend, and the registry callers extend with their own
//! (the engine's KV block gauges, for one). Served as OpenMetrics text on `GET /metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

use crate::openai::Endpoint;

/// The `Content-Type` of [`FrontendMetrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Appends text (OpenMetrics exposition lines) to every scrape.
pub type TextSource = Arc<dyn Fn(&mut String) + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: Arc<str>,
    endpoint: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: Arc<str>,
}

type Histograms = Family<ModelLabels, Histogram, fn() -> Histogram>;

fn ttft_histogram() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

fn itl_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0,
    ])
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    ])
}

/// The frontend's metric families and the registry that exports them.
pub struct FrontendMetrics {
    registry: Mutex<Registry>,
    text_sources: Mutex<Vec<TextSource>>,
    /// Served model names as label values; requests naming no served model get `""`.
    models: Vec<Arc<str>>,
    unknown_model: Arc<str>,
    inflight_count: AtomicUsize,
    requests: Family<RequestLabels, Counter>,
    inflight: Gauge,
    ttft: Histograms,
    itl: Histograms,
    duration: Histograms,
    input_tokens: Family<ModelLabels, Counter>,
    output_tokens: Family<ModelLabels, Counter>,
}

impl std::fmt::Debug for FrontendMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontendMetrics")
            .field("inflight", &self.inflight.get())
            .finish_non_exhaustive()
    }
}

impl FrontendMetrics {
    pub(crate) fn new(served_models: &[String]) -> Self {
        let metrics = FrontendMetrics {
            registry: Mutex::new(Registry::default()),
            text_sources: Mutex::new(Vec::new()),
            models: served_models
                .iter()
                .map(|m| Arc::from(m.as_str()))
                .collect(),
            unknown_model: Arc::from(""),
            inflight_count: AtomicUsize::new(0),
            requests: Family::default(),
            inflight: Gauge::default(),
            ttft: Family::new_with_constructor(ttft_histogram),
            itl: Family::new_with_constructor(itl_histogram),
            duration: Family::new_with_constructor(duration_histogram),
            input_tokens: Family::default(),
            output_tokens: Family::default(),
        };
        metrics.register_metric(
            "dynamo_frontend_requests",
            "Requests answered, by served model (empty when none was named), endpoint and HTTP status (499: the client went away)",
            metrics.requests.clone(),
        );
        metrics.register_metric(
            "dynamo_frontend_inflight_requests",
            "Generation requests being served now",
            metrics.inflight.clone(),
        );
        metrics.register_metric(
            "dynamo_frontend_time_to_first_token_seconds",
            "From request arrival to the first generated text",
            metrics.ttft.clone(),
        );
        metrics.register_metric(
            "dynamo_frontend_inter_token_latency_seconds",
            "Gap between streamed deltas divided by the tokens they carry",
            metrics.itl.clone(),
        );
        metrics.register_metric(
            "dynamo_frontend_request_duration_seconds",
            "From request arrival to the last byte of the response",
            metrics.duration.clone(),
        );
        metrics.register_metric(
            "dynamo_frontend_input_tokens",
            "Prompt tokens of finished requests, as reported by the downstream",
            metrics.input_tokens.clone(),
        );
        metrics.register_metric(
            "dynamo_frontend_output_tokens",
            "Generated tokens sent to clients",
            metrics.output_tokens.clone(),
        );
        metrics
    }

    /// Adds a metric (a `Gauge`, `Counter`, `Family`, ...) to the export. Use a full name
    /// (`dynamo_engine_kv_blocks_used`); counters get `_total` appended.
    pub fn register_metric(&self, name: &str, help: &str, metric: impl Metric) {
        if let Ok(mut registry) = self.registry.lock() {
            registry.register(name, help, metric);
        }
    }

    /// Adds a collector that produces its metrics at scrape time.
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        if let Ok(mut registry) = self.registry.lock() {
            registry.register_collector(collector);
        }
    }

    /// Adds a function whose OpenMetrics lines are appended to every scrape, before `# EOF`.
    pub fn add_text_source(&self, source: TextSource) {
        if let Ok(mut sources) = self.text_sources.lock() {
            sources.push(source);
        }
    }

    /// The full exposition in OpenMetrics text ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(8 * 1024);
        if let Ok(registry) = self.registry.lock() {
            if let Err(error) = encode_registry(&mut text, &registry) {
                tracing::warn!(%error, "encoding the metrics registry failed");
            }
        }
        if let Ok(sources) = self.text_sources.lock() {
            for source in sources.iter() {
                source(&mut text);
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
            }
        }
        if encode_eof(&mut text).is_err() {
            let _ = writeln!(text, "# EOF");
        }
        text
    }

    /// Generation requests in flight now.
    pub fn inflight(&self) -> usize {
        self.inflight_count.load(Ordering::Relaxed)
    }

    fn model_label(&self, model_index: Option<usize>) -> Arc<str> {
        model_index
            .and_then(|i| self.models.get(i))
            .unwrap_or(&self.unknown_model)
            .clone()
    }

    /// Counts one answered request.
    pub(crate) fn count_request(&self, endpoint: Endpoint, model: Option<usize>, status: u16) {
        let labels = RequestLabels {
            model: self.model_label(model),
            endpoint: endpoint.label(),
            status,
        };
        self.requests.get_or_create(&labels).inc();
    }

    /// Admits one generation request unless `max_inflight` are already being served.
    pub(crate) fn admit(self: &Arc<Self>, max_inflight: usize) -> Option<InflightGuard> {
        let previous = self.inflight_count.fetch_add(1, Ordering::AcqRel);
        if previous >= max_inflight {
            self.inflight_count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.inflight.inc();
        Some(InflightGuard {
            metrics: Arc::clone(self),
        })
    }

    /// The per-model handles a request updates as it streams (no label lookups per token).
    pub(crate) fn model_handles(&self, model_index: usize) -> ModelHandles {
        let labels = ModelLabels {
            model: self.model_label(Some(model_index)),
        };
        ModelHandles {
            ttft: self.ttft.get_or_create_owned(&labels),
            itl: self.itl.get_or_create_owned(&labels),
            duration: self.duration.get_or_create_owned(&labels),
            input_tokens: self.input_tokens.get_or_create_owned(&labels),
            output_tokens: self.output_tokens.get_or_create_owned(&labels),
        }
    }
}

/// Holds one in-flight slot; dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct InflightGuard {
    metrics: Arc<FrontendMetrics>,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.metrics.inflight_count.fetch_sub(1, Ordering::AcqRel);
        self.metrics.inflight.dec();
    }
}

/// Metric handles of one served model.
#[derive(Debug, Clone)]
pub(crate) struct ModelHandles {
    pub ttft: Histogram,
    pub itl: Histogram,
    pub duration: Histogram,
    pub input_tokens: Counter,
    pub output_tokens: Counter,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_family_and_extras() {
        let metrics = Arc::new(FrontendMetrics::new(&["m".to_string()]));
        metrics.count_request(Endpoint::ChatCompletions, Some(0), 200);
        metrics.count_request(Endpoint::Completions, None, 400);
        let handles = metrics.model_handles(0);
        handles.ttft.observe(0.1);
        handles.output_tokens.inc_by(3);
        let extra = Gauge::<i64>::default();
        extra.set(7);
        metrics.register_metric("dynamo_engine_kv_blocks_used", "test gauge", extra);
        metrics.add_text_source(Arc::new(|text: &mut String| {
            text.push_str("# TYPE extra_thing gauge\nextra_thing 5\n")
        }));
        let guard = metrics.admit(1);
        assert!(guard.is_some());
        assert!(metrics.admit(1).is_none(), "second request over the limit");

        let text = metrics.encode();
        for needle in [
            r#"dynamo_frontend_requests_total{model="m",endpoint="chat_completions",status="200"} 1"#,
            r#"dynamo_frontend_requests_total{model="",endpoint="completions",status="400"} 1"#,
            "dynamo_frontend_inflight_requests 1",
            r#"dynamo_frontend_time_to_first_token_seconds_count{model="m"} 1"#,
            r#"dynamo_frontend_output_tokens_total{model="m"} 3"#,
            "dynamo_engine_kv_blocks_used 7",
            "extra_thing 5\n# EOF",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        drop(guard);
        assert_eq!(metrics.inflight(), 0);
        assert!(metrics
            .encode()
            .contains("dynamo_frontend_inflight_requests 0"));
    }
}
