//! The exporter: a `tracing` layer whose spans leave the process in batches over
//! OTLP/gRPC, from a background thread, through a bounded queue.
//!
//! A process can host several nodes (the frontend, preprocessor and router of a graph
//! share one by default), and `service.name` is the node's name: each span goes to the
//! service of its `node` attribute if it has one, else of the longest prefix of its
//! `tracing` target the caller mapped ([`ExportConfig::services_by_target`]), else to the
//! default service. Each service has its own OTLP exporter and resource.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_otlp::{RetryPolicy, WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Span, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tracing::subscriber::Interest;
use tracing::Metadata;
use tracing::Subscriber;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::Filter;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use super::spans::SpanLayer;
use super::{DROPPED, ENABLED, EXPORTED};

/// Where and how this process exports its spans.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportConfig {
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// 0.0..=1.0: the share of new traces recorded. A span with a remote parent follows
    /// its parent's decision, so a request is traced everywhere or nowhere.
    pub sampling_ratio: f64,
    /// `service.name` of spans no rule below claims.
    pub service: String,
    /// `service.instance.id` of every span (the process's name).
    pub instance: String,
    /// `(tracing target prefix, service.name)`: spans from that code are that service's.
    pub services_by_target: Vec<(String, String)>,
    /// Spans waiting for export at most; past it new spans are dropped and counted.
    pub queue_size: usize,
    /// How long a span may wait before its batch leaves.
    pub batch_delay: Duration,
    /// How long one export may take.
    pub export_timeout: Duration,
}

impl ExportConfig {
    pub fn new(endpoint: impl Into<String>, service: impl Into<String>) -> Self {
        let service = service.into();
        ExportConfig {
            endpoint: endpoint.into(),
            sampling_ratio: 1.0,
            instance: service.clone(),
            service,
            services_by_target: Vec::new(),
            queue_size: 4096,
            batch_delay: Duration::from_millis(500),
            export_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP endpoint `{endpoint}`: {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("cannot start the span exporter's runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Keeps the exporter running; dropping it flushes what is queued (bounded in time) and
/// stops the exporter.
pub struct ExportGuard {
    processor: Arc<Bounded>,
    runtime: Option<tokio::runtime::Runtime>,
    /// Spans queued or being sent.
    pending: Arc<AtomicUsize>,
}

impl ExportGuard {
    /// Sends what is queued now; returns when the collector answered or gave up.
    pub fn flush(&self) {
        let _ = self.processor.force_flush();
    }
}

impl Drop for ExportGuard {
    fn drop(&mut self) {
        let _ = self.processor.shutdown_with_timeout(Duration::from_secs(2));
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        // What the final flush could not send in time is lost too.
        let unsent = self.pending.swap(0, Ordering::Relaxed) as u64;
        DROPPED.fetch_add(unsent, Ordering::Relaxed);
        let dropped = super::dropped_spans();
        if dropped > 0 {
            tracing::warn!(
                dropped,
                exported = super::exported_spans(),
                "spans were dropped: the OTLP collector was unreachable or too slow"
            );
        }
    }
}

/// The spans that are exported: the nodes' (`INFO` and up), not the transports' own
/// `serve` spans (the node spans under them carry the request), and never the
/// exporter's (tonic, hyper) or this module's, which would feed back into themselves.
/// The routers keep their decision spans at `DEBUG` (they are hot): those spans are
/// exported, not the routers' `DEBUG` events. The decision depends on the callsite
/// alone, so it is made once per callsite, never per span.
struct ExportFilter {
    levels: Targets,
}

impl ExportFilter {
    fn new() -> Self {
        ExportFilter {
            levels: Targets::new()
                .with_target("dynamo", LevelFilter::INFO)
                .with_target("dynamo_runtime::transport", LevelFilter::OFF)
                .with_target("dynamo_runtime::telemetry", LevelFilter::OFF)
                .with_default(LevelFilter::OFF),
        }
    }

    fn exports(&self, meta: &Metadata<'_>) -> bool {
        self.levels.would_enable(meta.target(), meta.level())
            || (meta.is_span()
                && meta.target().starts_with("dynamo_router")
                && *meta.level() <= tracing::Level::DEBUG)
    }
}

impl<S> Filter<S> for ExportFilter {
    fn enabled(&self, meta: &Metadata<'_>, _: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        self.exports(meta)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        if self.exports(meta) {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::DEBUG)
    }
}

/// The layer that exports this process's spans, and the guard that keeps it running.
/// Installs nothing by itself: add the layer to the process's subscriber.
pub fn layer<S>(config: &ExportConfig) -> Result<(impl Layer<S>, ExportGuard), TelemetryError>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    // tonic's channel lives on a runtime of its own, so export works whatever runtime
    // (or none) the process runs, and never competes with the request path's.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()?;
    let pending = Arc::new(AtomicUsize::new(0));
    let exporter = {
        let _in_runtime = runtime.enter();
        Routed::new(config, pending.clone())?
    };
    let batch = BatchConfigBuilder::default()
        // Room above the bound `Bounded` keeps, so the SDK's queue never drops silently.
        .with_max_queue_size(config.queue_size + 64)
        .with_scheduled_delay(config.batch_delay)
        .build();
    let processor = Bounded {
        inner: BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build(),
        pending: pending.clone(),
        max: config.queue_size.max(1),
    };
    let processor = Arc::new(processor);
    let layer =
        SpanLayer::new(processor.clone(), config.sampling_ratio).with_filter(ExportFilter::new());
    ENABLED.store(true, Ordering::Relaxed);
    Ok((
        layer,
        ExportGuard {
            processor,
            runtime: Some(runtime),
            pending,
        },
    ))
}

fn resource(service: &str, instance: &str) -> Resource {
    Resource::builder_empty()
        .with_service_name(service.to_string())
        .with_attribute(KeyValue::new("service.instance.id", instance.to_string()))
        .build()
}

/// The SDK's batch processor behind a bound this module counts: a span past it is
/// dropped at once (and counted) instead of queued.
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    /// Spans handed to `inner` whose export has not finished.
    pending: Arc<AtomicUsize>,
    max: usize,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.pending.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// One OTLP exporter per service, each span sent with its service's resource.
#[derive(Debug)]
struct Routed {
    services: Vec<opentelemetry_otlp::SpanExporter>,
    /// `(target prefix, index into services)`, longest prefix first.
    targets: Vec<(String, usize)>,
    names: Vec<String>,
    pending: Arc<AtomicUsize>,
}

impl Routed {
    fn new(config: &ExportConfig, pending: Arc<AtomicUsize>) -> Result<Self, TelemetryError> {
        let mut names = vec![config.service.clone()];
        let mut targets = Vec::new();
        for (prefix, service) in &config.services_by_target {
            let i = match names.iter().position(|n| n == service) {
                Some(i) => i,
                None => {
                    names.push(service.clone());
                    names.len() - 1
                }
            };
            targets.push((prefix.clone(), i));
        }
        targets.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        let mut services = Vec::with_capacity(names.len());
        for name in &names {
            let mut exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(config.endpoint.clone())
                .with_timeout(config.export_timeout)
                // A batch that fails is dropped (and counted), not retried: while the
                // collector is away, retries would only hold the queue full longer.
                .with_retry_policy(RetryPolicy::disabled())
                .build()
                .map_err(|e| TelemetryError::Endpoint {
                    endpoint: config.endpoint.clone(),
                    message: e.to_string(),
                })?;
            exporter.set_resource(&resource(name, &config.instance));
            services.push(exporter);
        }
        Ok(Routed {
            services,
            targets,
            names,
            pending,
        })
    }

    /// The service a span belongs to (an index into `services`).
    fn route(&self, span: &SpanData) -> usize {
        let mut target = None;
        for kv in &span.attributes {
            match kv.key.as_str() {
                "node" => {
                    let node = kv.value.as_str();
                    if let Some(i) = self.names.iter().position(|n| *n == node) {
                        return i;
                    }
                }
                "target" => {
                    if let Value::String(s) = &kv.value {
                        target = Some(s.as_str().to_string());
                    }
                }
                _ => {}
            }
        }
        let Some(target) = target else { return 0 };
        self.targets
            .iter()
            .find(|(prefix, _)| target.starts_with(prefix.as_str()))
            .map_or(0, |(_, i)| *i)
    }
}

impl SpanExporter for Routed {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let total = batch.len();
        let mut groups: Vec<Vec<SpanData>> = self.services.iter().map(|_| Vec::new()).collect();
        for span in batch {
            let i = self.route(&span);
            groups[i].push(span);
        }
        async move {
            // The services' exports go out together: one batch, one round trip.
            let sends = self
                .services
                .iter()
                .zip(groups)
                .filter(|(_, group)| !group.is_empty())
                .map(|(exporter, group)| {
                    let n = group.len() as u64;
                    async move { (n, exporter.export(group).await) }
                });
            let mut result = Ok(());
            for (n, sent) in futures::future::join_all(sends).await {
                match sent {
                    Ok(()) => {
                        EXPORTED.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if DROPPED.fetch_add(n, Ordering::Relaxed) == 0 {
                            tracing::warn!(error = %e, "cannot export spans; dropping them (counted) until the collector answers");
                        }
                        result = Err(e);
                    }
                }
            }
            self.pending.fetch_sub(total, Ordering::Relaxed);
            result
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        for exporter in &self.services {
            let _ = exporter.shutdown_with_timeout(timeout);
        }
        Ok(())
    }

    /// Each service keeps its own resource.
    fn set_resource(&mut self, _resource: &Resource) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        // Nobody listens on port 1: every export fails at once.
        let mut config = ExportConfig::new("http://127.0.0.1:1", "test");
        config.queue_size = 8;
        config.batch_delay = Duration::from_secs(60);
        let (layer, guard) = layer::<tracing_subscriber::Registry>(&config).expect("builds");
        let subscriber = tracing_subscriber::registry().with(layer);
        let before = crate::telemetry::dropped_spans();
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..100 {
                let span = tracing::info_span!(target: "dynamo_test", "hop", i);
                let _entered = span.enter();
            }
        });
        // At most `queue_size` spans wait; the rest were dropped as they ended.
        assert!(crate::telemetry::dropped_spans() - before >= 92);
        drop(guard);
        assert_eq!(crate::telemetry::exported_spans(), 0);
        assert!(crate::telemetry::dropped_spans() - before >= 100);
    }

    #[test]
    fn spans_go_to_their_node_service() {
        let mut config = ExportConfig::new("http://127.0.0.1:1", "pipeline");
        config.services_by_target = vec![
            ("dynamo_frontend".into(), "frontend".into()),
            ("dynamo_router".into(), "router".into()),
        ];
        let routed = {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let _in = rt.enter();
            Routed::new(&config, Arc::new(AtomicUsize::new(0))).expect("builds")
        };
        let span = |attrs: Vec<KeyValue>| SpanData {
            span_context: opentelemetry::trace::SpanContext::empty_context(),
            parent_span_id: opentelemetry::trace::SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: opentelemetry::trace::SpanKind::Internal,
            name: "s".into(),
            start_time: std::time::SystemTime::UNIX_EPOCH,
            end_time: std::time::SystemTime::UNIX_EPOCH,
            attributes: attrs,
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: opentelemetry::trace::Status::Unset,
            instrumentation_scope: Default::default(),
        };
        let name = |s: &SpanData| routed.names[routed.route(s)].clone();
        let target = |t: &str| KeyValue::new("target", t.to_string());
        assert_eq!(
            name(&span(vec![target("dynamo_router::service")])),
            "router"
        );
        assert_eq!(name(&span(vec![target("dynamo_frontend")])), "frontend");
        assert_eq!(
            name(&span(vec![target("dynamo_mocker::engine")])),
            "pipeline"
        );
        assert_eq!(name(&span(vec![])), "pipeline");
        assert_eq!(
            name(&span(vec![
                target("dynamo_router"),
                KeyValue::new("node", "frontend")
            ])),
            "frontend"
        );
    }
}
