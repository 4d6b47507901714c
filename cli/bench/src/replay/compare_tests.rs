use std::collections::BTreeMap;

use super::*;
use crate::replay::{IdealHitRate, KvReport, TraceSummary};
use crate::Report;

/// A replay whose TTFTs are `ttft` (ms), with `hit_rate` measured and `lag_ms` the
/// latest start.
fn report(ttft: &[f64], hit_rate: Option<f64>, lag_ms: f64) -> ReplayReport {
    let ms = |xs: &[f64]| LatencySummary::from_ms(xs.to_vec());
    ReplayReport {
        run: Report {
            url: "http://127.0.0.1:1".into(),
            model: "m".into(),
            endpoint: "completions".into(),
            stream: true,
            mode: "replay".into(),
            concurrency: None,
            request_rate: None,
            max_concurrency: Some(256),
            warmup_requests: 0,
            requests_ok: ttft.len() as u64,
            requests_failed: 0,
            duration_s: 1.0,
            requests_per_s: ttft.len() as f64,
            output_tokens: 100,
            input_tokens: 1000,
            output_tokens_per_s: 100.0,
            input_tokens_per_s: 1000.0,
            ttft_ms: ms(ttft),
            itl_ms: ms(&[1.0]),
            e2e_ms: ms(&ttft.iter().map(|t| t + 10.0).collect::<Vec<_>>()),
            errors: BTreeMap::new(),
            error_examples: BTreeMap::new(),
            cpu: None,
        },
        trace: TraceSummary {
            path: "t.jsonl".into(),
            start_offset: 0,
            rows_planned: ttft.len() as u64,
            rows_sent: ttft.len() as u64,
            rows_skipped_too_long: 0,
            rows_truncated: 0,
            outputs_capped: 0,
            max_input_tokens: 8000,
            prompt_tokens_sent: 1000,
            time_scale: 1.0,
            trace_span_s: 1.0,
        },
        start_lag_ms: ms(&[0.0, lag_ms]),
        ttft_from_schedule_ms: ms(&ttft.iter().map(|t| t + lag_ms).collect::<Vec<_>>()),
        e2e_from_schedule_ms: ms(ttft),
        ideal: IdealHitRate::default(),
        kv: hit_rate.map(|hit_rate| KvReport {
            prompt_tokens: 1000,
            prefix_hit_tokens: (hit_rate * 1000.0) as u64,
            hit_rate,
            workers: Vec::new(),
            busiest_vs_mean: 1.05,
        }),
        kv_note: None,
    }
}

fn run(side: Side, round: u32, report: ReplayReport) -> ComparedRun {
    ComparedRun {
        side,
        round,
        report,
    }
}

#[test]
fn gains_are_taken_within_each_round_and_their_median_reported() {
    // Round 1 on a fast machine, round 2 on a slow one: the candidate is twice as fast
    // in the first and three times in the second, though its slow round is slower than
    // the baseline's fast one.
    let runs = vec![
        run(Side::Candidate, 1, report(&[10.0], Some(0.3), 1.0)),
        run(Side::Baseline, 1, report(&[20.0], Some(0.1), 1.0)),
        run(Side::Baseline, 2, report(&[90.0], Some(0.12), 1.0)),
        run(Side::Candidate, 2, report(&[30.0], Some(0.28), 1.0)),
    ];
    let c = ReplayComparison::new("the graph".into(), "router.mode=round-robin".into(), runs);
    assert_eq!(c.rounds, 2);
    let p50 = c.figure("ttft_p50_ms").expect("TTFT p50 is compared");
    assert_eq!(p50.gains, vec![Some(2.0), Some(3.0)]);
    assert_eq!(p50.gain, Some(2.5));
    assert_eq!((p50.candidate, p50.baseline), (20.0, 55.0));
    assert_eq!(p50.better, Better::Lower);
    let tput = c.figure("output_tokens_per_s").expect("throughput");
    assert_eq!(tput.gain, Some(1.0));
    let hit = c.figure("kv_hit_rate").expect("hit rate");
    assert!((hit.candidate - 0.29).abs() < 1e-9 && (hit.baseline - 0.11).abs() < 1e-9);
    assert!(
        hit.gains.is_empty() && hit.gain.is_none(),
        "compared by difference"
    );

    let text = c.to_text();
    assert!(text.contains("2 rounds"), "{text}");
    assert!(text.contains("router.mode=round-robin"), "{text}");
    assert!(text.contains("2.50× (rounds: 2.00×, 3.00×)"), "{text}");
    assert!(text.contains("+18.0 points"), "{text}");
    assert!(
        !text.contains("TTFT sch."),
        "no start was late: the schedule rows equal TTFT and are left out\n{text}"
    );
    let json = c.to_json();
    assert_eq!(json["runs"].as_array().map(Vec::len), Some(4));
    assert_eq!(json["runs"][2]["side"], "baseline");
    assert_eq!(json["figures"][0]["name"], "ttft_p50_ms");
    assert_eq!(json["figures"][0]["gain"], 2.5);
}

#[test]
fn a_round_missing_a_side_or_a_measurement_gives_no_gain() {
    let runs = vec![
        run(Side::Candidate, 1, report(&[10.0], None, 1.0)),
        run(Side::Baseline, 1, report(&[], None, 1.0)),
        // Round 2 never ran its baseline (say, the graph failed to start).
        run(Side::Candidate, 2, report(&[12.0], None, 1.0)),
    ];
    let c = ReplayComparison::new("a".into(), "b".into(), runs);
    assert_eq!(c.rounds, 1, "only round 1 has both sides");
    assert_eq!(c.runs.len(), 3, "every run is kept");
    assert!(
        c.figure("ttft_p50_ms").is_none(),
        "the baseline answered nothing: no TTFT to compare"
    );
    assert!(
        c.figure("kv_hit_rate").is_none(),
        "no /metrics on either side"
    );
    assert!(
        c.figure("requests_failed").is_some(),
        "read from every report"
    );
}

#[test]
fn a_round_without_a_measurement_keeps_its_place_among_the_gains() {
    let runs = vec![
        run(Side::Candidate, 1, report(&[10.0], Some(0.3), 1.0)),
        run(Side::Baseline, 1, report(&[20.0], Some(0.1), 1.0)),
        // Round 2's baseline answered nothing.
        run(Side::Baseline, 2, report(&[], Some(0.1), 1.0)),
        run(Side::Candidate, 2, report(&[11.0], Some(0.3), 1.0)),
        run(Side::Candidate, 3, report(&[10.0], Some(0.3), 1.0)),
        run(Side::Baseline, 3, report(&[30.0], Some(0.2), 1.0)),
    ];
    let mut c = ReplayComparison::new("a".into(), "b".into(), runs);
    assert_eq!((c.rounds, c.rounds_requested), (3, 3));
    let p50 = c.figure("ttft_p50_ms").expect("two rounds measured it");
    assert_eq!(
        p50.gains,
        vec![Some(2.0), None, Some(3.0)],
        "round 3 stays third"
    );
    assert_eq!(p50.gain, None, "not every round has a gain");
    assert_eq!(
        p50.candidate, 10.0,
        "medians over the rounds where both measured"
    );
    assert_eq!(p50.baseline, 25.0);
    // The hit rate's difference is taken within each round: 0.2, 0.2, 0.1.
    let hit = c.figure("kv_hit_rate").expect("hit rate");
    assert!((hit.difference - 0.2).abs() < 1e-9, "{}", hit.difference);
    assert!(c.to_text().contains("2.00×, -, 3.00×"), "{}", c.to_text());

    c.rounds_requested = 4;
    c.error = Some("round 4 of 4, candidate: the graph did not start".into());
    assert!(c.to_text().contains("3 of 4 rounds"), "{}", c.to_text());
    assert_eq!(
        c.to_json()["error"],
        "round 4 of 4, candidate: the graph did not start"
    );
}

#[test]
fn late_starts_bring_the_schedule_rows_into_the_table() {
    let runs = vec![
        run(Side::Baseline, 1, report(&[50.0], Some(0.1), 900.0)),
        run(Side::Candidate, 1, report(&[25.0], Some(0.2), 1.0)),
    ];
    let c = ReplayComparison::new("a".into(), "b".into(), runs);
    let sch = c.figure("ttft_from_schedule_p50_ms").expect("schedule p50");
    // Candidate 25 + 1 ms of lag, baseline 50 + 900: the wait at the cap counts.
    assert_eq!(sch.gain, Some(950.0 / 26.0));
    let text = c.to_text();
    assert!(text.contains("TTFT sch. p50 ms"), "{text}");
    assert!(text.contains("1 round,"), "{text}");
}

#[test]
fn medians_of_even_and_odd_counts() {
    assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    assert!(median(Vec::new()).is_nan());
    assert_eq!(gain(Better::Lower, 0.0, 5.0), None);
    assert_eq!(gain(Better::Higher, 4.0, 2.0), Some(2.0));
}
