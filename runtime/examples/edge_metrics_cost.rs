//! What counting an edge costs: the same call (a request, then a stream of small
//! token-like items) through a bare in-process client and through the same client wrapped
//! by the edge metrics, without and with payload-byte counting (what socket and NATS edges
//! do). One thread, calls back to back, so the time is CPU; the figure is the best of
//! five rounds.
//!
//! cargo run --release -p dynamo-runtime --example edge_metrics_cost -- [requests] [items]

use std::sync::Arc;
use std::time::{Duration, Instant};

use dynamo_runtime::edge_metrics::{EdgeLabels, EdgeRegistry};
use dynamo_runtime::transport::InProcessClient;
use dynamo_runtime::{RequestContext, ResponseStream, Service};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

/// Shaped like a token delta: a token id or two and their text.
#[derive(Serialize, Deserialize)]
struct Delta {
    token_ids: Vec<u32>,
    text: String,
    finish: Option<u8>,
}

struct Tokens;
impl Service<u32, Delta> for Tokens {
    fn call(&self, n: u32, _ctx: RequestContext) -> ResponseStream<Delta> {
        Box::pin(futures::stream::iter((0..n).map(|i| {
            Ok(Delta {
                token_ids: vec![i],
                text: " tok".into(),
                finish: None,
            })
        })))
    }
}

async fn round(client: &Arc<dyn Service<u32, Delta>>, requests: u32, items: u32) -> Duration {
    let t0 = Instant::now();
    for _ in 0..requests {
        let mut s = client.call(items, RequestContext::new("bench"));
        while let Some(item) = s.next().await {
            std::hint::black_box(item.is_ok());
        }
    }
    t0.elapsed()
}

async fn best(client: &Arc<dyn Service<u32, Delta>>, requests: u32, items: u32) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..5 {
        best = best.min(round(client, requests, items).await);
    }
    best
}

fn main() {
    let mut args = std::env::args().skip(1);
    let requests: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let items: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let registry = EdgeRegistry::default();
        let bare =
            InProcessClient::new(Arc::new(Tokens) as Arc<dyn Service<u32, Delta>>).into_service();
        let labels = |serialises| EdgeLabels {
            from: "a.out".into(),
            to: "b.in".into(),
            transport: if serialises { "socket" } else { "in-process" }.into(),
            replica: 0,
            serialises,
        };
        let counted = registry.meter(labels(false), bare.clone());
        let with_bytes = registry.meter(labels(true), bare.clone());
        let per = |d: Duration| d.as_nanos() as f64 / f64::from(requests);
        let base = per(best(&bare, requests, items).await);
        let c = per(best(&counted, requests, items).await);
        let b = per(best(&with_bytes, requests, items).await);
        println!("{requests} requests x {items} items, best of 5 rounds, one thread");
        println!("bare in-process client      {:>9.0} ns/request", base);
        println!(
            "metered (counts, latency)   {:>9.0} ns/request  +{:.0} ns/request, +{:.1} ns/item",
            c,
            c - base,
            (c - base) / f64::from(items + 1)
        );
        println!(
            "metered + payload bytes     {:>9.0} ns/request  +{:.0} ns/request, +{:.1} ns/item",
            b,
            b - base,
            (b - base) / f64::from(items + 1)
        );
    });
}
