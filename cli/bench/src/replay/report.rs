//! The result of a replay: the usual request measurements ([`Report`]), what was taken
//! from the trace, how well the schedule was kept, and the KV hit rate against the
//! trace's ceiling.

use std::fmt::Write as _;

use serde::Serialize;

use super::ideal::IdealHitRate;
use super::metrics::KvReport;
use crate::report::write_latency_table;
use crate::{LatencySummary, Report};

/// What was taken from the trace and what was changed to fit the model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceSummary {
    pub path: String,
    /// Rows skipped at the start (`--start-offset`).
    pub start_offset: u64,
    /// Rows in the window after length limits.
    pub rows_planned: u64,
    /// Rows started (fewer than planned only when `--max-duration` ended a capped wait).
    pub rows_sent: u64,
    /// Rows over `--max-input-tokens` left out (`--long-prompts skip`).
    pub rows_skipped_too_long: u64,
    /// Sent rows whose prompt was cut to `max_input_tokens`.
    pub rows_truncated: u64,
    /// Sent rows whose `max_tokens` is below the trace's `output_length`.
    pub outputs_capped: u64,
    pub max_input_tokens: usize,
    /// Prompt tokens of the sent rows.
    pub prompt_tokens_sent: u64,
    pub time_scale: f64,
    /// First to last sent row in the trace's own time.
    pub trace_span_s: f64,
}

/// What a replay measured. The request measurements are the [`Report`] fields (flattened
/// into the JSON object, `mode` is `replay`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayReport {
    #[serde(flatten)]
    pub run: Report,
    pub trace: TraceSummary,
    /// How late requests started against their scheduled times (the load generator's own
    /// lag, or waits at `--concurrency-limit`).
    pub start_lag_ms: LatencySummary,
    /// TTFT counted from each row's scheduled start instead of its send: the start lag
    /// added, so a wait at `--concurrency-limit` counts (no coordinated omission).
    pub ttft_from_schedule_ms: LatencySummary,
    /// E2E counted the same way.
    pub e2e_from_schedule_ms: LatencySummary,
    /// The infinite-cache prefix hit rate of the sent prompts, in trace order.
    pub ideal: IdealHitRate,
    /// The engines' counters over the run; absent when `/metrics` has none.
    pub kv: Option<KvReport>,
    /// Why `kv` is absent.
    pub kv_note: Option<String>,
}

/// A start later than this is the in-flight cap at work, not the load generator's jitter.
pub(super) const CAPPED_LAG_MS: f64 = 100.0;

/// A warning when requests waited for `--concurrency-limit`: TTFT and E2E count from the
/// send, so that wait is missing from them (a queue moved into the client), and the
/// figures understate what the trace's schedule would have met.
fn lag_note(lag: &LatencySummary) -> Option<String> {
    (lag.max > CAPPED_LAG_MS).then(|| {
        format!(
            "note          requests started up to {:.0} ms late, waiting for a free slot under \
             --concurrency-limit; TTFT and E2E count from the send and leave that wait out \
             (the `sch.` rows count it): raise the limit to measure the schedule as the trace \
             has it",
            lag.max
        )
    })
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

impl ReplayReport {
    /// TTFT and E2E from the schedule, a table of their own under the note, when a start
    /// was late enough for them to differ (see [`CAPPED_LAG_MS`]).
    fn schedule_rows(&self) -> Option<String> {
        lag_note(&self.start_lag_ms)?;
        let mut s =
            String::from("\nfrom the schedule (each row's wait for a free slot included)\n");
        write_latency_table(
            &mut s,
            &[
                ("TTFT sch.", &self.ttft_from_schedule_ms),
                ("E2E sch.", &self.e2e_from_schedule_ms),
            ],
        );
        Some(s)
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }

    /// The report as a table for a terminal.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let t = &self.trace;
        let _ = writeln!(
            s,
            "{} · model {} · replay of {} rows {}..{} · time scale {}",
            self.run.url,
            self.run.model,
            t.path,
            t.start_offset + 1,
            t.start_offset + t.rows_planned + t.rows_skipped_too_long,
            t.time_scale
        );
        let _ = writeln!(
            s,
            "trace         {} of {} rows sent, {:.1} s of trace; {} prompts truncated to {} tokens, {} skipped as too long, {} outputs capped",
            t.rows_sent,
            t.rows_planned,
            t.trace_span_s,
            t.rows_truncated,
            t.max_input_tokens,
            t.rows_skipped_too_long,
            t.outputs_capped
        );
        let l = &self.start_lag_ms;
        let _ = writeln!(
            s,
            "start lag     p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            l.p50, l.p99, l.max
        );
        if let Some(note) = lag_note(l) {
            let _ = writeln!(s, "{note}");
        }
        if let Some(rows) = self.schedule_rows() {
            let _ = write!(s, "{rows}");
        }
        self.run.write_measurements(&mut s, "sent token ids");
        let i = &self.ideal;
        let _ = writeln!(
            s,
            "\nprefix reuse  ideal (infinite cache) {} of tokens, {} of blocks",
            pct(i.token_rate),
            pct(i.block_rate)
        );
        match (&self.kv, &self.kv_note) {
            (Some(kv), _) => {
                let _ = writeln!(
                    s,
                    "KV hit rate   {} measured ({} of {} prompt tokens from the prefix cache)",
                    pct(kv.hit_rate),
                    kv.prefix_hit_tokens,
                    kv.prompt_tokens
                );
                let _ = writeln!(
                    s,
                    "workers       {}; busiest {:.2}× the mean share of prompt tokens",
                    kv.workers.len(),
                    kv.busiest_vs_mean
                );
                for w in &kv.workers {
                    let _ = writeln!(
                        s,
                        "  {}/{:<12} {:>6}  {:>10} prompt tokens, {:>10} hit",
                        w.worker.node,
                        w.worker.replica,
                        pct(w.share),
                        w.prompt_tokens,
                        w.prefix_hit_tokens
                    );
                }
            }
            (None, note) => {
                let note = note.as_deref().unwrap_or("no engine metrics");
                let _ = writeln!(s, "KV hit rate   not measured: {note}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_start_is_called_out() {
        let jitter = LatencySummary::from_ms(vec![0.5, 1.0, 3.0]);
        assert_eq!(lag_note(&jitter), None);
        let capped = LatencySummary::from_ms(vec![0.5, 1.0, 1255.8]);
        let note = lag_note(&capped).unwrap_or_default();
        assert!(note.contains("1256 ms late"), "{note}");
        assert!(note.contains("--concurrency-limit"), "{note}");
    }
}
