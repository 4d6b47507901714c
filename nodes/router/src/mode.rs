//! The router's `mode` setting, as the graph file spells it.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::policy::{LeastLoaded, Policy, Random, RoundRobin};

/// How a router picks a worker. KV-aware modes (`kv`, `kv-approx`) will be further
/// [`Policy`] implementations; they are recognised but not implemented yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum RouterMode {
    /// Each live instance in turn.
    #[default]
    RoundRobin,
    /// A uniformly random live instance.
    Random,
    /// The live instance with the fewest requests in flight; ties go round-robin.
    LeastLoaded,
}

/// A `mode` string the router cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModeError {
    /// A mode the graph knows but this router does not implement yet.
    #[error("router mode `{mode}` is not implemented yet; use `round-robin`, `random` or `least-loaded`")]
    NotImplemented { mode: String },
    /// Not a router mode at all.
    #[error("unknown router mode `{mode}`; expected `round-robin`, `random` or `least-loaded`")]
    Unknown { mode: String },
}

impl RouterMode {
    /// The spelling in the graph file.
    pub fn as_str(self) -> &'static str {
        match self {
            RouterMode::RoundRobin => "round-robin",
            RouterMode::Random => "random",
            RouterMode::LeastLoaded => "least-loaded",
        }
    }

    /// A fresh policy for this mode (each router keeps its own rotation state).
    pub fn policy(self) -> Arc<dyn Policy> {
        match self {
            RouterMode::RoundRobin => Arc::new(RoundRobin::default()),
            RouterMode::Random => Arc::new(Random),
            RouterMode::LeastLoaded => Arc::new(LeastLoaded::default()),
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
            "kv" | "kv-approx" => Err(ModeError::NotImplemented { mode: s.to_owned() }),
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
        ] {
            assert_eq!(mode.as_str().parse::<RouterMode>(), Ok(mode));
            assert_eq!(mode.to_string(), mode.as_str());
        }
        assert_eq!(RouterMode::default(), RouterMode::RoundRobin);
    }

    #[test]
    fn kv_modes_are_named_as_not_implemented() {
        for mode in ["kv", "kv-approx"] {
            let err = mode.parse::<RouterMode>();
            assert_eq!(
                err,
                Err(ModeError::NotImplemented {
                    mode: mode.to_owned()
                })
            );
            let text = err.map(|_| ()).unwrap_err().to_string();
            assert!(text.contains(&format!("`{mode}`")), "{text}");
            assert!(text.contains("not implemented"), "{text}");
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
    }
}
