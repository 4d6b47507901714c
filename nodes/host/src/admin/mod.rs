//! The admin server of `graph up`: the live graph page (`/`), the graph as placed
//! (`/api/graph`) and its live figures (`/api/stats`, refreshed every second by scraping
//! every process's `_metrics`: on its socket on one machine ([`socket_clients`]), over
//! NATS for a graph across machines ([`crate::nats::metrics_clients`])). `dynamo graph
//! top` reads the same API.
//!
//! It listens on loopback by default; everything the page needs is embedded in the binary.

pub mod stats;
mod view;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use dynamo_graph::plan::Plan;
use dynamo_runtime::transport::socket_client::{SocketClient, SocketClientConfig};
use dynamo_runtime::{RequestContext, Service};
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::endpoints::{socket_path, METRICS_ENDPOINT};
pub use stats::Stats;
pub use view::GraphView;

/// The page: HTML, CSS and JS in one file, drawn with SVG by the browser.
const PAGE: &str = include_str!("page.html");

/// How often the figures are refreshed.
pub const REFRESH: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin server: cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

struct Shared {
    graph: String,
    stats: Mutex<String>,
}

/// Binds the admin address. `127.0.0.1:0` picks a free port; when `fallback` is set and
/// the port is taken, the next nine are tried (so two graphs on one machine both get one).
pub async fn bind(addr: &str, fallback: bool) -> Result<TcpListener, AdminError> {
    let first = TcpListener::bind(addr).await;
    let err = match first {
        Ok(l) => return Ok(l),
        Err(e) => e,
    };
    if let (true, Some((host, port))) = (fallback, addr.rsplit_once(':')) {
        if let Ok(port) = port.parse::<u16>() {
            for p in port.saturating_add(1)..=port.saturating_add(9) {
                if let Ok(l) = TcpListener::bind(format!("{host}:{p}")).await {
                    return Ok(l);
                }
            }
        }
    }
    Err(AdminError::Listen {
        addr: addr.to_string(),
        source: err,
    })
}

/// Each process's metrics, by process name.
pub type MetricsClients = Vec<(String, Arc<dyn Service<(), String>>)>;

/// The metrics of every process of `plan` on this machine, on their sockets in `run_dir`.
pub fn socket_clients(plan: &Plan, run_dir: &Path) -> MetricsClients {
    (plan.processes.iter())
        .map(|p| {
            let client = SocketClient::lazy(
                socket_path(run_dir, &p.name),
                SocketClientConfig {
                    connect_timeout: Duration::from_millis(200),
                    ..SocketClientConfig::default()
                },
            )
            .endpoint::<(), String>(METRICS_ENDPOINT);
            (p.name.clone(), client)
        })
        .collect()
}

/// Serves the admin API of `plan`, whose processes' metrics `clients` reach, on
/// `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    plan: Plan,
    clients: MetricsClients,
    shutdown: CancellationToken,
) {
    let view = GraphView::new(&plan);
    let shared = Arc::new(Shared {
        graph: serde_json::to_string(&view).unwrap_or_else(|_| "{}".into()),
        stats: Mutex::new("{}".into()),
    });
    tokio::spawn(poll(plan, clients, shared.clone(), shutdown.clone()));
    let app = Router::new()
        .route("/", get(page))
        .route("/api/graph", get(graph))
        .route("/api/stats", get(current_stats))
        .with_state(shared);
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
}

async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE)
}

async fn graph(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        s.graph.clone(),
    )
}

async fn current_stats(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let body = s.stats.lock().map(|t| t.clone()).unwrap_or_default();
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
}

/// Scrapes every process every [`REFRESH`] and recomputes the figures.
async fn poll(
    plan: Plan,
    clients: MetricsClients,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let origin = Instant::now();
    let mut prev: Option<stats::Scrape> = None;
    let mut scrapes = 0;
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut now = stats::Scrape::default();
        // All at once: processes that do not answer cost one timeout per refresh.
        let calls = clients.iter().map(|(name, c)| async move {
            let mut s = c.call((), RequestContext::new("admin-stats"));
            let got = tokio::time::timeout(Duration::from_millis(500), s.next()).await;
            let samples = match got {
                Ok(Some(Ok(text))) => Some(stats::parse(&text)),
                _ => None,
            };
            (name.clone(), samples)
        });
        now.processes.extend(futures::future::join_all(calls).await);
        now.at = origin.elapsed().as_secs_f64();
        scrapes += 1;
        let figures = stats::compute(&plan, prev.as_ref(), &now, scrapes);
        if let (Ok(json), Ok(mut slot)) = (serde_json::to_string(&figures), shared.stats.lock()) {
            *slot = json;
        }
        prev = Some(now);
    }
}
