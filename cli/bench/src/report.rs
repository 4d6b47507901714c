//! The result of a run: counts, throughput, latency summaries, errors by kind, CPU cost.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::client::Outcome;
use crate::stats::LatencySummary;

/// CPU time of the `--server-pids` processes over the measured phase.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CpuReport {
    pub server_pids: Vec<u32>,
    pub cpu_ms_total: f64,
    /// Per successful request.
    pub cpu_ms_per_request: f64,
    /// Per output token of successful requests.
    pub cpu_us_per_token: f64,
}

/// What a run measured. Latencies are in milliseconds and cover successful requests only;
/// `ttft_ms` and `itl_ms` are empty without streaming.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub url: String,
    pub model: String,
    pub endpoint: String,
    pub stream: bool,
    /// `closed` or `open`.
    pub mode: String,
    pub concurrency: Option<usize>,
    pub request_rate: Option<f64>,
    pub max_concurrency: Option<usize>,
    pub warmup_requests: u64,
    pub requests_ok: u64,
    pub requests_failed: u64,
    pub duration_s: f64,
    pub requests_per_s: f64,
    pub output_tokens: u64,
    /// Server-reported prompt tokens where the server reports them, else the generator's
    /// approximation.
    pub input_tokens: u64,
    pub output_tokens_per_s: f64,
    pub input_tokens_per_s: f64,
    pub ttft_ms: LatencySummary,
    /// Gaps between consecutive content chunks (one per token on servers that send a
    /// token per chunk).
    pub itl_ms: LatencySummary,
    pub e2e_ms: LatencySummary,
    /// Failed requests by kind (`http_400`, `timeout`, `sse_error`, …).
    pub errors: BTreeMap<String, u64>,
    /// The first message seen for each error kind.
    pub error_examples: BTreeMap<String, String>,
    #[serde(flatten)]
    pub cpu: Option<CpuReport>,
}

/// How the run was driven, for the report header.
pub(crate) struct Header {
    pub url: String,
    pub model: String,
    pub endpoint: String,
    pub stream: bool,
    pub concurrency: Option<usize>,
    pub request_rate: Option<f64>,
    pub max_concurrency: Option<usize>,
    pub warmup_requests: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn per(total: f64, n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        total / n as f64
    }
}

impl Report {
    pub(crate) fn build(
        h: Header,
        outcomes: &[Outcome],
        elapsed: Duration,
        cpu: Option<(Vec<u32>, Duration)>,
    ) -> Report {
        let mut errors = BTreeMap::new();
        let mut error_examples = BTreeMap::new();
        let (mut ttft, mut itl, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
        let (mut ok, mut out_tokens, mut in_tokens) = (0u64, 0u64, 0u64);
        for o in outcomes {
            if let Some((kind, message)) = &o.error {
                let key = kind.to_string();
                *errors.entry(key.clone()).or_insert(0u64) += 1;
                error_examples.entry(key).or_insert_with(|| message.clone());
                continue;
            }
            ok += 1;
            out_tokens += o.output_tokens;
            in_tokens += o.input_tokens;
            ttft.extend(o.ttft.map(ms));
            itl.extend(o.itl.iter().copied().map(ms));
            e2e.push(ms(o.e2e));
        }
        let secs = elapsed.as_secs_f64();
        let rate = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let cpu = cpu.map(|(server_pids, used)| {
            let total = ms(used);
            CpuReport {
                server_pids,
                cpu_ms_total: total,
                cpu_ms_per_request: per(total, ok),
                cpu_us_per_token: per(total * 1000.0, out_tokens),
            }
        });
        Report {
            url: h.url,
            model: h.model,
            endpoint: h.endpoint,
            stream: h.stream,
            mode: if h.request_rate.is_some() {
                "open"
            } else {
                "closed"
            }
            .into(),
            concurrency: h.concurrency,
            request_rate: h.request_rate,
            max_concurrency: h.max_concurrency,
            warmup_requests: h.warmup_requests,
            requests_ok: ok,
            requests_failed: outcomes.len() as u64 - ok,
            duration_s: secs,
            requests_per_s: rate(ok),
            output_tokens: out_tokens,
            input_tokens: in_tokens,
            output_tokens_per_s: rate(out_tokens),
            input_tokens_per_s: rate(in_tokens),
            ttft_ms: LatencySummary::from_ms(ttft),
            itl_ms: LatencySummary::from_ms(itl),
            e2e_ms: LatencySummary::from_ms(e2e),
            errors,
            error_examples,
            cpu,
        }
    }

    /// The report as one JSON object (keys as the struct fields; CPU keys at top level).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }

    /// The report as a table for a terminal.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let load = match (self.request_rate, self.concurrency) {
            (Some(r), _) => match self.max_concurrency {
                Some(m) => format!("open loop, {r} req/s (Poisson), at most {m} in flight"),
                None => format!("open loop, {r} req/s (Poisson)"),
            },
            (None, c) => format!("closed loop, concurrency {}", c.unwrap_or(1)),
        };
        let stream = if self.stream {
            "streaming"
        } else {
            "not streaming"
        };
        let _ = writeln!(
            s,
            "{} · model {} · {} · {stream} · {load}",
            self.url, self.model, self.endpoint
        );
        self.write_measurements(&mut s, "approximate");
        s
    }
    /// Everything below the header line: counts, rates, the latency table, errors and CPU.
    /// `input_note` says where the input token count comes from.
    pub(crate) fn write_measurements(&self, s: &mut String, input_note: &str) {
        let _ = writeln!(
            s,
            "requests      {} ok, {} failed ({} warmup not counted)",
            self.requests_ok, self.requests_failed, self.warmup_requests
        );
        let _ = writeln!(s, "duration      {:.2} s", self.duration_s);
        let _ = writeln!(s, "throughput    {:.2} req/s", self.requests_per_s);
        let _ = writeln!(
            s,
            "output        {} tokens, {:.1} tok/s",
            self.output_tokens, self.output_tokens_per_s
        );
        let _ = writeln!(
            s,
            "input         {} tokens ({input_note}), {:.1} tok/s",
            self.input_tokens, self.input_tokens_per_s
        );
        s.push('\n');
        write_latency_table(
            s,
            &[
                ("TTFT", &self.ttft_ms),
                ("ITL", &self.itl_ms),
                ("E2E", &self.e2e_ms),
            ],
        );
        if !self.errors.is_empty() {
            let _ = writeln!(s, "\nerrors");
            for (kind, n) in &self.errors {
                let example = self
                    .error_examples
                    .get(kind)
                    .map(String::as_str)
                    .unwrap_or("");
                let _ = writeln!(s, "  {kind:<18} {n:>8}  {example}");
            }
        }
        if let Some(c) = &self.cpu {
            let pids: Vec<String> = c.server_pids.iter().map(u32::to_string).collect();
            let _ = writeln!(
                s,
                "\nserver CPU (pids {}): {:.1} ms total, {:.3} ms/request, {:.2} µs/token",
                pids.join(","),
                c.cpu_ms_total,
                c.cpu_ms_per_request,
                c.cpu_us_per_token
            );
        }
    }
}

/// A latency table in milliseconds: a header line, then a row per summary (`-` for one
/// with no samples).
pub(crate) fn write_latency_table(s: &mut String, rows: &[(&str, &LatencySummary)]) {
    let _ = writeln!(
        s,
        "{:<10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "ms", "mean", "p50", "p90", "p99", "count"
    );
    for (name, l) in rows {
        if l.count == 0 {
            let _ = writeln!(s, "{name:<10} {:>10}", "-");
            continue;
        }
        let _ = writeln!(
            s,
            "{name:<10} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10}",
            l.mean, l.p50, l.p90, l.p99, l.count
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn header() -> Header {
        Header {
            url: "http://x".into(),
            model: "m".into(),
            endpoint: "chat".into(),
            stream: true,
            concurrency: Some(2),
            request_rate: None,
            max_concurrency: None,
            warmup_requests: 0,
        }
    }

    #[test]
    fn counts_tokens_and_errors_of_mixed_outcomes() {
        let good = Outcome {
            ttft: Some(Duration::from_millis(10)),
            itl: vec![Duration::from_millis(2); 3],
            e2e: Duration::from_millis(16),
            output_tokens: 4,
            input_tokens: 8,
            ..Outcome::default()
        };
        let bad = Outcome {
            error: Some((ErrorKind::Status(400), "bad".into())),
            output_tokens: 99,
            ..Outcome::default()
        };
        let cpu = Some((vec![7], Duration::from_millis(40)));
        let r = Report::build(
            header(),
            &[good.clone(), good, bad],
            Duration::from_secs(2),
            cpu,
        );
        assert_eq!((r.requests_ok, r.requests_failed), (2, 1));
        assert_eq!((r.output_tokens, r.input_tokens), (8, 16));
        assert!((r.requests_per_s - 1.0).abs() < 1e-9);
        assert!((r.output_tokens_per_s - 4.0).abs() < 1e-9);
        assert_eq!(r.itl_ms.count, 6);
        assert!((r.ttft_ms.p50 - 10.0).abs() < 1e-9);
        assert_eq!(r.errors.get("http_400"), Some(&1));
        let c = r.cpu.clone();
        assert_eq!(c.as_ref().map(|c| c.cpu_ms_per_request), Some(20.0));
        assert_eq!(c.as_ref().map(|c| c.cpu_us_per_token), Some(5000.0));
        let j = r.to_json();
        assert_eq!(j["cpu_ms_total"], 40.0);
        assert_eq!(j["errors"]["http_400"], 1);
        assert_eq!(j["ttft_ms"]["count"], 2);
        let t = r.to_text();
        assert!(
            t.contains("2 ok, 1 failed") && t.contains("http_400") && t.contains("µs/token"),
            "{t}"
        );
    }

    #[test]
    fn empty_run_has_zero_rates_not_nan() {
        let r = Report::build(header(), &[], Duration::ZERO, None);
        assert_eq!(r.requests_per_s, 0.0);
        assert!(r.to_json().get("cpu_ms_total").is_none());
        assert!(r.to_text().contains("0 ok"));
    }
}
