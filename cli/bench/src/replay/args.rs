//! The flags of trace replay. The `dynamo` binary flattens [`ReplayArgs`] into its
//! `bench replay` subcommand; a library user can build it with [`ReplayArgs::parse_from`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};

use crate::args::{invalid, secs};
use crate::BenchError;

/// What to do with a row whose prompt is longer than `--max-input-tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LongPrompt {
    /// Keep the first `--max-input-tokens` tokens (the shared prefix blocks survive).
    Truncate,
    /// Leave the row out.
    Skip,
}

/// Replay settings: which trace rows, against what, how fast.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// Mooncake trace (JSONL: `timestamp` ms, `input_length`, `output_length`, `hash_ids`).
    pub trace: PathBuf,
    /// Base URL of the OpenAI-compatible server (its `/metrics` gives the KV hit rate).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Model name to send (default: the first of `GET /v1/models`).
    #[arg(long)]
    pub model: Option<String>,
    /// Multiplies the trace's arrival times: 0.1 replays 10× faster than recorded.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Replay at most this many rows (default: to the end of the trace).
    #[arg(long)]
    pub max_requests: Option<u64>,
    /// Replay only rows scheduled within this many seconds (after scaling) of the first.
    #[arg(long)]
    pub max_duration: Option<f64>,
    /// Skip the first N rows of the trace.
    #[arg(long, default_value_t = 0)]
    pub start_offset: u64,
    /// Tokens per `hash_ids` block (512 for the Mooncake traces).
    #[arg(long, default_value_t = 512)]
    pub block_tokens: usize,
    /// Longest prompt sent; longer rows are truncated or skipped (`--long-prompts`). The
    /// default leaves room for outputs in SmolLM2's 8,192-token context.
    #[arg(long, default_value_t = 8000)]
    pub max_input_tokens: usize,
    /// Whether rows over `--max-input-tokens` are truncated or skipped.
    #[arg(long, value_enum, default_value_t = LongPrompt::Truncate)]
    pub long_prompts: LongPrompt,
    /// Cap on `max_tokens` (default: the trace's `output_length`).
    #[arg(long)]
    pub max_output_tokens: Option<u32>,
    /// The model's context: `max_tokens` is capped at this minus the prompt length.
    #[arg(long, default_value_t = 8192)]
    pub context_tokens: usize,
    /// Seed of the synthetic token blocks (same seed, same prompts).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Per-request timeout in seconds (connect to last byte).
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// At most this many requests in flight; a later arrival waits (and its start lag is
    /// reported), the ones after it keep their scheduled times.
    #[arg(long, default_value_t = 256)]
    pub concurrency_limit: usize,
    /// Seconds to wait after the last answer before reading `/metrics` again (the frontend
    /// refreshes other processes' engine counters about once a second).
    #[arg(long, default_value_t = 2.0)]
    pub metrics_wait: f64,
}

#[derive(Parser)]
#[command(name = "bench-replay")]
struct Standalone {
    #[command(flatten)]
    args: ReplayArgs,
}

impl ReplayArgs {
    /// Parses flags as `dynamo bench replay` would (the first item is the program name).
    pub fn parse_from<I, T>(items: I) -> Result<ReplayArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Standalone::try_parse_from(items).map(|s| s.args)
    }

    pub(crate) fn timeout_duration(&self) -> Result<Duration, BenchError> {
        secs("--timeout", self.timeout, false)
    }

    pub(crate) fn max_duration(&self) -> Result<Option<Duration>, BenchError> {
        self.max_duration
            .map(|s| secs("--max-duration", s, false))
            .transpose()
    }

    pub(crate) fn metrics_wait_duration(&self) -> Result<Duration, BenchError> {
        secs("--metrics-wait", self.metrics_wait, true)
    }

    /// Checks every flag, so a bad command line fails before the trace is read.
    pub(crate) fn validate(&self) -> Result<(), BenchError> {
        self.timeout_duration()?;
        self.max_duration()?;
        self.metrics_wait_duration()?;
        if !(self.time_scale.is_finite() && self.time_scale >= 0.0) {
            return Err(invalid(
                "--time-scale must be a number ≥ 0 (0 sends every row at once)",
            ));
        }
        if self.max_requests == Some(0) {
            return Err(invalid("--max-requests must be at least 1"));
        }
        if self.block_tokens == 0 {
            return Err(invalid("--block-tokens must be at least 1"));
        }
        if self.max_input_tokens == 0 {
            return Err(invalid("--max-input-tokens must be at least 1"));
        }
        if self.max_input_tokens >= self.context_tokens {
            return Err(invalid(
                "--max-input-tokens must be below --context-tokens (outputs need room)",
            ));
        }
        if self.max_output_tokens == Some(0) {
            return Err(invalid("--max-output-tokens must be at least 1"));
        }
        if self.concurrency_limit == 0 {
            return Err(invalid("--concurrency-limit must be at least 1"));
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(invalid(
                "--url must start with http:// (https is not built in)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(flags: &[&str]) -> ReplayArgs {
        let mut all = vec!["replay", "trace.jsonl"];
        all.extend_from_slice(flags);
        match ReplayArgs::parse_from(all) {
            Ok(a) => a,
            Err(e) => panic!("flags {flags:?} did not parse: {e}"),
        }
    }

    #[test]
    fn defaults_fit_smollm2_and_validate() {
        let a = parse(&[]);
        assert_eq!(a.trace, PathBuf::from("trace.jsonl"));
        assert_eq!((a.block_tokens, a.max_input_tokens), (512, 8000));
        assert_eq!(a.long_prompts, LongPrompt::Truncate);
        assert!(a.validate().is_ok());
        assert!(
            ReplayArgs::parse_from(["replay"]).is_err(),
            "the trace is required"
        );
    }

    #[test]
    fn nonsense_is_rejected_before_running() {
        for flags in [
            &["--time-scale=-1"][..],
            &["--time-scale", "NaN"],
            &["--max-requests", "0"],
            &["--max-duration", "0"],
            &["--block-tokens", "0"],
            &["--max-input-tokens", "9000"],
            &["--max-output-tokens", "0"],
            &["--concurrency-limit", "0"],
            &["--timeout", "0"],
            &["--metrics-wait=-1"],
            &["--url", "localhost:8000"],
        ] {
            assert!(parse(flags).validate().is_err(), "{flags:?} was accepted");
        }
        assert!(parse(&["--time-scale", "0", "--metrics-wait", "0"])
            .validate()
            .is_ok());
    }
}
