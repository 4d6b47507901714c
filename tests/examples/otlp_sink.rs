//! An OTLP/gRPC trace receiver that only counts what it is sent: the collector for
//! measuring the cost of exporting traces (`dynamo bench serve … --set
//! telemetry.otlp_endpoint=http://127.0.0.1:4317`) without Jaeger's own cost.
//!
//! `cargo run --release -p dynamo-tests --example otlp_sink [ADDR]` (default
//! 127.0.0.1:4317); prints the spans received every 5 s while they change.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(Clone, Default)]
struct Sink {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4317".to_string());
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    let sink = Sink::default();
    let spans = sink.spans.clone();
    tokio::spawn(async move {
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let now = spans.load(Ordering::Relaxed);
            if now != last {
                println!("{now} spans received");
                last = now;
            }
        }
    });
    println!("OTLP/gRPC trace sink on http://{addr}");
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    if let Err(e) = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink))
        .serve_with_incoming(incoming)
        .await
    {
        eprintln!("sink stopped: {e}");
    }
}
