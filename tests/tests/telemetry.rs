//! Traces end to end: `graphs/disagg.toml` (mocker workers, prefill and decode in their
//! own processes) exporting to an OTLP/gRPC receiver inside the test. One request is one
//! trace across the processes, its id in the `x-trace-id` header, every span's parent in
//! the trace, the spans' attributes saying what the request did (model, status, tokens,
//! the router's path, the hand-off's bytes); and a collector that is down costs the
//! requests nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dynamo_tests::{model_cached, workspace, Graph};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

const MOCKER_INSTANT: [&str; 4] = [
    "prefill.engine=mocker",
    "decode.engine=mocker",
    "prefill.speedup=inf",
    "decode.speedup=inf",
];

fn graph() -> std::path::PathBuf {
    workspace().join("graphs/disagg.toml")
}

/// One span as the collector received it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    /// Empty for a root span.
    parent: String,
    /// OTLP's span kind (2: server).
    kind: i32,
    /// Values as text (`8`, `smollm2`, `true`).
    attributes: BTreeMap<String, String>,
}

impl Received {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        Value::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// An OTLP/gRPC trace receiver keeping every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(text)
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let attributes = (span.attributes.iter())
                        .filter_map(|kv| {
                            Some((kv.key.clone(), text(kv.value.as_ref()?.value.as_ref()?)))
                        })
                        .collect();
                    received.push(Received {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent: hex(&span.parent_span_id),
                        kind: span.kind,
                        attributes,
                    });
                }
            }
        }
        if let Ok(mut spans) = self.spans.lock() {
            spans.extend(received);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Serves on a free loopback port; returns its `http://` URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds a loopback port");
        let addr = listener.local_addr().expect("has an address");
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        format!("http://{addr}")
    }

    fn trace(&self, trace_id: &str) -> Vec<Received> {
        self.spans
            .lock()
            .map(|s| {
                s.iter()
                    .filter(|r| r.trace_id == trace_id)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

async fn chat(client: &reqwest::Client, url: &str) -> (u16, Option<String>, serde_json::Value) {
    let body = serde_json::json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Tell me about Paris, the capital of France, in some detail please."}],
        "max_tokens": 8,
    });
    let r = dynamo_tests::post_chat(client, url, &body).await;
    let status = r.status().as_u16();
    let trace_id = r
        .headers()
        .get("x-trace-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let v = serde_json::from_slice(&r.bytes().await.unwrap_or_default())
        .unwrap_or(serde_json::Value::Null);
    (status, trace_id, v)
}

fn sets(endpoint: &str) -> Vec<String> {
    let mut s: Vec<String> = MOCKER_INSTANT.iter().map(|s| s.to_string()).collect();
    s.push(format!("telemetry.otlp_endpoint={endpoint}"));
    s.push("telemetry.sampling_ratio=1.0".to_string());
    s
}

/// The spans expected from each process, by service: the request is complete in the
/// trace once all of them arrived (each process exports on its own schedule).
const EXPECTED: [(&str, &str); 9] = [
    ("frontend", "http.request"),
    ("preprocessor", "preprocess"),
    ("preprocessor", "template_tokenize"),
    ("preprocessor", "detokenize"),
    ("router", "disagg_router"),
    ("prefill", "prefill"),
    ("prefill", "kv_handoff"),
    ("decode", "kv_import"),
    ("decode", "engine"),
];

fn complete(spans: &[Received]) -> bool {
    EXPECTED
        .iter()
        .all(|(svc, name)| spans.iter().any(|s| s.service == *svc && s.name == *name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_processes() {
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh"
    );
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let sets = sets(&endpoint);
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let g = Graph::up(&graph(), &sets);
    let client = reqwest::Client::new();

    let (status, trace_id, v) = chat(&client, &g.url).await;
    assert_eq!(status, 200, "{v}");
    let trace_id = trace_id.expect("the answer carries x-trace-id");
    assert_eq!(trace_id.len(), 32, "{trace_id}");

    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans = collector.trace(&trace_id);
        if complete(&spans) || Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let listing: Vec<String> = spans
        .iter()
        .map(|s| format!("{}:{} {} <- {}", s.service, s.name, s.span_id, s.parent))
        .collect();
    let listing = listing.join("\n");
    eprintln!("trace {trace_id}:\n{listing}");
    for (svc, name) in EXPECTED {
        assert!(
            spans.iter().any(|s| s.service == svc && s.name == name),
            "no `{name}` span from `{svc}` in trace {trace_id}:\n{listing}"
        );
    }
    let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
    assert!(services.len() >= 5, "{services:?}");

    // One root (the HTTP request); every other span's parent is in the trace.
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let roots: Vec<&Received> = spans.iter().filter(|s| s.parent.is_empty()).collect();
    assert_eq!(roots.len(), 1, "one root span:\n{listing}");
    assert_eq!(roots[0].name, "http.request", "{listing}");
    for s in &spans {
        assert!(
            s.parent.is_empty() || ids.contains(s.parent.as_str()),
            "the parent of {}:{} is not in the trace:\n{listing}",
            s.service,
            s.name
        );
    }
    // The hops nest in the order the request takes.
    let by_id: BTreeMap<&str, &Received> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let ancestors = |s: &Received| {
        let mut names = Vec::new();
        let mut at = by_id.get(s.parent.as_str());
        while let Some(p) = at {
            names.push(p.name.clone());
            at = by_id.get(p.parent.as_str());
        }
        names
    };
    let import = spans
        .iter()
        .find(|s| s.name == "kv_import")
        .expect("listed");
    let chain = ancestors(import);
    for hop in ["kv_handoff", "prefill", "preprocess", "http.request"] {
        assert!(chain.iter().any(|n| n == hop), "kv_import under {chain:?}");
    }
    let detokenize = spans
        .iter()
        .find(|s| s.name == "detokenize")
        .expect("listed");
    let parent = by_id
        .get(detokenize.parent.as_str())
        .map(|p| p.name.as_str());
    assert_eq!(parent, Some("preprocess"), "{listing}");
    let router = spans
        .iter()
        .find(|s| s.name == "disagg_router")
        .expect("listed");
    assert!(
        ancestors(router).iter().any(|n| n == "preprocess"),
        "{listing}"
    );

    // A second request is a second trace.
    // The spans carry what the request did.
    let span = |svc: &str, name: &str| {
        spans
            .iter()
            .find(|s| s.service == svc && s.name == name)
            .unwrap_or_else(|| panic!("listed: {svc}:{name}"))
    };
    let http = span("frontend", "http.request");
    assert_eq!(http.kind, 2, "a server span: {http:?}");
    assert_eq!(http.attr("model"), Some("smollm2"), "{http:?}");
    assert_eq!(http.attr("http.status_code"), Some("200"), "{http:?}");
    assert_eq!(http.attr("completion_tokens"), Some("8"), "{http:?}");
    assert_eq!(http.attr("trace_id"), Some(trace_id.as_str()), "{http:?}");
    let prompt_tokens = http.attr("prompt_tokens").expect("prompt_tokens");
    let pre = span("preprocessor", "preprocess");
    assert_eq!(pre.attr("prompt_tokens"), Some(prompt_tokens), "{pre:?}");
    assert_eq!(pre.attr("finish_reason"), Some("length"), "{pre:?}");
    assert_eq!(detokenize.attr("tokens"), Some("8"), "{detokenize:?}");
    assert_eq!(router.attr("path"), Some("prefill"), "{router:?}");
    let handoff = span("prefill", "kv_handoff");
    let positive = |s: &Received, key: &str| {
        let v: u64 = (s.attr(key).and_then(|v| v.parse().ok()))
            .unwrap_or_else(|| panic!("{}: no number `{key}`: {s:?}", s.name));
        assert!(v > 0, "{}: {key} = 0", s.name);
        v
    };
    let sent = positive(handoff, "bytes");
    positive(handoff, "blocks");
    assert_eq!(
        positive(import, "bytes"),
        sent,
        "one chunk: all bytes in one import"
    );
    assert_eq!(
        span("decode", "engine").attr("completion_tokens"),
        Some("8")
    );
    assert_eq!(
        span("prefill", "prefill").attr("prompt_tokens"),
        Some(prompt_tokens)
    );

    let (status, second, _) = chat(&client, &g.url).await;
    assert_eq!(status, 200);
    assert_ne!(second.as_deref(), Some(trace_id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_requests_nothing() {
    assert!(
        model_cached(),
        "the SmolLM2 model is not cached: run scripts/setup-tests.sh"
    );
    // A port that was free a moment ago, and now nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        let port = l.local_addr().expect("has an address").port();
        drop(l);
        format!("http://127.0.0.1:{port}")
    };
    let sets = sets(&dead);
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let mut g = Graph::up(&graph(), &sets);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    for _ in 0..20 {
        let (status, trace_id, v) =
            tokio::time::timeout(Duration::from_secs(20), chat(&client, &g.url))
                .await
                .expect("answers promptly");
        assert_eq!(status, 200, "{v}");
        assert!(trace_id.is_some(), "traced even if nobody listens");
    }
    // The spans that could not go out were counted, and the processes say so.
    assert!(g.stop(Duration::from_secs(20)), "stops");
    let log = g.drain_stderr().join("\n");
    eprintln!("{log}");
    assert!(
        log.contains("cannot export spans") || log.contains("spans were dropped"),
        "{log}"
    );
}
