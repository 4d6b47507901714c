//! The engine counters of the frontend's `/metrics` (OpenMetrics text), read before and
//! after a replay: the measured KV hit rate and each worker's share of the prompt tokens.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::client::base;

/// Prompt tokens scheduled, per worker.
pub const PROMPT_TOKENS: &str = "dynamo_engine_prompt_tokens_total";
/// Prompt tokens served from the prefix cache, per worker.
pub const PREFIX_HIT_TOKENS: &str = "dynamo_engine_prefix_hit_tokens_total";

/// A worker: the `{node, replica}` labels of its samples.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct WorkerId {
    pub node: String,
    pub replica: String,
}

/// The two counters of one worker.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Counters {
    pub prompt: f64,
    pub hit: f64,
}

/// The engine counters of one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Snapshot {
    pub workers: BTreeMap<WorkerId, Counters>,
    /// Lines of the two families that could not be read.
    pub malformed: usize,
}

/// Reads the two families from exposition text; other families and comments are skipped.
pub(crate) fn parse_snapshot(text: &str) -> Snapshot {
    let mut s = Snapshot::default();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
        let name = &line[..name_end];
        if name != PROMPT_TOKENS && name != PREFIX_HIT_TOKENS {
            continue;
        }
        match sample(&line[name_end..]) {
            Some((labels, value)) => {
                let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
                let id = WorkerId {
                    node: label("node"),
                    replica: label("replica"),
                };
                let c = s.workers.entry(id).or_default();
                if name == PROMPT_TOKENS {
                    c.prompt += value;
                } else {
                    c.hit += value;
                }
            }
            None => s.malformed += 1,
        }
    }
    s
}

/// `{labels} value [timestamp]` after the metric name.
fn sample(rest: &str) -> Option<(BTreeMap<String, String>, f64)> {
    let rest = rest.trim_start();
    let (labels, rest) = match rest.strip_prefix('{') {
        Some(inner) => labels(inner)?,
        None => (BTreeMap::new(), rest),
    };
    let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
    (value.is_finite() && value >= 0.0).then_some((labels, value))
}

/// Parses `k="v",…}` and returns the labels and the text after `}`.
fn labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut out = BTreeMap::new();
    // Bounded: every turn consumes at least the `="` of a label or ends.
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((out, rest));
        }
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        out.insert(key.trim().to_string(), value);
        s = &rest[end + 1..];
    }
}

/// The counters' growth over the run, per worker present after it. A counter that went
/// down (a restarted worker) counts from zero.
pub(crate) fn delta(before: &Snapshot, after: &Snapshot) -> BTreeMap<WorkerId, Counters> {
    let grow = |b: f64, a: f64| if a >= b { a - b } else { a };
    after
        .workers
        .iter()
        .map(|(id, a)| {
            let b = before.workers.get(id).copied().unwrap_or_default();
            let d = Counters {
                prompt: grow(b.prompt, a.prompt),
                hit: grow(b.hit, a.hit),
            };
            (id.clone(), d)
        })
        .collect()
}

/// One worker's part of the replay's prompt tokens.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerShare {
    #[serde(flatten)]
    pub worker: WorkerId,
    pub prompt_tokens: u64,
    pub prefix_hit_tokens: u64,
    /// Of all workers' prompt tokens, 0..1.
    pub share: f64,
}

/// What the engine counters say about the replay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KvReport {
    pub prompt_tokens: u64,
    pub prefix_hit_tokens: u64,
    /// `prefix_hit_tokens / prompt_tokens`.
    pub hit_rate: f64,
    /// Sorted by node, then replica; workers that got nothing are listed with 0.
    pub workers: Vec<WorkerShare>,
    /// The busiest worker's prompt tokens over the mean per worker (1.0 = balanced).
    pub busiest_vs_mean: f64,
}

/// The report from two scrapes, or why there is none.
pub(crate) fn kv_report(before: &Snapshot, after: &Snapshot) -> Result<KvReport, String> {
    if after.workers.is_empty() {
        return Err(format!(
            "/metrics has no {PROMPT_TOKENS} samples ({} malformed lines)",
            after.malformed
        ));
    }
    let d = delta(before, after);
    let prompt: f64 = d.values().map(|c| c.prompt).sum();
    let hit: f64 = d.values().map(|c| c.hit).sum();
    if prompt <= 0.0 {
        return Err("the engines counted no prompt tokens during the replay".into());
    }
    let mean = prompt / d.len() as f64;
    let busiest = d.values().map(|c| c.prompt).fold(0.0, f64::max);
    let workers = d
        .into_iter()
        .map(|(worker, c)| WorkerShare {
            worker,
            prompt_tokens: c.prompt.round() as u64,
            prefix_hit_tokens: c.hit.round() as u64,
            share: c.prompt / prompt,
        })
        .collect();
    Ok(KvReport {
        prompt_tokens: prompt.round() as u64,
        prefix_hit_tokens: hit.round() as u64,
        hit_rate: hit / prompt,
        workers,
        busiest_vs_mean: busiest / mean,
    })
}

/// `GET {url}/metrics`, bounded by `timeout`; the error says why it could not be read.
pub(crate) async fn scrape(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<Snapshot, String> {
    let metrics_url = format!("{}/metrics", base(url));
    let fetch = async {
        let resp = client
            .get(&metrics_url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("status {status}"));
        }
        let body = resp.bytes().await.map_err(|e| e.to_string())?;
        Ok(parse_snapshot(&String::from_utf8_lossy(&body)))
    };
    match tokio::time::timeout(timeout, fetch).await {
        Ok(r) => r.map_err(|e| format!("cannot read {metrics_url}: {e}")),
        Err(_) => Err(format!("{metrics_url} gave no answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# HELP dynamo_engine_prompt_tokens Prompt tokens scheduled
# TYPE dynamo_engine_prompt_tokens counter
dynamo_engine_prompt_tokens_total{node=\"worker\",replica=\"0\"} 100
dynamo_engine_prompt_tokens_total{node=\"worker\",replica=\"1\"} 50
# TYPE dynamo_engine_prefix_hit_tokens counter
dynamo_engine_prefix_hit_tokens_total{node=\"worker\",replica=\"0\"} 10
dynamo_engine_kv_blocks{node=\"worker\",replica=\"0\",state=\"free\"} 7
# EOF
";

    const AFTER: &str =
        "dynamo_engine_prompt_tokens_total{replica=\"0\", node=\"worker\"} 700 1700000000
dynamo_engine_prompt_tokens_total{node=\"worker\",replica=\"1\"} 2.5e2
dynamo_engine_prompt_tokens_total{node=\"wor\\\"ker\",replica=\"2\"} 0
dynamo_engine_prefix_hit_tokens_total{node=\"worker\",replica=\"0\"} 310
dynamo_engine_prefix_hit_tokens_total{node=\"worker\",replica=\"1\"} 100
dynamo_engine_prefix_hit_tokens_total{node=\"worker\",replica=\"1\" 5
dynamo_engine_prompt_tokens_total{node=\"worker\",replica=\"3\"} NaN
dynamo_engine_prompt_tokens_total{node=\"worker\",replica=\"3\"}
";

    fn id(node: &str, replica: &str) -> WorkerId {
        WorkerId {
            node: node.into(),
            replica: replica.into(),
        }
    }

    #[test]
    fn parses_the_two_families_and_counts_bad_lines() {
        let s = parse_snapshot(BEFORE);
        assert_eq!(s.workers.len(), 2);
        assert_eq!(
            s.workers.get(&id("worker", "0")),
            Some(&Counters {
                prompt: 100.0,
                hit: 10.0
            })
        );
        assert_eq!(s.malformed, 0);
        let a = parse_snapshot(AFTER);
        assert_eq!(a.malformed, 3, "unclosed labels, NaN, no value");
        assert_eq!(
            a.workers.get(&id("wor\"ker", "2")).map(|c| c.prompt),
            Some(0.0)
        );
        assert_eq!(
            a.workers.get(&id("worker", "1")).map(|c| c.prompt),
            Some(250.0)
        );
    }

    #[test]
    fn delta_hit_rate_and_shares() {
        let (b, a) = (parse_snapshot(BEFORE), parse_snapshot(AFTER));
        let d = delta(&b, &a);
        assert_eq!(
            d.get(&id("worker", "0")),
            Some(&Counters {
                prompt: 600.0,
                hit: 300.0
            })
        );
        let r = match kv_report(&b, &a) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        // Δ prompt 600 + 200 + 0, Δ hit 300 + 100.
        assert_eq!((r.prompt_tokens, r.prefix_hit_tokens), (800, 400));
        assert!((r.hit_rate - 0.5).abs() < 1e-12);
        let shares: Vec<(String, f64)> = r
            .workers
            .iter()
            .map(|w| (w.worker.replica.clone(), w.share))
            .collect();
        assert_eq!(shares.len(), 3, "the idle worker counts toward the mean");
        let share = |r: &str| shares.iter().find(|s| s.0 == r).map(|s| s.1);
        assert_eq!(share("0"), Some(0.75), "{shares:?}");
        assert_eq!(share("2"), Some(0.0), "{shares:?}");
        assert!((r.busiest_vs_mean - 600.0 / (800.0 / 3.0)).abs() < 1e-12);
    }

    #[test]
    fn restarts_and_absent_metrics() {
        let b = parse_snapshot("dynamo_engine_prompt_tokens_total{node=\"w\",replica=\"0\"} 900\n");
        let a = parse_snapshot("dynamo_engine_prompt_tokens_total{node=\"w\",replica=\"0\"} 40\n");
        assert_eq!(
            delta(&b, &a).get(&id("w", "0")).map(|c| c.prompt),
            Some(40.0)
        );
        let none = parse_snapshot("# HELP x\nhttp_requests_total 5\n");
        assert!(kv_report(&none, &none).is_err_and(|e| e.contains("no dynamo_engine")));
        assert!(kv_report(&a, &a).is_err_and(|e| e.contains("no prompt tokens")));
    }
}
