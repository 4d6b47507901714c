//! The router's `mode` setting, as the graph file spells it.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::kv::{KvConfig, KvMode, KvRouterHandle};
use crate::policy::{LeastLoaded, Policy, Random, RoundRobin};

/// How a router picks a worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum RouterMode {
    /// Each live instance in turn.
    #[default]
    RoundRobin,
    /// A uniformly random live instance.
    Random,
    /// The live instance with the fewest requests in flight; ties go round-robin.
    LeastLoaded,
    /// `kv`: the lowest KV cost, the cache known from the workers' KV events.
    Kv,
    /// `kv-approx`: the lowest KV cost, the cache guessed from past routing decisions.
    KvApprox,
}

const EXPECTED: &str = "`round-robin`, `random`, `least-loaded`, `kv` or `kv-approx`";

/// A `mode` string the router cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModeError {
    /// A mode the graph knows but this router does not implement yet.
    #[error("router mode `{mode}` is not implemented yet; use {EXPECTED}")]
    NotImplemented { mode: String },
    /// Not a router mode at all.
    #[error("unknown router mode `{mode}`; expected {EXPECTED}")]
    Unknown { mode: String },
}

impl RouterMode {
    /// The spelling in the graph file.
    pub fn as_str(self) -> &'static str {
        match self {
            RouterMode::RoundRobin => "round-robin",
            RouterMode::Random => "random",
            RouterMode::LeastLoaded => "least-loaded",
            RouterMode::Kv => "kv",
            RouterMode::KvApprox => "kv-approx",
        }
    }

    /// The KV mode, for `kv` and `kv-approx`.
    pub fn kv_mode(self) -> Option<KvMode> {
        match self {
            RouterMode::Kv => Some(KvMode::Events),
            RouterMode::KvApprox => Some(KvMode::Approx),
            _ => None,
        }
    }

    /// A fresh policy for this mode (each router keeps its own rotation state). A KV
    /// mode gets the default [`KvConfig`] and a state nobody else can feed events to:
    /// use [`crate::RouterService::with_kv`] or [`KvRouterHandle::policy`] for that.
    pub fn policy(self) -> Arc<dyn Policy> {
        match self {
            RouterMode::RoundRobin => Arc::new(RoundRobin::default()),
            RouterMode::Random => Arc::new(Random),
            RouterMode::LeastLoaded => Arc::new(LeastLoaded::default()),
            RouterMode::Kv | RouterMode::KvApprox => {
                let kv = self.kv_mode().unwrap_or(KvMode::Events);
                KvRouterHandle::build(kv, KvConfig::for_mode(kv)).policy()
            }
        }
    }
}

impl FromStr for RouterMode {
    type Err = ModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round-robin" => Ok(RouterMode::RoundRobin),
            "random" => Ok(RouterMode::Random),
            "least-loaded" => Ok(RouterMode::LeastLoaded),
            "kv" => Ok(RouterMode::Kv),
            "kv-approx" => Ok(RouterMode::KvApprox),
            _ => Err(ModeError::Unknown { mode: s.to_owned() }),
        }
    }
}

impl fmt::Display for RouterMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_graph_spellings_and_round_trips() {
        for mode in [
            RouterMode::RoundRobin,
            RouterMode::Random,
            RouterMode::LeastLoaded,
            RouterMode::Kv,
            RouterMode::KvApprox,
        ] {
            assert_eq!(mode.as_str().parse::<RouterMode>(), Ok(mode));
            assert_eq!(mode.to_string(), mode.as_str());
        }
        assert_eq!(RouterMode::default(), RouterMode::RoundRobin);
    }

    #[test]
    fn kv_modes_parse_and_name_their_kv_mode() {
        assert_eq!(
            "kv".parse::<RouterMode>().map(RouterMode::kv_mode),
            Ok(Some(KvMode::Events))
        );
        assert_eq!(
            "kv-approx".parse::<RouterMode>().map(RouterMode::kv_mode),
            Ok(Some(KvMode::Approx))
        );
        assert_eq!(RouterMode::LeastLoaded.kv_mode(), None);
        for kv in [KvMode::Events, KvMode::Approx] {
            assert_eq!(
                kv.as_str().parse::<RouterMode>().map(RouterMode::kv_mode),
                Ok(Some(kv))
            );
        }
    }

    #[test]
    fn other_strings_are_unknown() {
        for mode in ["", "RoundRobin", "round_robin", "least loaded"] {
            assert_eq!(
                mode.parse::<RouterMode>(),
                Err(ModeError::Unknown {
                    mode: mode.to_owned()
                })
            );
        }
        let text = "kv_approx"
            .parse::<RouterMode>()
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(text.contains("`kv-approx`"), "{text}");
    }
}
