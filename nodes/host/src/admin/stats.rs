//! The live figures of a graph: every process's metrics text (`_metrics`) parsed into
//! samples, and two successive scrapes turned into per-edge rates and latencies and
//! per-node health. Pure: the poller in [`super`] feeds it text and the time.

use std::collections::BTreeMap;

use dynamo_graph::kinds::EdgeKind;
use dynamo_graph::plan::Plan;
use serde::{Deserialize, Serialize};

/// One Prometheus sample line: `name{k="v",…} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the sample lines of a Prometheus text exposition (comments are skipped; a line
/// that does not parse is skipped too: the figures are best-effort, never a failure).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
        None => (head, BTreeMap::new()),
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn parse_labels(mut s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    while !s.is_empty() {
        let (key, rest) = s.split_once("=\"")?;
        let end = rest.find('"')?;
        out.insert(
            key.trim_start_matches(',').to_string(),
            rest[..end].to_string(),
        );
        s = rest[end + 1..].trim_start_matches(',');
    }
    Some(out)
}

/// Cumulative totals of one edge (summed over the replicas that call through it).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct EdgeTotals {
    requests: f64,
    responses: f64,
    bytes: f64,
    errors: f64,
    inflight: f64,
    duration_sum: f64,
    duration_count: f64,
}

/// `(from, to, transport)`.
type EdgeKey = (String, String, String);

fn edge_totals(samples: &[Sample]) -> BTreeMap<EdgeKey, EdgeTotals> {
    let mut out: BTreeMap<EdgeKey, EdgeTotals> = BTreeMap::new();
    for s in samples
        .iter()
        .filter(|s| s.name.starts_with("dynamo_edge_"))
    {
        let l = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
        let t = out.entry((l("from"), l("to"), l("transport"))).or_default();
        let dir = s.labels.get("direction").map(String::as_str);
        match (s.name.as_str(), dir) {
            ("dynamo_edge_messages_total", Some("request")) => t.requests += s.value,
            ("dynamo_edge_messages_total", Some("response")) => t.responses += s.value,
            ("dynamo_edge_bytes_total", _) => t.bytes += s.value,
            ("dynamo_edge_errors_total", _) => t.errors += s.value,
            ("dynamo_edge_inflight_requests", _) => t.inflight += s.value,
            ("dynamo_edge_request_duration_seconds_sum", _) => t.duration_sum += s.value,
            ("dynamo_edge_request_duration_seconds_count", _) => t.duration_count += s.value,
            _ => {}
        }
    }
    out
}

/// One scrape of the whole graph: every process's samples, or none when it did not answer.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// Seconds since an arbitrary origin.
    pub at: f64,
    pub processes: BTreeMap<String, Option<Vec<Sample>>>,
}

impl Scrape {
    fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.processes.values().flatten().flatten()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EdgeStats {
    pub from: String,
    pub to: String,
    pub transport: String,
    pub kind: String,
    pub requests_total: f64,
    pub responses_total: f64,
    pub errors_total: f64,
    pub bytes_total: f64,
    pub requests_per_s: f64,
    pub responses_per_s: f64,
    pub bytes_per_s: f64,
    pub errors_per_s: f64,
    pub inflight: f64,
    /// Mean call duration over the last interval (ms), when a call ended in it.
    pub latency_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplicaStats {
    pub index: u32,
    pub process: String,
    pub machine: String,
    /// `up` (its process answered the last scrape) or `down`.
    pub state: String,
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    pub kv_active: Option<f64>,
    pub kv_capacity: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeStats {
    pub node: String,
    pub kind: String,
    /// `ok`, `degraded` (some replica down, or errors in the last interval) or `down`.
    pub health: String,
    /// Calls into the node per second (out of it, for a node nothing calls: the frontend).
    pub requests_per_s: f64,
    pub errors_per_s: f64,
    pub inflight: f64,
    pub replicas: Vec<ReplicaStats>,
}

/// What `/api/stats` answers (`{}` before the first scrape, read as no figures yet).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default)]
pub struct Stats {
    pub graph: String,
    /// How many scrapes made these figures (the page shows it advance).
    pub scrapes: u64,
    /// Seconds the rates are computed over.
    pub interval_s: f64,
    pub edges: Vec<EdgeStats>,
    pub nodes: Vec<NodeStats>,
}

fn sample_sum(
    samples: &[&Sample],
    name: &str,
    node: &str,
    index: u32,
    extra: Option<(&str, &str)>,
) -> Option<f64> {
    let idx = index.to_string();
    let hits: Vec<f64> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| s.labels.get("node").map(String::as_str) == Some(node))
        .filter(|s| s.labels.get("replica") == Some(&idx))
        .filter(|s| extra.is_none_or(|(k, v)| s.labels.get(k).map(String::as_str) == Some(v)))
        .map(|s| s.value)
        .collect();
    (!hits.is_empty()).then(|| hits.iter().sum())
}

/// The figures between `prev` and `now` (rates are zero on the first scrape).
pub fn compute(plan: &Plan, prev: Option<&Scrape>, now: &Scrape, scrapes: u64) -> Stats {
    let now_samples: Vec<Sample> = now.samples().cloned().collect();
    let cur = edge_totals(&now_samples);
    let before = prev
        .map(|p| edge_totals(&p.samples().cloned().collect::<Vec<_>>()))
        .unwrap_or_default();
    let dt = prev.map_or(0.0, |p| now.at - p.at);
    let rate = |a: f64, b: f64| {
        if dt > 0.0 {
            ((a - b) / dt).max(0.0)
        } else {
            0.0
        }
    };
    let mut edges = Vec::new();
    for e in &plan.edges {
        let (from, to) = (e.from.to_string(), e.to.to_string());
        let mut transports: Vec<&str> = e.links.iter().map(|l| l.transport.as_str()).collect();
        transports.sort();
        transports.dedup();
        for transport in transports {
            let key = (from.clone(), to.clone(), transport.to_string());
            let c = cur.get(&key).copied().unwrap_or_default();
            let b = before.get(&key).copied().unwrap_or(c);
            let calls = c.duration_count - b.duration_count;
            edges.push(EdgeStats {
                from: from.clone(),
                to: to.clone(),
                transport: transport.to_string(),
                kind: match e.kind {
                    EdgeKind::Call => "call",
                    EdgeKind::Feedback => "feedback",
                }
                .to_string(),
                requests_total: c.requests,
                responses_total: c.responses,
                errors_total: c.errors,
                bytes_total: c.bytes,
                requests_per_s: rate(c.requests, b.requests),
                responses_per_s: rate(c.responses, b.responses),
                bytes_per_s: rate(c.bytes, b.bytes),
                errors_per_s: rate(c.errors, b.errors),
                inflight: c.inflight,
                latency_ms: (calls > 0.0).then(|| (c.duration_sum - b.duration_sum) / calls * 1e3),
            });
        }
    }
    let engine: Vec<&Sample> = now_samples
        .iter()
        .filter(|s| s.name.starts_with("dynamo_engine_"))
        .collect();
    let mut nodes = Vec::new();
    for n in &plan.nodes {
        let incoming: Vec<&EdgeStats> = edges
            .iter()
            .filter(|e| e.kind == "call" && e.to.split('.').next() == Some(n.name.as_str()))
            .collect();
        let through = if incoming.is_empty() {
            edges
                .iter()
                .filter(|e| e.kind == "call" && e.from.split('.').next() == Some(n.name.as_str()))
                .collect()
        } else {
            incoming
        };
        let replicas: Vec<ReplicaStats> = plan
            .replicas
            .iter()
            .filter(|r| r.id.node == n.name)
            .map(|r| {
                let up = matches!(now.processes.get(&r.process), Some(Some(_)));
                let get = |name: &str, extra| sample_sum(&engine, name, &n.name, r.id.index, extra);
                ReplicaStats {
                    index: r.id.index,
                    process: r.process.clone(),
                    machine: r.machine.clone(),
                    state: if up { "up" } else { "down" }.to_string(),
                    running: get("dynamo_engine_running_requests", None),
                    waiting: get("dynamo_engine_waiting_requests", None),
                    kv_active: get("dynamo_engine_kv_blocks", Some(("state", "active"))),
                    kv_capacity: get("dynamo_engine_kv_blocks_capacity", None),
                }
            })
            .collect();
        let errors_per_s: f64 = through.iter().map(|e| e.errors_per_s).sum();
        let down = replicas.iter().filter(|r| r.state == "down").count();
        let health = if !replicas.is_empty() && down == replicas.len() {
            "down"
        } else if down > 0 || errors_per_s > 0.0 {
            "degraded"
        } else {
            "ok"
        };
        nodes.push(NodeStats {
            node: n.name.clone(),
            kind: n.kind.clone(),
            health: health.to_string(),
            requests_per_s: through.iter().map(|e| e.requests_per_s).sum(),
            errors_per_s,
            inflight: through.iter().map(|e| e.inflight).sum(),
            replicas,
        });
    }
    Stats {
        graph: plan.graph.clone(),
        scrapes,
        interval_s: dt,
        edges,
        nodes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_with_and_without_labels() {
        let s = parse(
            "# HELP x y\nup 1\ndynamo_edge_messages_total{from=\"a.out\",to=\"b.in\",direction=\"request\"} 12\nbad line\n",
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].name, "up");
        assert_eq!(s[1].labels.get("to").map(String::as_str), Some("b.in"));
        assert_eq!(
            s[1].labels.get("direction").map(String::as_str),
            Some("request")
        );
        assert_eq!(s[1].value, 12.0);
    }

    #[test]
    fn edge_totals_sum_replicas_and_split_directions() {
        let text = "\
dynamo_edge_messages_total{from=\"r.out\",to=\"w.in\",transport=\"socket\",replica=\"0\",direction=\"request\"} 3
dynamo_edge_messages_total{from=\"r.out\",to=\"w.in\",transport=\"socket\",replica=\"1\",direction=\"request\"} 4
dynamo_edge_messages_total{from=\"r.out\",to=\"w.in\",transport=\"socket\",replica=\"0\",direction=\"response\"} 30
dynamo_edge_request_duration_seconds_sum{from=\"r.out\",to=\"w.in\",transport=\"socket\",replica=\"0\"} 0.5
dynamo_edge_request_duration_seconds_count{from=\"r.out\",to=\"w.in\",transport=\"socket\",replica=\"0\"} 5
";
        let t = edge_totals(&parse(text));
        let e = t
            .get(&("r.out".into(), "w.in".into(), "socket".into()))
            .copied()
            .unwrap_or_default();
        assert_eq!(e.requests, 7.0);
        assert_eq!(e.responses, 30.0);
        assert_eq!(e.duration_count, 5.0);
    }
}
