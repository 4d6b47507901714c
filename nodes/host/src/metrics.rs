//! Engine, router and edge metrics of every process, gathered where the frontend serves
//! `/metrics`.
//!
//! Each process serves the samples of its own engines, routers and the edges it calls
//! through on its socket (`_metrics`); the process hosting a frontend polls its peers
//! every 500 ms and appends everything, with one `# HELP`/`# TYPE` header per family, to
//! the frontend's `/metrics`. In a graph across machines the peers on other machines are
//! polled over NATS, where every process serves the same endpoint. The admin server
//! (`crate::admin`) scrapes the same endpoint.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dynamo_frontend::Frontend;
use dynamo_graph::plan::{Plan, ReplicaId};
use dynamo_mocker::MockerEngine;
use dynamo_router::kv::{OVERHEAD_BUCKETS_US, OVERLAP_BUCKETS_BLOCKS};
use dynamo_router::{DisaggRouter, KvRouterHandle};
use dynamo_runtime::edge_metrics::{write_histogram as histogram, EdgeRegistry};
use dynamo_runtime::transport::socket_client::{SocketClient, SocketClientConfig};
use dynamo_runtime::{RequestContext, ResponseStream, Service};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::endpoints::{socket_path, METRICS_ENDPOINT};

/// Every engine family: name, type, help.
const FAMILIES: &[(&str, &str, &str)] = &[
    (
        "dynamo_engine_kv_blocks",
        "gauge",
        "KV-cache blocks by state: active (held by a request), cached (reusable, evictable), free",
    ),
    (
        "dynamo_engine_kv_blocks_capacity",
        "gauge",
        "KV-cache blocks in the pool",
    ),
    (
        "dynamo_engine_running_requests",
        "gauge",
        "Requests in the running batch",
    ),
    (
        "dynamo_engine_waiting_requests",
        "gauge",
        "Requests waiting to be scheduled",
    ),
    (
        "dynamo_engine_preemptions_total",
        "counter",
        "Requests preempted because blocks ran out",
    ),
    (
        "dynamo_engine_prompt_tokens_total",
        "counter",
        "Prompt tokens scheduled",
    ),
    (
        "dynamo_engine_prefix_hit_tokens_total",
        "counter",
        "Prompt tokens served from the prefix cache",
    ),
    (
        "dynamo_engine_kv_events_total",
        "counter",
        "KV events published",
    ),
    (
        "dynamo_router_requests_total",
        "counter",
        "Requests routed by a KV-aware router",
    ),
    (
        "dynamo_router_overhead_seconds",
        "histogram",
        "Per-request routing time of a KV-aware router (hashing, index walk, cost)",
    ),
    (
        "dynamo_router_chosen_total",
        "counter",
        "Requests a KV-aware router sent to each worker instance (`worker` = instance id)",
    ),
    (
        "dynamo_router_kv_overlap_blocks",
        "histogram",
        "Prompt blocks the chosen worker already held, per request",
    ),
    (
        "dynamo_router_kv_hit_blocks_total",
        "counter",
        "Prompt blocks found cached on the chosen worker",
    ),
    (
        "dynamo_router_kv_prompt_blocks_total",
        "counter",
        "Full prompt blocks routed",
    ),
    (
        "dynamo_router_kv_events_total",
        "counter",
        "KV events applied to the router's index",
    ),
    (
        "dynamo_router_kv_resyncs_total",
        "counter",
        "Times a worker's index was rebuilt from a snapshot after a gap",
    ),
    (
        "dynamo_router_kv_indexed_blocks",
        "gauge",
        "Block entries in the router's index (distinct per index shard)",
    ),
    ("dynamo_engine_kv_transfer_blocks_total", "counter", "KV blocks handed from prefill to decode workers, by direction"),
    ("dynamo_engine_kv_transfer_bytes_total", "counter", "Bytes of KV blocks handed from prefill to decode workers, by direction"),
    ("dynamo_router_disagg_requests_total", "counter", "Requests of a disaggregated router by path: prefill (on a prefill worker), local (short prompt), fallback (no prefill worker), rejected"),
    ("dynamo_router_disagg_prefill_seconds_total", "counter", "Time spent waiting for prefill workers"),
    ("dynamo_edge_messages_total", "counter", "Messages on an edge, by direction: request (calls) or response (streamed items)"),
    ("dynamo_edge_bytes_total", "counter", "Serialised payload bytes on an edge, by direction (edges whose transport serialises)"),
    ("dynamo_edge_errors_total", "counter", "Error responses on an edge (the call failed or its stream ended with an error)"),
    ("dynamo_edge_inflight_requests", "gauge", "Calls on an edge whose response stream is still open"),
    ("dynamo_edge_request_duration_seconds", "histogram", "Time from a call on an edge to the end of its response stream"),
    ("dynamo_edge_first_response_seconds", "histogram", "Time from a call on an edge to its first response"),
];

/// The family a sample belongs to: a histogram's `_bucket`, `_sum` and `_count` samples
/// are its family's.
fn family_of(sample: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = sample.strip_suffix(suffix) {
            if FAMILIES.iter().any(|f| f.0 == base && f.1 == "histogram") {
                return base;
            }
        }
    }
    sample
}

pub struct MetricsHub {
    engines: Mutex<Vec<(ReplicaId, Arc<MockerEngine>)>>,
    routers: Mutex<Vec<(ReplicaId, KvRouterHandle)>>,
    disagg: Mutex<Vec<(ReplicaId, Arc<DisaggRouter>)>>,
    edges: Arc<EdgeRegistry>,
    peers: Vec<(String, PathBuf)>,
    /// The processes on other machines (over NATS), in a graph across machines.
    remote: Mutex<Vec<Arc<dyn Service<(), String>>>>,
    peer_text: Mutex<String>,
}

impl MetricsHub {
    pub fn new(plan: &Plan, me: &str, run_dir: &Path) -> Arc<Self> {
        let my_machine = plan
            .process(me)
            .map(|p| p.machine.clone())
            .unwrap_or_default();
        let peers = plan
            .processes
            .iter()
            .filter(|p| p.name != me && p.machine == my_machine)
            .map(|p| (p.name.clone(), socket_path(run_dir, &p.name)))
            .collect();
        Arc::new(MetricsHub {
            engines: Mutex::new(Vec::new()),
            routers: Mutex::new(Vec::new()),
            disagg: Mutex::new(Vec::new()),
            edges: Arc::default(),
            peers,
            remote: Mutex::default(),
            peer_text: Mutex::new(String::new()),
        })
    }

    /// The counters of every edge this process calls through.
    pub fn edges(&self) -> Arc<EdgeRegistry> {
        self.edges.clone()
    }

    pub fn add_engine(&self, id: ReplicaId, engine: Arc<MockerEngine>) {
        if let Ok(mut e) = self.engines.lock() {
            e.push((id, engine));
        }
    }

    pub fn add_router(&self, id: ReplicaId, kv: KvRouterHandle) {
        if let Ok(mut r) = self.routers.lock() {
            r.push((id, kv));
        }
    }

    pub fn add_disagg(&self, id: ReplicaId, router: Arc<DisaggRouter>) {
        if let Ok(mut r) = self.disagg.lock() {
            r.push((id, router));
        }
    }

    /// Sample lines (no headers) of this process's engines and routers.
    pub fn local_samples(&self) -> String {
        let mut out = String::new();
        self.edges.write_samples(&mut out);
        if let Ok(routers) = self.disagg.lock() {
            for (id, r) in routers.iter() {
                let m = r.metrics();
                let l = format!("node=\"{}\",replica=\"{}\"", id.node, id.index);
                for (path, n) in [
                    ("prefill", m.prefill_total),
                    ("local", m.local_prefill_total),
                    ("fallback", m.fallback_total),
                    ("rejected", m.rejected_total),
                ] {
                    let _ = writeln!(
                        out,
                        "dynamo_router_disagg_requests_total{{{l},path=\"{path}\"}} {n}"
                    );
                }
                let _ = writeln!(
                    out,
                    "dynamo_router_disagg_prefill_seconds_total{{{l}}} {}",
                    m.prefill_latency_us_sum as f64 / 1e6
                );
            }
        }
        if let Ok(routers) = self.routers.lock() {
            for (id, kv) in routers.iter() {
                let m = kv.metrics();
                let l = format!("node=\"{}\",replica=\"{}\"", id.node, id.index);
                let _ = writeln!(out, "dynamo_router_requests_total{{{l}}} {}", m.requests);
                histogram(
                    &mut out,
                    "dynamo_router_overhead_seconds",
                    &l,
                    &OVERHEAD_BUCKETS_US.map(|us| us as f64 / 1e6),
                    &m.routing_overhead_us_buckets,
                    m.routing_overhead_us_sum as f64 / 1e6,
                );
                histogram(
                    &mut out,
                    "dynamo_router_kv_overlap_blocks",
                    &l,
                    &OVERLAP_BUCKETS_BLOCKS.map(|b| b as f64),
                    &m.overlap_blocks_buckets,
                    m.kv_hit_blocks_total as f64,
                );
                for (worker, n) in &m.chosen_total {
                    let _ = writeln!(
                        out,
                        "dynamo_router_chosen_total{{{l},worker=\"{worker}\"}} {n}"
                    );
                }
                let _ = writeln!(
                    out,
                    "dynamo_router_kv_hit_blocks_total{{{l}}} {}",
                    m.kv_hit_blocks_total
                );
                let _ = writeln!(
                    out,
                    "dynamo_router_kv_prompt_blocks_total{{{l}}} {}",
                    m.kv_prompt_blocks_total
                );
                let _ = writeln!(
                    out,
                    "dynamo_router_kv_events_total{{{l}}} {}",
                    m.events_applied_total
                );
                let _ = writeln!(
                    out,
                    "dynamo_router_kv_resyncs_total{{{l}}} {}",
                    m.resyncs_total
                );
                let _ = writeln!(
                    out,
                    "dynamo_router_kv_indexed_blocks{{{l}}} {}",
                    m.indexed_blocks
                );
            }
        }
        let Ok(engines) = self.engines.lock() else {
            return out;
        };
        for (id, engine) in engines.iter() {
            let s = engine.stats();
            let l = format!("node=\"{}\",replica=\"{}\"", id.node, id.index);
            let _ = writeln!(
                out,
                "dynamo_engine_kv_blocks{{{l},state=\"active\"}} {}",
                s.blocks_active
            );
            let _ = writeln!(
                out,
                "dynamo_engine_kv_blocks{{{l},state=\"cached\"}} {}",
                s.blocks_cached
            );
            let _ = writeln!(
                out,
                "dynamo_engine_kv_blocks{{{l},state=\"free\"}} {}",
                s.blocks_free
            );
            let _ = writeln!(
                out,
                "dynamo_engine_kv_blocks_capacity{{{l}}} {}",
                s.blocks_total
            );
            let _ = writeln!(out, "dynamo_engine_running_requests{{{l}}} {}", s.running);
            let _ = writeln!(out, "dynamo_engine_waiting_requests{{{l}}} {}", s.waiting);
            let _ = writeln!(
                out,
                "dynamo_engine_preemptions_total{{{l}}} {}",
                s.preemptions
            );
            let _ = writeln!(
                out,
                "dynamo_engine_prompt_tokens_total{{{l}}} {}",
                s.prompt_tokens
            );
            let _ = writeln!(
                out,
                "dynamo_engine_prefix_hit_tokens_total{{{l}}} {}",
                s.prefix_hit_tokens
            );
            let _ = writeln!(out, "dynamo_engine_kv_events_total{{{l}}} {}", s.kv_events);
            let _ = writeln!(
                out,
                "dynamo_engine_kv_transfer_blocks_total{{{l},direction=\"sent\"}} {}",
                s.kv_blocks_sent
            );
            let _ = writeln!(
                out,
                "dynamo_engine_kv_transfer_blocks_total{{{l},direction=\"received\"}} {}",
                s.kv_blocks_received
            );
            let _ = writeln!(
                out,
                "dynamo_engine_kv_transfer_bytes_total{{{l},direction=\"sent\"}} {}",
                s.kv_bytes_sent
            );
            let _ = writeln!(
                out,
                "dynamo_engine_kv_transfer_bytes_total{{{l},direction=\"received\"}} {}",
                s.kv_bytes_received
            );
        }
        out
    }

    /// Every engine sample of the machine, grouped by family under one header each.
    pub fn exposition(&self) -> String {
        let mut all = self.local_samples();
        if let Ok(p) = self.peer_text.lock() {
            all.push_str(&p);
        }
        let mut by_family: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for line in all.lines().filter(|l| !l.is_empty()) {
            let name = line.split(['{', ' ']).next().unwrap_or(line);
            by_family.entry(family_of(name)).or_default().push(line);
        }
        let mut out = String::new();
        for (name, kind, help) in FAMILIES {
            if let Some(lines) = by_family.get(name) {
                // OpenMetrics names a counter family without its `_total` sample suffix.
                let family = if *kind == "counter" {
                    name.strip_suffix("_total").unwrap_or(name)
                } else {
                    name
                };
                let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} {kind}");
                for l in lines {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Append the machine's engine metrics to a frontend's `/metrics`.
    pub fn attach(self: &Arc<Self>, frontend: &Frontend) {
        let hub = self.clone();
        frontend
            .metrics()
            .add_text_source(Arc::new(move |out: &mut String| {
                out.push_str(&hub.exposition())
            }));
    }

    /// Adds the processes of other machines to those [`MetricsHub::poll_peers`] polls.
    pub fn add_remote_peers(&self, clients: Vec<Arc<dyn Service<(), String>>>) {
        if let Ok(mut remote) = self.remote.lock() {
            remote.extend(clients);
        }
    }

    /// Refresh the peers' samples every second until shutdown.
    pub async fn poll_peers(self: Arc<Self>, shutdown: CancellationToken) {
        let remote: Vec<Arc<dyn Service<(), String>>> =
            self.remote.lock().map(|r| r.clone()).unwrap_or_default();
        let clients: Vec<Arc<dyn Service<(), String>>> = self
            .peers
            .iter()
            .map(|(_, path)| {
                SocketClient::lazy(
                    path,
                    SocketClientConfig {
                        connect_timeout: Duration::from_millis(200),
                        ..SocketClientConfig::default()
                    },
                )
                .endpoint::<(), String>(METRICS_ENDPOINT)
            })
            .chain(remote)
            .collect();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // All at once, so peers that do not answer (a lost machine) cost one
            // timeout per round, not one each.
            let calls = clients.iter().map(|c| async move {
                let mut s = c.call((), RequestContext::new("metrics"));
                match tokio::time::timeout(Duration::from_millis(500), s.next()).await {
                    Ok(Some(Ok(samples))) => samples,
                    _ => String::new(),
                }
            });
            let text: String = futures::future::join_all(calls).await.concat();
            if let Ok(mut p) = self.peer_text.lock() {
                *p = text;
            }
        }
    }

    pub async fn shutdown(&self) {
        let engines: Vec<Arc<MockerEngine>> = self
            .engines
            .lock()
            .map(|e| e.iter().map(|(_, e)| e.clone()).collect())
            .unwrap_or_default();
        for e in engines {
            e.shutdown().await;
        }
    }
}

/// Serves this process's samples to the process that hosts the frontend.
pub struct MetricsService {
    hub: Arc<MetricsHub>,
}

impl MetricsService {
    pub fn new(hub: Arc<MetricsHub>) -> Self {
        MetricsService { hub }
    }
}

impl Service<(), String> for MetricsService {
    fn call(&self, _req: (), _ctx: RequestContext) -> ResponseStream<String> {
        Box::pin(futures::stream::once(futures::future::ready(Ok(self
            .hub
            .local_samples()))))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use dynamo_protocol::TokenRequest;
    use dynamo_router::{InstanceLoad, KvConfig, KvMode};

    use super::*;

    fn hub() -> MetricsHub {
        MetricsHub {
            engines: Mutex::new(Vec::new()),
            routers: Mutex::new(Vec::new()),
            disagg: Mutex::new(Vec::new()),
            edges: Arc::default(),
            peers: Vec::new(),
            remote: Mutex::default(),
            peer_text: Mutex::new(String::new()),
        }
    }

    /// A KV router that routed one request to worker 7: every router family must be on
    /// `/metrics` with its header, the histograms complete, the chosen worker labelled.
    #[test]
    fn a_kv_router_publishes_every_router_family() {
        let kv = KvRouterHandle::new(KvMode::Events, KvConfig::default()).expect("valid");
        let candidates = vec![
            Arc::new(InstanceLoad::new(7)),
            Arc::new(InstanceLoad::new(8)),
        ];
        let request = TokenRequest {
            model: "m".into(),
            token_ids: (0..100).collect(),
            sampling: Default::default(),
            stop: Default::default(),
        };
        let routed = kv.policy().route(&candidates, &request);
        let hub = hub();
        let id = ReplicaId {
            node: "router".into(),
            index: 0,
        };
        hub.add_router(id, kv);
        let text = hub.exposition();
        let families = FAMILIES
            .iter()
            .filter(|f| f.0.starts_with("dynamo_router_") && !f.0.contains("disagg"));
        for (name, kind, _) in families {
            let family = if *kind == "counter" {
                name.strip_suffix("_total").unwrap_or(name)
            } else {
                name
            };
            assert!(
                text.contains(&format!("# TYPE {family} {kind}\n")),
                "{family} has no header:\n{text}"
            );
            let sample = if *kind == "histogram" {
                format!("{name}_count{{")
            } else {
                format!("{name}{{")
            };
            assert!(text.contains(&sample), "no {sample} sample:\n{text}");
        }
        let l = "node=\"router\",replica=\"0\"";
        let worker = routed.instance;
        for line in [
            format!("dynamo_router_requests_total{{{l}}} 1"),
            format!("dynamo_router_chosen_total{{{l},worker=\"{worker}\"}} 1"),
            format!("dynamo_router_overhead_seconds_bucket{{{l},le=\"+Inf\"}} 1"),
            format!("dynamo_router_overhead_seconds_count{{{l}}} 1"),
            format!("dynamo_router_kv_overlap_blocks_bucket{{{l},le=\"0\"}} 1"),
            format!("dynamo_router_kv_overlap_blocks_count{{{l}}} 1"),
            format!("dynamo_router_kv_overlap_blocks_sum{{{l}}} 0"),
        ] {
            assert!(text.lines().any(|t| t == line), "no `{line}`:\n{text}");
        }
        // Buckets are cumulative and end at the count.
        let overhead: Vec<u64> = (text.lines())
            .filter(|t| t.starts_with("dynamo_router_overhead_seconds_bucket"))
            .filter_map(|t| t.rsplit(' ').next()?.parse().ok())
            .collect();
        assert_eq!(overhead.len(), OVERHEAD_BUCKETS_US.len() + 1);
        assert!(overhead.windows(2).all(|w| w[0] <= w[1]), "{overhead:?}");
    }
}
