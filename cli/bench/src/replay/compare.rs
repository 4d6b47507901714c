//! Two configurations replayed side by side: the candidate (say, KV routing) against a
//! baseline (say, round-robin), alternated for a number of rounds on the same machine, so
//! that the gain is a ratio taken within each round rather than across sessions whose
//! machine load differs.
//!
//! The caller runs the replays (the `dynamo` binary starts a fresh graph for each one) and
//! hands them over in the order they ran; this module pairs them by round and computes,
//! for each figure, the median over rounds of each side and of the per-round gain.

use std::fmt::Write as _;

use serde::Serialize;

use super::report::ReplayReport;
use crate::LatencySummary;

/// Which configuration a run replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Candidate,
    Baseline,
}

impl Side {
    /// As in the JSON: `candidate` or `baseline`.
    pub fn name(self) -> &'static str {
        match self {
            Side::Candidate => "candidate",
            Side::Baseline => "baseline",
        }
    }
}

/// One replay of a comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComparedRun {
    pub side: Side,
    /// 1-based.
    pub round: u32,
    pub report: ReplayReport,
}

/// Which way a figure improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Lower,
    Higher,
}

/// One figure of both sides.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComparedFigure {
    /// Machine-readable name, e.g. `ttft_p50_ms`.
    pub name: &'static str,
    pub better: Better,
    /// Median over the rounds.
    pub candidate: f64,
    pub baseline: f64,
    /// How many times better the candidate is in each round that ran both sides, in
    /// round order (baseline ÷ candidate for a figure where lower is better, candidate ÷
    /// baseline otherwise); `None` for a round where either side measured nothing. Empty
    /// for figures compared by difference (the hit rate) or only shown.
    pub gains: Vec<Option<f64>>,
    /// The median of the rounds' gains, when every round has one.
    pub gain: Option<f64>,
    /// The median over the rounds of candidate − baseline (rounds where both measured).
    pub difference: f64,
}

/// A finished comparison.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayComparison {
    /// What the candidate ran, e.g. `the graph as given`.
    pub candidate: String,
    /// What the baseline changed, e.g. `the candidate with router.mode=round-robin`.
    pub baseline: String,
    /// Rounds that ran both sides: the figures are over these.
    pub rounds: u32,
    /// Rounds asked for (more than `rounds` when a run failed or a side is missing).
    pub rounds_requested: u32,
    /// Why the comparison stopped early, if it did.
    pub error: Option<String>,
    pub figures: Vec<ComparedFigure>,
    /// Every replay, in the order it ran.
    pub runs: Vec<ComparedRun>,
}

/// How a figure is read from a report, and how it is compared.
struct Spec {
    name: &'static str,
    label: &'static str,
    better: Better,
    shown: Shown,
    read: fn(&ReplayReport) -> Option<f64>,
}

/// How a figure is compared and printed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shown {
    /// A time or a rate, compared by the gain (ratio) in each round.
    Ratio,
    /// A share (0..1) printed as a percentage, compared by its difference in points.
    Points,
    /// A multiple (the busiest worker's share over the mean), only shown.
    Multiple,
    /// A count, only shown.
    Count,
}

fn lat(s: &LatencySummary, f: fn(&LatencySummary) -> f64) -> Option<f64> {
    (s.count > 0).then(|| f(s))
}

const SPECS: &[Spec] = &[
    Spec {
        name: "ttft_p50_ms",
        label: "TTFT p50 ms",
        better: Better::Lower,
        shown: Shown::Ratio,
        read: |r| lat(&r.run.ttft_ms, |s| s.p50),
    },
    Spec {
        name: "ttft_mean_ms",
        label: "TTFT mean ms",
        better: Better::Lower,
        shown: Shown::Ratio,
        read: |r| lat(&r.run.ttft_ms, |s| s.mean),
    },
    Spec {
        name: "ttft_p90_ms",
        label: "TTFT p90 ms",
        better: Better::Lower,
        shown: Shown::Ratio,
        read: |r| lat(&r.run.ttft_ms, |s| s.p90),
    },
    Spec {
        name: "ttft_p99_ms",
        label: "TTFT p99 ms",
        better: Better::Lower,
        shown: Shown::Ratio,
        read: |r| lat(&r.run.ttft_ms, |s| s.p99),
    },
    Spec {
        name: "ttft_from_schedule_p50_ms",
        label: "TTFT sch. p50 ms",
        better: Better::Lower,
        shown: Shown::Ratio,
        read: |r| lat(&r.ttft_from_schedule_ms, |s| s.p50),
    },
    Spec {
        name: "ttft_from_schedule_mean_ms",
        label: "TTFT sch. mean ms",
        better: Better::Lower,
        shown: Shown::Ratio,
        read: |r| lat(&r.ttft_from_schedule_ms, |s| s.mean),
    },
    Spec {
        name: "itl_p50_ms",
        label: "ITL p50 ms",
        better: Better::Lower,
        shown: Shown::Ratio,
        read: |r| lat(&r.run.itl_ms, |s| s.p50),
    },
    Spec {
        name: "e2e_p50_ms",
        label: "E2E p50 ms",
        better: Better::Lower,
        shown: Shown::Ratio,
        read: |r| lat(&r.run.e2e_ms, |s| s.p50),
    },
    Spec {
        name: "e2e_mean_ms",
        label: "E2E mean ms",
        better: Better::Lower,
        shown: Shown::Ratio,
        read: |r| lat(&r.run.e2e_ms, |s| s.mean),
    },
    Spec {
        name: "output_tokens_per_s",
        label: "output tok/s",
        better: Better::Higher,
        shown: Shown::Ratio,
        read: |r| Some(r.run.output_tokens_per_s),
    },
    Spec {
        name: "kv_hit_rate",
        label: "KV hit rate",
        better: Better::Higher,
        shown: Shown::Points,
        read: |r| r.kv.as_ref().map(|kv| kv.hit_rate),
    },
    Spec {
        name: "busiest_vs_mean",
        label: "busiest worker",
        better: Better::Lower,
        shown: Shown::Multiple,
        read: |r| r.kv.as_ref().map(|kv| kv.busiest_vs_mean),
    },
    Spec {
        name: "requests_failed",
        label: "failed requests",
        better: Better::Lower,
        shown: Shown::Count,
        read: |r| Some(r.run.requests_failed as f64),
    },
];

/// The median of `xs` (the mean of the middle two for an even count); NaN when empty.
fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn gain(better: Better, candidate: f64, baseline: f64) -> Option<f64> {
    let g = match better {
        Better::Lower => baseline / candidate,
        Better::Higher => candidate / baseline,
    };
    (candidate > 0.0 && baseline > 0.0 && g.is_finite()).then_some(g)
}

impl ReplayComparison {
    /// Pairs `runs` by round (a round without both sides is left out of the figures,
    /// though its run is kept) and computes the figures. `rounds_requested` starts as the
    /// rounds seen in `runs` and `error` as none; the caller sets them when it knows more.
    pub fn new(candidate: String, baseline: String, runs: Vec<ComparedRun>) -> Self {
        let mut rounds: Vec<u32> = runs.iter().map(|r| r.round).collect();
        rounds.sort_unstable();
        rounds.dedup();
        let rounds_requested = rounds.len() as u32;
        let pairs: Vec<(&ReplayReport, &ReplayReport)> = (rounds.iter())
            .filter_map(|&round| {
                let of = |side| {
                    (runs.iter())
                        .find(|r| r.round == round && r.side == side)
                        .map(|r| &r.report)
                };
                Some((of(Side::Candidate)?, of(Side::Baseline)?))
            })
            .collect();
        let figures = (SPECS.iter())
            .filter_map(|spec| {
                // One entry per paired round, so the gains stay in step with the rounds.
                let each: Vec<Option<(f64, f64)>> = (pairs.iter())
                    .map(|(c, b)| Some(((spec.read)(c)?, (spec.read)(b)?)))
                    .collect();
                let both: Vec<(f64, f64)> = each.iter().flatten().copied().collect();
                if both.is_empty() {
                    return None;
                }
                let gains: Vec<Option<f64>> = if spec.shown == Shown::Ratio {
                    (each.iter())
                        .map(|p| p.and_then(|(c, b)| gain(spec.better, c, b)))
                        .collect()
                } else {
                    Vec::new()
                };
                let gain = (!gains.is_empty())
                    .then(|| gains.iter().copied().collect::<Option<Vec<f64>>>())
                    .flatten()
                    .map(median);
                Some(ComparedFigure {
                    name: spec.name,
                    better: spec.better,
                    candidate: median(both.iter().map(|p| p.0).collect()),
                    baseline: median(both.iter().map(|p| p.1).collect()),
                    gains,
                    gain,
                    difference: median(both.iter().map(|p| p.0 - p.1).collect()),
                })
            })
            .collect();
        ReplayComparison {
            candidate,
            baseline,
            rounds: pairs.len() as u32,
            rounds_requested,
            error: None,
            figures,
            runs,
        }
    }

    /// The figure named `name` (see [`ComparedFigure::name`]).
    pub fn figure(&self, name: &str) -> Option<&ComparedFigure> {
        self.figures.iter().find(|f| f.name == name)
    }

    /// The comparison, its runs included, as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }

    /// The comparison table (the runs' own reports are printed as they finish).
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let of = if self.rounds_requested > self.rounds {
            format!(" of {}", self.rounds_requested)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "comparison    candidate: {} · baseline: {} · {}{of} round{}, each a fresh start of both, the order alternated",
            self.candidate,
            self.baseline,
            self.rounds,
            if self.rounds == 1 && of.is_empty() { "" } else { "s" }
        );
        let _ = writeln!(
            s,
            "              medians over the rounds; gain = how many times better the candidate is (baseline ÷ candidate for times), taken within each round\n"
        );
        let _ = writeln!(
            s,
            "{:<18} {:>12} {:>12}   gain",
            "", "candidate", "baseline"
        );
        let capped =
            (self.runs.iter()).any(|r| r.report.start_lag_ms.max > super::report::CAPPED_LAG_MS);
        for f in &self.figures {
            let Some(spec) = SPECS.iter().find(|s| s.name == f.name) else {
                continue;
            };
            if f.name.starts_with("ttft_from_schedule") && !capped {
                continue;
            }
            let (c, b, g) = match spec.shown {
                Shown::Points => (
                    format!("{:.1}%", f.candidate * 100.0),
                    format!("{:.1}%", f.baseline * 100.0),
                    format!("{:+.1} points", f.difference * 100.0),
                ),
                Shown::Multiple => (
                    format!("{:.2}×", f.candidate),
                    format!("{:.2}×", f.baseline),
                    String::new(),
                ),
                Shown::Count => (
                    format!("{:.0}", f.candidate),
                    format!("{:.0}", f.baseline),
                    String::new(),
                ),
                Shown::Ratio => (
                    format!("{:.2}", f.candidate),
                    format!("{:.2}", f.baseline),
                    gain_text(f),
                ),
            };
            let line = format!("{:<18} {c:>12} {b:>12}   {g}", spec.label);
            let _ = writeln!(s, "{}", line.trim_end());
        }
        s
    }
}

fn gain_text(f: &ComparedFigure) -> String {
    let one = |g: &Option<f64>| g.map_or("-".to_string(), |g| format!("{g:.2}×"));
    let mut s = one(&f.gain);
    if f.gains.len() > 1 {
        let each: Vec<String> = f.gains.iter().map(one).collect();
        let _ = write!(s, " (rounds: {})", each.join(", "));
    }
    s
}

#[cfg(test)]
#[path = "compare_tests.rs"]
mod tests;
