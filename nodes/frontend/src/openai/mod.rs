//! OpenAI request parsing and validation. A body is read as a `serde_json::Value` first,
//! so every client mistake (bad JSON, a wrong type, an unknown or out-of-range field)
//! becomes a 400 that names the parameter, never a 500 or a serde message about variants.

mod chat;
mod completions;
mod fields;
mod params;

use dynamo_protocol::{ChatRequest, Prompt};
use serde_json::Value;

use crate::error::ApiError;
pub use params::MAX_STOP_STRINGS;

/// `max_tokens` of a `/v1/completions` request that sets none (OpenAI's and vLLM's default).
/// Chat requests without one may run to the context limit.
pub const COMPLETIONS_DEFAULT_MAX_TOKENS: u32 = 16;

/// The generation endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions`
    Completions,
}

impl Endpoint {
    /// The `endpoint` label in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
        }
    }
}

/// A valid request, ready for the downstream.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRequest {
    pub request: ChatRequest,
    pub stream: bool,
    /// `stream_options.include_usage`: send a usage chunk before `[DONE]`.
    pub include_usage: bool,
    /// Position of `request.model` in the served model list.
    pub model_index: usize,
}

/// A refused request, with the served model it named when that much was valid (so
/// metrics can count errors per model without letting clients invent label values).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub error: ApiError,
    pub model_index: Option<usize>,
}

impl From<ApiError> for Rejected {
    fn from(error: ApiError) -> Self {
        Rejected {
            error,
            model_index: None,
        }
    }
}

/// Parses and checks one request body for `endpoint` against the served models.
pub fn parse_request(
    endpoint: Endpoint,
    body: &[u8],
    served_models: &[String],
) -> Result<ParsedRequest, Rejected> {
    let mut object = match parse_json(body)? {
        Value::Object(object) => object,
        other => {
            return Err(ApiError::invalid_body(format!(
                "the request body must be a JSON object, got {}",
                fields::kind_of(&other)
            ))
            .into())
        }
    };
    let known = match endpoint {
        Endpoint::ChatCompletions => chat::is_known,
        Endpoint::Completions => completions::is_known,
    };
    if let Some(key) = object.keys().find(|key| !known(key)) {
        return Err(ApiError::invalid_param(
            key.clone(),
            format!("Unrecognized request argument supplied: {key}"),
        )
        .into());
    }

    let model = params::model(&object)?;
    let model_index = served_models
        .iter()
        .position(|served| served == model)
        .ok_or_else(|| ApiError::model_not_found(model))?;
    let with_model = |error: ApiError| Rejected {
        error,
        model_index: Some(model_index),
    };

    let mut shared = params::shared(&object).map_err(with_model)?;
    shared.sampling.logprobs = params::logprobs(&object, endpoint).map_err(with_model)?;
    let prompt = match endpoint {
        Endpoint::ChatCompletions => chat::parse(&mut object, &mut shared).map(Prompt::Chat),
        Endpoint::Completions => completions::parse(&mut object),
    }
    .map_err(with_model)?;

    Ok(ParsedRequest {
        request: ChatRequest {
            model: served_models[model_index].clone(),
            prompt,
            sampling: shared.sampling,
            max_tokens: match endpoint {
                Endpoint::ChatCompletions => shared.max_tokens,
                Endpoint::Completions => shared.max_tokens.or(Some(COMPLETIONS_DEFAULT_MAX_TOKENS)),
            },
            stop: shared.stop,
            ignore_eos: shared.ignore_eos,
        },
        stream: shared.stream,
        include_usage: shared.include_usage,
        model_index,
    })
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid_body(
            "the request body is empty: send a JSON object",
        ));
    }
    if let Err(error) = std::str::from_utf8(body) {
        return Err(ApiError::invalid_body(format!(
            "the request body is not valid UTF-8 (at byte {})",
            error.valid_up_to()
        )));
    }
    serde_json::from_slice(body).map_err(|error| {
        ApiError::invalid_body(format!("the request body is not valid JSON: {error}"))
    })
}

#[cfg(test)]
mod tests {
    use dynamo_protocol::ChatMessage;

    use super::*;

    fn served() -> Vec<String> {
        vec!["other".to_string(), "m".to_string()]
    }

    #[test]
    fn a_chat_request_round_trips_into_the_protocol_type() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],
            "max_completion_tokens":5,"stream":true,"stream_options":{"include_usage":true}}"#;
        let parsed = parse_request(Endpoint::ChatCompletions, body, &served()).unwrap();
        assert_eq!(parsed.model_index, 1);
        assert!(parsed.stream && parsed.include_usage);
        assert_eq!(parsed.request.model, "m");
        assert_eq!(parsed.request.max_tokens, Some(5));
        assert_eq!(
            parsed.request.prompt,
            Prompt::Chat(vec![ChatMessage {
                role: "user".into(),
                content: "hi".into()
            }])
        );
    }

    #[test]
    fn completions_default_to_sixteen_tokens_and_chat_to_none() {
        let body = br#"{"model":"m","prompt":"x"}"#;
        let parsed = parse_request(Endpoint::Completions, body, &served()).unwrap();
        assert_eq!(
            parsed.request.max_tokens,
            Some(COMPLETIONS_DEFAULT_MAX_TOKENS)
        );
        let body = br#"{"model":"m","prompt":"x","max_tokens":3}"#;
        let parsed = parse_request(Endpoint::Completions, body, &served()).unwrap();
        assert_eq!(parsed.request.max_tokens, Some(3));
        let body = br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#;
        let parsed = parse_request(Endpoint::ChatCompletions, body, &served()).unwrap();
        assert_eq!(parsed.request.max_tokens, None);
    }

    #[test]
    fn body_level_errors_have_no_param() {
        for body in [
            &b""[..],
            b"   ",
            b"{",
            b"[1]",
            b"\"x\"",
            b"{\"model\":\"\xff\"}",
        ] {
            let rejected =
                parse_request(Endpoint::Completions, body, &served()).expect_err("must fail");
            assert_eq!(rejected.error.status.as_u16(), 400);
            assert_eq!(rejected.error.param, None);
        }
    }

    #[test]
    fn unknown_model_is_404_and_unlabelled() {
        let body = br#"{"model":"nope","prompt":"x"}"#;
        let rejected = parse_request(Endpoint::Completions, body, &served()).unwrap_err();
        assert_eq!(rejected.error.status.as_u16(), 404);
        assert_eq!(rejected.error.code, Some("model_not_found"));
        assert_eq!(rejected.model_index, None);
    }

    #[test]
    fn errors_after_the_model_carry_it() {
        let body = br#"{"model":"m","prompt":"x","temperature":5}"#;
        let rejected = parse_request(Endpoint::Completions, body, &served()).unwrap_err();
        assert_eq!(rejected.error.param.as_deref(), Some("temperature"));
        assert_eq!(rejected.model_index, Some(1));
    }

    #[test]
    fn fields_of_the_other_endpoint_are_unknown() {
        let body = br#"{"model":"m","prompt":"x","messages":[]}"#;
        let rejected = parse_request(Endpoint::Completions, body, &served()).unwrap_err();
        assert_eq!(rejected.error.param.as_deref(), Some("messages"));
        let body = br#"{"model":"m","messages":[{"role":"user","content":"x"}],"echo":false}"#;
        let rejected = parse_request(Endpoint::ChatCompletions, body, &served()).unwrap_err();
        assert_eq!(rejected.error.param.as_deref(), Some("echo"));
    }
}
