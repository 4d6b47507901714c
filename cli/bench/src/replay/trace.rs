//! Mooncake trace rows: strict parsing (a bad row is an error naming its line) and the
//! selection of the rows to replay (window, length limits, output caps, schedule).

use std::time::Duration;

use serde::Deserialize;

use super::args::LongPrompt;
use crate::BenchError;

/// One row as written in the trace. Unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct TraceRow {
    /// Arrival in milliseconds from the start of the trace.
    pub timestamp: f64,
    pub input_length: u64,
    pub output_length: u64,
    /// One id per `block_tokens` prompt tokens; equal ids mean equal prefixes.
    pub hash_ids: Vec<u64>,
}

/// Parses and checks one line: timestamps finite and ≥ 0, a non-empty prompt, and exactly
/// `ceil(input_length / block_tokens)` hash ids.
pub(crate) fn parse_row(text: &str, block_tokens: usize) -> Result<TraceRow, String> {
    let row: TraceRow = serde_json::from_str(text).map_err(|e| format!("not a trace row: {e}"))?;
    if !(row.timestamp.is_finite() && row.timestamp >= 0.0) {
        return Err(format!(
            "timestamp {} is not a time ≥ 0 in ms",
            row.timestamp
        ));
    }
    if row.input_length == 0 {
        return Err("input_length is 0: the prompt would be empty".into());
    }
    let bt = block_tokens.max(1) as u64;
    let needed = row.input_length.div_ceil(bt);
    if row.hash_ids.len() as u64 != needed {
        return Err(format!(
            "{} hash_ids for input_length {}, which needs ceil({}/{bt}) = {needed} blocks \
             (is --block-tokens {bt} the trace's block size?)",
            row.hash_ids.len(),
            row.input_length,
            row.input_length
        ));
    }
    Ok(row)
}

/// The start offset of a row: `(timestamp − first) × time_scale`, never negative.
pub(crate) fn scaled_offset(timestamp_ms: f64, first_ms: f64, time_scale: f64) -> Duration {
    let secs = (timestamp_ms - first_ms).max(0.0) * time_scale / 1000.0;
    // Only an absurd trace overflows; ten years stands in for "never".
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::from_secs(315_360_000))
}

/// A row ready to send.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Planned {
    /// 1-based line in the trace file.
    pub line: usize,
    /// The trace's arrival time, ms.
    pub timestamp_ms: f64,
    /// When to send it, from the start of the replay.
    pub offset: Duration,
    /// The blocks the (maybe truncated) prompt uses.
    pub hash_ids: Vec<u64>,
    pub prompt_tokens: usize,
    pub max_tokens: u32,
    /// The prompt was cut to `--max-input-tokens`.
    pub truncated: bool,
    /// `max_tokens` is below the row's `output_length`.
    pub output_capped: bool,
}

/// Which rows to take and how to fit them to the model.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub start_offset: u64,
    pub max_requests: Option<u64>,
    pub max_duration: Option<Duration>,
    pub time_scale: f64,
    pub block_tokens: usize,
    pub max_input_tokens: usize,
    pub long_prompts: LongPrompt,
    pub max_output_tokens: Option<u32>,
    pub context_tokens: usize,
}

/// The rows to replay and what was changed to fit them.
#[derive(Debug, Default)]
pub(crate) struct Selection {
    pub rows: Vec<Planned>,
    /// Rows over `--max-input-tokens` left out (`--long-prompts skip`).
    pub skipped_long: u64,
}

/// Reads the window of rows the limits describe. Lines before `--start-offset` are counted
/// but not parsed; parsing stops at the first row past the window.
pub(crate) fn select(text: &str, path: &str, lim: &Limits) -> Result<Selection, BenchError> {
    let mut sel = Selection::default();
    let mut row_index = 0u64;
    let mut first_ms: Option<f64> = None;
    let mut last_ms = f64::NEG_INFINITY;
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        row_index += 1;
        if row_index <= lim.start_offset {
            continue;
        }
        if lim.max_requests.is_some_and(|n| sel.rows.len() as u64 >= n) {
            break;
        }
        let bad = |reason: String| BenchError::TraceRow {
            path: path.to_string(),
            line: line_no,
            reason,
        };
        let row = parse_row(line, lim.block_tokens).map_err(bad)?;
        if row.timestamp < last_ms {
            return Err(bad(format!(
                "timestamp {} ms is before the previous row's {last_ms} ms (rows must be in time order)",
                row.timestamp
            )));
        }
        last_ms = row.timestamp;
        let too_long = row.input_length > lim.max_input_tokens as u64;
        if too_long && lim.long_prompts == LongPrompt::Skip {
            sel.skipped_long += 1;
            continue;
        }
        let first = *first_ms.get_or_insert(row.timestamp);
        let offset = scaled_offset(row.timestamp, first, lim.time_scale);
        if lim.max_duration.is_some_and(|d| offset > d) {
            break;
        }
        sel.rows.push(plan_row(row, line_no, offset, lim));
    }
    if sel.rows.is_empty() {
        let reason = if row_index <= lim.start_offset {
            format!(
                "--start-offset {} skips all {row_index} rows",
                lim.start_offset
            )
        } else {
            format!(
                "every row in the window is over --max-input-tokens ({} skipped)",
                sel.skipped_long
            )
        };
        return Err(BenchError::EmptyTrace {
            path: path.to_string(),
            reason,
        });
    }
    Ok(sel)
}

fn plan_row(row: TraceRow, line: usize, offset: Duration, lim: &Limits) -> Planned {
    let prompt_tokens = (row.input_length as usize).min(lim.max_input_tokens);
    let blocks = prompt_tokens.div_ceil(lim.block_tokens.max(1));
    let mut hash_ids = row.hash_ids;
    hash_ids.truncate(blocks);
    let room = lim.context_tokens.saturating_sub(prompt_tokens).max(1);
    let wanted = u32::try_from(row.output_length).unwrap_or(u32::MAX).max(1);
    let max_tokens = wanted
        .min(lim.max_output_tokens.unwrap_or(u32::MAX))
        .min(u32::try_from(room).unwrap_or(u32::MAX));
    Planned {
        line,
        timestamp_ms: row.timestamp,
        offset,
        hash_ids,
        prompt_tokens,
        max_tokens,
        truncated: prompt_tokens as u64 != row.input_length,
        output_capped: u64::from(max_tokens) < row.output_length,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            start_offset: 0,
            max_requests: None,
            max_duration: None,
            time_scale: 1.0,
            block_tokens: 4,
            max_input_tokens: 10,
            long_prompts: LongPrompt::Truncate,
            max_output_tokens: None,
            context_tokens: 16,
        }
    }

    fn row(ts: u64, input: u64, output: u64, ids: &[u64]) -> String {
        format!(
            "{{\"timestamp\": {ts}, \"input_length\": {input}, \"output_length\": {output}, \"hash_ids\": {ids:?}}}"
        )
    }

    fn err_of(text: &str, lim: &Limits) -> String {
        match select(text, "t.jsonl", lim) {
            Ok(s) => panic!("accepted: {:?}", s.rows),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bad_lines_are_errors_with_their_line_number() {
        let good = row(0, 5, 1, &[1, 2]);
        let cases = [
            ("{not json", "not a trace row"),
            ("{\"timestamp\": 1}", "missing field"),
            (
                "{\"timestamp\": -1, \"input_length\": 1, \"output_length\": 1, \"hash_ids\": [1]}",
                "timestamp",
            ),
            (
                "{\"timestamp\": 1, \"input_length\": -3, \"output_length\": 1, \"hash_ids\": [1]}",
                "not a trace row",
            ),
            (&row(1, 0, 1, &[]), "input_length is 0"),
            (&row(1, 9, 1, &[1, 2]), "needs ceil(9/4) = 3 blocks"),
            (&row(1, 4, 1, &[1, 2]), "2 hash_ids"),
            ("[1, 2, 3]", "not a trace row"),
        ];
        for (bad, want) in cases {
            // Line 3: a blank line and a good row come first.
            let text = format!("{good}\n\n{bad}\n{good}\n");
            let e = err_of(&text, &limits());
            assert!(
                e.starts_with("t.jsonl:3: ") && e.contains(want),
                "{bad}: {e}"
            );
        }
        let text = format!("{}\n{}\n", row(5, 1, 1, &[1]), row(4, 1, 1, &[1]));
        assert!(err_of(&text, &limits()).contains("t.jsonl:2: timestamp 4 ms is before"));
    }

    #[test]
    fn window_offset_and_count() {
        let text: String = (0..10)
            .map(|i| row(i * 100, 3, 2, &[i]) + "\n")
            .collect::<String>()
            + "garbage after the window is never parsed\n";
        let lim = Limits {
            start_offset: 2,
            max_requests: Some(3),
            time_scale: 0.5,
            ..limits()
        };
        let s = match select(&text, "t", &lim) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        let lines: Vec<usize> = s.rows.iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![3, 4, 5]);
        let offsets: Vec<Duration> = s.rows.iter().map(|r| r.offset).collect();
        assert_eq!(
            offsets,
            [0, 50, 100].map(Duration::from_millis).to_vec(),
            "offsets from the first replayed row, times 0.5"
        );
        let stamps: Vec<f64> = s.rows.iter().map(|r| r.timestamp_ms).collect();
        assert_eq!(stamps, vec![200.0, 300.0, 400.0]);
        let lim = Limits {
            max_duration: Some(Duration::from_millis(250)),
            time_scale: 1.0,
            ..limits()
        };
        let text: String = (0..10).map(|i| row(i * 100, 3, 2, &[i]) + "\n").collect();
        let n = select(&text, "t", &lim).map(|s| s.rows.len()).ok();
        assert_eq!(n, Some(3), "rows at 0, 100 and 200 ms fit in 250 ms");
        let lim = Limits {
            start_offset: 10,
            ..limits()
        };
        assert!(err_of(&text, &lim).contains("skips all 10 rows"));
    }

    #[test]
    fn time_scaling_of_the_schedule() {
        assert_eq!(scaled_offset(1500.0, 500.0, 1.0), Duration::from_secs(1));
        assert_eq!(
            scaled_offset(1500.0, 500.0, 0.1),
            Duration::from_millis(100)
        );
        assert_eq!(scaled_offset(1500.0, 500.0, 0.0), Duration::ZERO);
        assert_eq!(scaled_offset(100.0, 500.0, 1.0), Duration::ZERO);
        assert!(scaled_offset(1e300, 0.0, 1e10) >= Duration::from_secs(3600));
    }

    #[test]
    fn long_prompts_are_truncated_or_skipped_and_outputs_capped() {
        // max input 10, context 16, blocks of 4.
        let text = [
            row(0, 6, 3, &[1, 2]),
            row(1, 12, 20, &[1, 2, 3]),
            row(2, 3, 100, &[7]),
        ]
        .join("\n");
        let s = match select(&text, "t", &limits()) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        let got: Vec<(Vec<u64>, usize, u32)> = s
            .rows
            .iter()
            .map(|r| (r.hash_ids.clone(), r.prompt_tokens, r.max_tokens))
            .collect();
        assert_eq!(
            got,
            vec![(vec![1, 2], 6, 3), (vec![1, 2, 3], 10, 6), (vec![7], 3, 13)]
        );
        let count = |f: fn(&Planned) -> bool| s.rows.iter().filter(|r| f(r)).count();
        assert_eq!(count(|r| r.truncated), 1);
        assert_eq!(count(|r| r.output_capped), 2);
        assert_eq!(s.skipped_long, 0);
        let lim = Limits {
            long_prompts: LongPrompt::Skip,
            max_output_tokens: Some(2),
            ..limits()
        };
        let s = select(&text, "t", &lim).ok();
        let lines: Option<Vec<usize>> = s.as_ref().map(|s| s.rows.iter().map(|r| r.line).collect());
        assert_eq!(lines, Some(vec![1, 3]));
        let capped = s
            .as_ref()
            .map(|s| s.rows.iter().filter(|r| r.output_capped).count());
        assert_eq!(capped, Some(2));
        assert_eq!(s.map(|s| s.skipped_long), Some(1));
        let all_long = row(0, 12, 1, &[1, 2, 3]);
        assert!(err_of(&all_long, &lim).contains("1 skipped"));
    }
}
