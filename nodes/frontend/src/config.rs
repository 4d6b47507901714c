//! What the frontend serves and how much it accepts. One value, built by the caller (the
//! graph's frontend node settings or CLI flags), checked once by [`FrontendConfig::validate`].

use std::time::Duration;

use crate::error::FrontendError;

/// Settings of one frontend. Every field has a sensible default; `served_models` is the
/// only one a caller must fill in.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontendConfig {
    /// Model names listed by `GET /v1/models` and accepted in a request's `model`; any
    /// other name is answered 404 `model_not_found`.
    pub served_models: Vec<String>,
    /// Largest request body accepted; a larger one is answered 413. Default 1 MiB: a
    /// 128k-token prompt is about 0.5 MB of text.
    pub max_body_bytes: usize,
    /// Generation requests in flight (streaming or not) at which new ones are answered
    /// 503 instead of queueing without bound. Default 1024.
    pub max_inflight: usize,
    /// Longest a generation request may run, from arrival to its last byte; past it the
    /// downstream call is cancelled and the client gets 504 (or an SSE error event if
    /// streaming had started). Default 10 minutes.
    pub request_timeout: Duration,
    /// After shutdown is signalled, how long in-flight requests may take to finish before
    /// their connections are dropped (which cancels them downstream). Default 30 s.
    pub shutdown_grace: Duration,
    /// `owned_by` in `GET /v1/models`. Default `"dynamo"`.
    pub owned_by: String,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        FrontendConfig {
            served_models: Vec::new(),
            max_body_bytes: 1024 * 1024,
            max_inflight: 1024,
            request_timeout: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(30),
            owned_by: "dynamo".to_string(),
        }
    }
}

impl FrontendConfig {
    /// A default configuration serving the given models.
    pub fn for_models<I, S>(models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        FrontendConfig {
            served_models: models.into_iter().map(Into::into).collect(),
            ..FrontendConfig::default()
        }
    }

    /// Every problem with the settings, in field order, as one error.
    pub fn validate(&self) -> Result<(), FrontendError> {
        let mut problems = Vec::new();
        if self.served_models.is_empty() {
            problems.push("served_models is empty: name at least one model".to_string());
        }
        for (i, name) in self.served_models.iter().enumerate() {
            if name.trim().is_empty() {
                problems.push(format!("served_models[{i}] is blank"));
            } else if self.served_models[..i].contains(name) {
                problems.push(format!("served_models[{i}] repeats {name:?}"));
            }
        }
        if self.max_body_bytes == 0 {
            problems.push("max_body_bytes must be at least 1".to_string());
        }
        if self.max_inflight == 0 {
            problems.push("max_inflight must be at least 1".to_string());
        }
        if self.request_timeout.is_zero() {
            problems.push("request_timeout must be more than zero".to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(FrontendError::Config(problems.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_with_models_is_valid() {
        assert!(FrontendConfig::for_models(["m"]).validate().is_ok());
    }

    #[test]
    fn collects_every_problem() {
        let config = FrontendConfig {
            served_models: vec!["a".into(), " ".into(), "a".into()],
            max_body_bytes: 0,
            max_inflight: 0,
            request_timeout: Duration::ZERO,
            ..FrontendConfig::default()
        };
        let message = match config.validate() {
            Err(FrontendError::Config(message)) => message,
            other => panic!("expected a config error, got {other:?}"),
        };
        for needle in [
            "served_models[1] is blank",
            "served_models[2] repeats",
            "max_body_bytes",
            "max_inflight",
            "request_timeout",
        ] {
            assert!(message.contains(needle), "{needle} missing from {message}");
        }
    }

    #[test]
    fn empty_model_list_is_rejected() {
        assert!(FrontendConfig::default().validate().is_err());
    }
}
