//! The flags of `dynamo bench serve`. The `dynamo` binary flattens [`BenchArgs`] into its
//! subcommand; a library user can build it with [`BenchArgs::parse_from`].

use std::time::Duration;

use clap::{ArgAction, Args, Parser, ValueEnum};

use crate::BenchError;

/// Requests to run when neither `--requests` nor `--duration` is given, so a run always
/// stops.
pub const DEFAULT_REQUESTS: u64 = 100;

/// Which OpenAI route to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Endpoint {
    /// `POST /v1/chat/completions` with one user message.
    Chat,
    /// `POST /v1/completions` with a text prompt.
    Completions,
}

impl Endpoint {
    /// The route path below the base URL.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
        }
    }
}

/// Load-generator settings: what to call, how hard, and for how long.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Base URL of the OpenAI-compatible server.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Model name to send (default: the first of `GET /v1/models`).
    #[arg(long)]
    pub model: Option<String>,
    /// Route to call.
    #[arg(long, value_enum, default_value_t = Endpoint::Chat)]
    pub endpoint: Endpoint,
    /// Closed loop: this many requests in flight at all times (default 1 without
    /// `--request-rate`).
    #[arg(long, conflicts_with = "request_rate")]
    pub concurrency: Option<usize>,
    /// Open loop: start requests at this mean rate per second (Poisson arrivals).
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// Open loop: at most this many requests in flight (arrivals wait beyond it).
    #[arg(long, requires = "request_rate")]
    pub max_concurrency: Option<usize>,
    /// Measured requests to send (default 100 when `--duration` is not given either).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Stop starting requests after this many seconds of the measured phase; requests in
    /// flight then finish (bounded by `--timeout`).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Requests sent first and left out of the report (warms caches and connections).
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Approximate prompt length in tokens: prompts are built from a word list whose
    /// words are about one token each, so the real count depends on the tokenizer.
    #[arg(long, default_value_t = 128)]
    pub input_tokens: usize,
    /// Tokens to generate, sent as `max_tokens` with `ignore_eos: true` so lengths are
    /// exact on engines that honour it.
    #[arg(long, default_value_t = 128)]
    pub output_tokens: u32,
    /// Leading prompt tokens (approximate) shared by every request of a prefix group, for
    /// KV-cache reuse tests; part of `--input-tokens`.
    #[arg(long, default_value_t = 0)]
    pub shared_prefix_tokens: usize,
    /// Number of distinct shared prefixes; request i belongs to group i mod G.
    #[arg(long, default_value_t = 1)]
    pub prefix_groups: usize,
    /// Stream the answer (the default); TTFT and ITL need it.
    #[arg(long, overrides_with = "no_stream", action = ArgAction::SetTrue)]
    pub stream: bool,
    /// Ask for whole answers instead of SSE streams.
    #[arg(long, overrides_with = "stream", action = ArgAction::SetTrue)]
    pub no_stream: bool,
    /// Seed of the prompt words and the arrival times.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Per-request timeout in seconds (connect to last byte).
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    /// Server process ids whose CPU time (utime+stime) is measured over the measured
    /// phase, e.g. `--server-pids 123,456`.
    #[arg(long, value_delimiter = ',')]
    pub server_pids: Vec<u32>,
}

#[derive(Parser)]
#[command(name = "bench-serve")]
struct Standalone {
    #[command(flatten)]
    args: BenchArgs,
}

/// How requests are started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Load {
    Closed {
        concurrency: usize,
    },
    Open {
        rate: f64,
        max_concurrency: Option<usize>,
    },
}

/// When the measured phase stops starting requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Bound {
    pub requests: Option<u64>,
    pub duration: Option<Duration>,
}

impl BenchArgs {
    /// Parses flags as `dynamo bench serve` would (the first item is the program name).
    pub fn parse_from<I, T>(items: I) -> Result<BenchArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Standalone::try_parse_from(items).map(|s| s.args)
    }

    /// Whether answers are streamed (`--no-stream` turns it off).
    pub fn streaming(&self) -> bool {
        !self.no_stream
    }

    pub(crate) fn timeout_duration(&self) -> Result<Duration, BenchError> {
        secs("--timeout", self.timeout, false)
    }

    pub(crate) fn load(&self) -> Result<Load, BenchError> {
        match self.request_rate {
            Some(rate) => {
                if !(rate.is_finite() && rate > 0.0) {
                    return Err(invalid("--request-rate must be a positive number"));
                }
                if self.max_concurrency == Some(0) {
                    return Err(invalid("--max-concurrency must be at least 1"));
                }
                Ok(Load::Open {
                    rate,
                    max_concurrency: self.max_concurrency,
                })
            }
            None => {
                let concurrency = self.concurrency.unwrap_or(1);
                if concurrency == 0 {
                    return Err(invalid("--concurrency must be at least 1"));
                }
                Ok(Load::Closed { concurrency })
            }
        }
    }

    pub(crate) fn bound(&self) -> Result<Bound, BenchError> {
        let duration = match self.duration {
            Some(d) => Some(secs("--duration", d, false)?),
            None => None,
        };
        if self.requests == Some(0) {
            return Err(invalid("--requests must be at least 1"));
        }
        let requests = match (self.requests, duration) {
            (None, None) => Some(DEFAULT_REQUESTS),
            (r, _) => r,
        };
        Ok(Bound { requests, duration })
    }

    /// Checks every flag, so a bad command line fails before any request is sent.
    pub(crate) fn validate(&self) -> Result<(), BenchError> {
        self.timeout_duration()?;
        self.load()?;
        self.bound()?;
        if self.prefix_groups == 0 {
            return Err(invalid("--prefix-groups must be at least 1"));
        }
        if self.shared_prefix_tokens > self.input_tokens {
            return Err(invalid(
                "--shared-prefix-tokens cannot exceed --input-tokens (the prefix is part of the prompt)",
            ));
        }
        if self.output_tokens == 0 {
            return Err(invalid("--output-tokens must be at least 1"));
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(invalid(
                "--url must start with http:// (https is not built in)",
            ));
        }
        Ok(())
    }
}

/// `secs` as a duration: positive (or zero when `zero_ok`) and finite, else an error
/// naming `flag`. Shared by every benchmark's flags.
pub(crate) fn secs(flag: &str, secs: f64, zero_ok: bool) -> Result<Duration, BenchError> {
    let ok = secs.is_finite() && (secs > 0.0 || (zero_ok && secs == 0.0));
    if !ok {
        return Err(invalid(&format!(
            "{flag} must be a positive number of seconds"
        )));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| invalid(&format!("{flag} is too large")))
}

pub(crate) fn invalid(message: &str) -> BenchError {
    BenchError::InvalidArgs(message.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(flags: &[&str]) -> BenchArgs {
        let mut all = vec!["bench"];
        all.extend_from_slice(flags);
        match BenchArgs::parse_from(all) {
            Ok(a) => a,
            Err(e) => panic!("flags {flags:?} did not parse: {e}"),
        }
    }

    #[test]
    fn defaults_are_bounded_chat_streaming_closed_loop() {
        let a = parse(&[]);
        assert_eq!(a.url, "http://127.0.0.1:8000");
        assert_eq!(a.endpoint, Endpoint::Chat);
        assert!(a.streaming());
        assert!(a.validate().is_ok());
        assert_eq!(a.load().ok(), Some(Load::Closed { concurrency: 1 }));
        let bound = a.bound().ok();
        assert_eq!(bound.and_then(|b| b.requests), Some(DEFAULT_REQUESTS));
    }

    #[test]
    fn stream_flags_override_each_other() {
        assert!(!parse(&["--no-stream"]).streaming());
        assert!(parse(&["--no-stream", "--stream"]).streaming());
        assert!(!parse(&["--stream", "--no-stream"]).streaming());
    }

    #[test]
    fn open_loop_and_pids_parse() {
        let a = parse(&[
            "--request-rate",
            "5",
            "--max-concurrency",
            "3",
            "--server-pids",
            "1,2",
        ]);
        assert_eq!(
            a.load().ok(),
            Some(Load::Open {
                rate: 5.0,
                max_concurrency: Some(3)
            })
        );
        assert_eq!(a.server_pids, vec![1, 2]);
        assert!(BenchArgs::parse_from(["b", "--concurrency", "2", "--request-rate", "1"]).is_err());
    }

    #[test]
    fn duration_alone_leaves_requests_unbounded() {
        let b = parse(&["--duration", "2.5"]).bound().ok();
        assert_eq!(b.and_then(|b| b.requests), None);
        assert_eq!(
            b.and_then(|b| b.duration),
            Some(Duration::from_millis(2500))
        );
    }

    #[test]
    fn nonsense_is_rejected_before_running() {
        for flags in [
            &["--concurrency", "0"][..],
            &["--request-rate", "0"],
            &["--requests", "0"],
            &["--duration=-1"],
            &["--timeout", "0"],
            &["--prefix-groups", "0"],
            &["--input-tokens", "10", "--shared-prefix-tokens", "20"],
            &["--url", "localhost:8000"],
        ] {
            assert!(parse(flags).validate().is_err(), "{flags:?} was accepted");
        }
    }
}
