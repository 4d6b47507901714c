//! Counters of every edge a process calls through: messages each way, payload bytes where
//! the transport serialises, errors, requests in flight, and two latency histograms (call
//! to first response, call to end of stream).
//!
//! The hot path touches only atomics: a [`Metered`] client wraps the transport's client,
//! counts the request and wraps the response stream, which counts each item as the caller
//! takes it and observes the durations when it ends or is dropped. The [`EdgeRegistry`]'s
//! lock is taken when an edge is wired up and when its samples are written out.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;

use crate::edge::{Message, RequestContext, ResponseStream, Service};
use crate::error::ServeError;

/// Upper bounds (µs) of the latency buckets: 100 µs to 2 min.
pub const DURATION_BUCKETS_US: [u64; 18] = [
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    120_000_000,
];

/// A latency histogram of atomics: one count per bucket of [`DURATION_BUCKETS_US`], then
/// the overflow, and the sum in µs.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; DURATION_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = DURATION_BUCKETS_US.partition_point(|&b| b < us);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Non-cumulative counts (one per bound, then the overflow) and the sum in µs.
    pub fn snapshot(&self) -> (Vec<u64>, u64) {
        let counts = self.counts.iter().map(|c| c.load(Relaxed)).collect();
        (counts, self.sum_us.load(Relaxed))
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let (counts, sum_us) = self.snapshot();
        let bounds = DURATION_BUCKETS_US.map(|us| us as f64 / 1e6);
        write_histogram(out, name, labels, &bounds, &counts, sum_us as f64 / 1e6);
    }
}

/// Writes a Prometheus histogram from non-cumulative `counts` (one per bound, then the
/// overflow): cumulative `_bucket{le}` lines, `+Inf`, `_sum` and `_count`.
pub fn write_histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    bounds: &[f64],
    counts: &[u64],
    sum: f64,
) {
    let mut total = 0;
    for (i, count) in counts.iter().enumerate() {
        total += count;
        let le = bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {total}");
    }
    let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
    let _ = writeln!(out, "{name}_count{{{labels}}} {total}");
}

/// Which edge a set of counters belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeLabels {
    /// The calling side, `node.port` (for a feedback edge, the producer's port).
    pub from: String,
    /// The called side, `node.port`.
    pub to: String,
    /// `in-process`, `socket`, `nats`, …
    pub transport: String,
    /// The replica of the node that holds the client (the caller, or the subscriber of a
    /// feedback edge), so that replicas in different processes never share a series.
    pub replica: u32,
    /// Whether the transport serialises, so payload bytes are counted.
    pub serialises: bool,
}

impl EdgeLabels {
    fn prometheus(&self) -> String {
        format!(
            "from=\"{}\",to=\"{}\",transport=\"{}\",replica=\"{}\"",
            self.from, self.to, self.transport, self.replica
        )
    }
}

/// The counters of one edge (as seen from one calling replica).
pub struct EdgeMetrics {
    pub labels: EdgeLabels,
    requests: AtomicU64,
    responses: AtomicU64,
    request_bytes: AtomicU64,
    response_bytes: AtomicU64,
    errors: AtomicU64,
    inflight: AtomicI64,
    duration: Histogram,
    first_response: Histogram,
}

/// A copy of an edge's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EdgeCounts {
    pub requests: u64,
    pub responses: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub errors: u64,
    pub inflight: i64,
}

impl EdgeMetrics {
    pub fn new(labels: EdgeLabels) -> Self {
        EdgeMetrics {
            labels,
            requests: AtomicU64::new(0),
            responses: AtomicU64::new(0),
            request_bytes: AtomicU64::new(0),
            response_bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            inflight: AtomicI64::new(0),
            duration: Histogram::default(),
            first_response: Histogram::default(),
        }
    }

    pub fn counts(&self) -> EdgeCounts {
        EdgeCounts {
            requests: self.requests.load(Relaxed),
            responses: self.responses.load(Relaxed),
            request_bytes: self.request_bytes.load(Relaxed),
            response_bytes: self.response_bytes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            inflight: self.inflight.load(Relaxed),
        }
    }

    /// Call-to-end-of-stream durations.
    pub fn duration(&self) -> &Histogram {
        &self.duration
    }

    /// Prometheus sample lines (no headers) of this edge.
    pub fn write_samples(&self, out: &mut String) {
        let l = self.labels.prometheus();
        let c = self.counts();
        for (dir, n) in [("request", c.requests), ("response", c.responses)] {
            let _ = writeln!(
                out,
                "dynamo_edge_messages_total{{{l},direction=\"{dir}\"}} {n}"
            );
        }
        if self.labels.serialises {
            for (dir, n) in [("request", c.request_bytes), ("response", c.response_bytes)] {
                let _ = writeln!(
                    out,
                    "dynamo_edge_bytes_total{{{l},direction=\"{dir}\"}} {n}"
                );
            }
        }
        let _ = writeln!(out, "dynamo_edge_errors_total{{{l}}} {}", c.errors);
        let _ = writeln!(out, "dynamo_edge_inflight_requests{{{l}}} {}", c.inflight);
        self.duration
            .write(out, "dynamo_edge_request_duration_seconds", &l);
        self.first_response
            .write(out, "dynamo_edge_first_response_seconds", &l);
    }
}

/// Every edge a process calls through.
#[derive(Default)]
pub struct EdgeRegistry {
    edges: Mutex<Vec<Arc<EdgeMetrics>>>,
}

impl EdgeRegistry {
    /// The counters for `labels`, shared by every client of the same edge and replica.
    pub fn edge(&self, labels: EdgeLabels) -> Arc<EdgeMetrics> {
        let Ok(mut edges) = self.edges.lock() else {
            return Arc::new(EdgeMetrics::new(labels));
        };
        if let Some(e) = edges.iter().find(|e| e.labels == labels) {
            return e.clone();
        }
        let e = Arc::new(EdgeMetrics::new(labels));
        edges.push(e.clone());
        e
    }

    /// Every edge's samples, in the order the edges were wired.
    pub fn write_samples(&self, out: &mut String) {
        if let Ok(edges) = self.edges.lock() {
            for e in edges.iter() {
                e.write_samples(out);
            }
        }
    }

    /// Wraps `client` so that its calls count on `labels`' edge.
    pub fn meter<Req: Message, Resp: Message>(
        &self,
        labels: EdgeLabels,
        client: Arc<dyn Service<Req, Resp>>,
    ) -> Arc<dyn Service<Req, Resp>> {
        Arc::new(Metered {
            inner: client,
            metrics: self.edge(labels),
        })
    }
}

/// A client that counts its calls on an edge's metrics.
pub struct Metered<Req, Resp> {
    inner: Arc<dyn Service<Req, Resp>>,
    metrics: Arc<EdgeMetrics>,
}

fn size_of<T: serde::Serialize>(value: &T) -> u64 {
    postcard::experimental::serialized_size(value).map_or(0, |n| n as u64)
}

impl<Req: Message, Resp: Message> Service<Req, Resp> for Metered<Req, Resp> {
    fn call(&self, req: Req, ctx: RequestContext) -> ResponseStream<Resp> {
        let m = &self.metrics;
        m.requests.fetch_add(1, Relaxed);
        if m.labels.serialises {
            m.request_bytes.fetch_add(size_of(&req), Relaxed);
        }
        m.inflight.fetch_add(1, Relaxed);
        Box::pin(MeteredStream {
            inner: self.inner.call(req, ctx),
            metrics: m.clone(),
            start: Instant::now(),
            first: true,
        })
    }
}

/// The response stream of a [`Metered`] call.
struct MeteredStream<Resp> {
    inner: ResponseStream<Resp>,
    metrics: Arc<EdgeMetrics>,
    start: Instant,
    first: bool,
}

impl<Resp: Message> Stream for MeteredStream<Resp> {
    type Item = Result<Resp, ServeError>;

    fn poll_next(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let polled = this.inner.as_mut().poll_next(cx);
        if let Poll::Ready(Some(item)) = &polled {
            let m = &this.metrics;
            if this.first {
                this.first = false;
                m.first_response.observe(this.start.elapsed());
            }
            match item {
                Ok(resp) => {
                    m.responses.fetch_add(1, Relaxed);
                    if m.labels.serialises {
                        m.response_bytes.fetch_add(size_of(resp), Relaxed);
                    }
                }
                Err(_) => {
                    m.errors.fetch_add(1, Relaxed);
                }
            }
        }
        polled
    }
}

impl<Resp> Drop for MeteredStream<Resp> {
    fn drop(&mut self) {
        self.metrics.inflight.fetch_sub(1, Relaxed);
        self.metrics.duration.observe(self.start.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    /// Answers `n` numbers, then an error when asked for more than 3.
    struct Count;

    impl Service<u32, u32> for Count {
        fn call(&self, n: u32, _ctx: RequestContext) -> ResponseStream<u32> {
            let mut items: Vec<Result<u32, ServeError>> = (0..n.min(3)).map(Ok).collect();
            if n > 3 {
                items.push(Err(ServeError::invalid("more than 3")));
            }
            Box::pin(futures::stream::iter(items))
        }
    }

    fn labels(serialises: bool) -> EdgeLabels {
        EdgeLabels {
            from: "a.out".into(),
            to: "b.in".into(),
            transport: "socket".into(),
            replica: 0,
            serialises,
        }
    }

    #[tokio::test]
    async fn a_metered_client_counts_messages_bytes_errors_and_durations() {
        let reg = EdgeRegistry::default();
        let client = reg.meter::<u32, u32>(labels(true), Arc::new(Count));
        let got: Vec<_> = client.call(2, RequestContext::new("r1")).collect().await;
        assert_eq!(got.len(), 2);
        let mut open = client.call(5, RequestContext::new("r2"));
        let first = open.next().await;
        assert!(matches!(first, Some(Ok(0))));
        let m = reg.edge(labels(true));
        assert_eq!(m.counts().inflight, 1, "the second call is still open");
        while open.next().await.is_some() {}
        drop(open);
        let c = m.counts();
        assert_eq!(c.requests, 2);
        assert_eq!(c.responses, 5, "2 + 3 items");
        assert_eq!(c.errors, 1);
        assert_eq!(c.inflight, 0);
        // postcard: a u32 below 128 is one byte.
        assert_eq!(c.request_bytes, 2);
        assert_eq!(c.response_bytes, 5);
        let (counts, _) = m.duration().snapshot();
        assert_eq!(counts.iter().sum::<u64>(), 2);

        let mut text = String::new();
        reg.write_samples(&mut text);
        let l = "from=\"a.out\",to=\"b.in\",transport=\"socket\",replica=\"0\"";
        for line in [
            format!("dynamo_edge_messages_total{{{l},direction=\"request\"}} 2"),
            format!("dynamo_edge_messages_total{{{l},direction=\"response\"}} 5"),
            format!("dynamo_edge_bytes_total{{{l},direction=\"response\"}} 5"),
            format!("dynamo_edge_errors_total{{{l}}} 1"),
            format!("dynamo_edge_inflight_requests{{{l}}} 0"),
            format!("dynamo_edge_request_duration_seconds_count{{{l}}} 2"),
            format!("dynamo_edge_first_response_seconds_count{{{l}}} 2"),
        ] {
            assert!(text.lines().any(|t| t == line), "no `{line}` in:\n{text}");
        }
    }

    #[tokio::test]
    async fn in_process_edges_count_no_bytes() {
        let reg = EdgeRegistry::default();
        let client = reg.meter::<u32, u32>(labels(false), Arc::new(Count));
        let _: Vec<_> = client.call(3, RequestContext::new("r")).collect().await;
        let mut text = String::new();
        reg.write_samples(&mut text);
        assert!(!text.contains("dynamo_edge_bytes_total"), "{text}");
        assert!(text.contains("direction=\"response\"} 3"), "{text}");
    }

    #[test]
    fn buckets_are_inclusive_upper_bounds() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_micros(101));
        h.observe(Duration::from_secs(1000));
        let (counts, sum) = h.snapshot();
        assert_eq!(counts[0], 1);
        assert_eq!(counts[1], 1);
        assert_eq!(counts[DURATION_BUCKETS_US.len()], 1);
        assert_eq!(sum, 100 + 101 + 1_000_000_000);
    }
}
