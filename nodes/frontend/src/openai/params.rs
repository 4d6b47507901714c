//! The parameters `/v1/chat/completions` and `/v1/completions` share: model, streaming,
//! length, sampling, stop strings, and the OpenAI fields accepted only at their defaults.

use dynamo_protocol::SamplingOptions;
use serde_json::Value;

use super::fields::{
    as_bool, as_f32_in, as_i64, as_object, as_str, as_u32_at_least, get, kind_of, reject_unknown,
    Object,
};
use super::Endpoint;
use crate::error::ApiError;

/// Most stop strings a request may carry (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;

/// Keys both endpoints read.
pub(crate) const SHARED_FIELDS: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "n",
    "user",
    "ignore_eos",
    "logprobs",
    "logit_bias",
    "nvext",
];

/// What both endpoints parse the same way.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SharedParams {
    pub stream: bool,
    pub include_usage: bool,
    pub max_tokens: Option<u32>,
    pub sampling: SamplingOptions,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

/// The `model` field: present, a non-empty string. Whether it is served is the caller's check.
pub(crate) fn model(object: &Object) -> Result<&str, ApiError> {
    let value = get(object, "model")
        .ok_or_else(|| ApiError::invalid_param("model", "you must provide a model parameter"))?;
    let model = as_str(value, "model")?;
    if model.is_empty() {
        return Err(ApiError::invalid_param(
            "model",
            "'model' must not be empty",
        ));
    }
    Ok(model)
}

pub(crate) fn shared(object: &Object) -> Result<SharedParams, ApiError> {
    let stream = get(object, "stream")
        .map(|v| as_bool(v, "stream"))
        .transpose()?
        .unwrap_or(false);
    let include_usage = stream_options(object, stream)?;

    if let Some(n) = get(object, "n") {
        let n = as_i64(n, "n")?;
        if n != 1 {
            return Err(ApiError::invalid_param(
                "n",
                format!("only n=1 is supported (one choice per request), got {n}"),
            ));
        }
    }
    if let Some(user) = get(object, "user") {
        as_str(user, "user")?;
    }
    if let Some(bias) = get(object, "logit_bias") {
        if !as_object(bias, "logit_bias")?.is_empty() {
            return Err(ApiError::invalid_param(
                "logit_bias",
                "'logit_bias' is not supported",
            ));
        }
    }

    let max_tokens = get(object, "max_tokens")
        .map(|v| as_u32_at_least(v, "max_tokens", 1))
        .transpose()?;

    let sampling = sampling(object)?;
    let stop = stop(object)?;
    let ignore_eos = get(object, "ignore_eos")
        .map(|v| as_bool(v, "ignore_eos"))
        .transpose()?
        .unwrap_or(false)
        || nvext_ignore_eos(object)?;

    Ok(SharedParams {
        stream,
        include_usage,
        max_tokens,
        sampling,
        stop,
        ignore_eos,
    })
}

/// `nvext`: NVIDIA Dynamo's extension object, as benchmark clients (genai-perf, aiperf)
/// send it. Only `ignore_eos` is understood.
fn nvext_ignore_eos(object: &Object) -> Result<bool, ApiError> {
    let Some(nvext) = get(object, "nvext") else {
        return Ok(false);
    };
    let nvext = as_object(nvext, "nvext")?;
    reject_unknown(nvext, &["ignore_eos"], || "nvext".into())?;
    get(nvext, "ignore_eos")
        .map(|v| as_bool(v, "nvext.ignore_eos"))
        .transpose()
        .map(|flag| flag.unwrap_or(false))
}

/// `stream_options`: only with `stream: true`, and only `include_usage`.
fn stream_options(object: &Object, stream: bool) -> Result<bool, ApiError> {
    let Some(options) = get(object, "stream_options") else {
        return Ok(false);
    };
    if !stream {
        return Err(ApiError::invalid_param(
            "stream_options",
            "'stream_options' is only allowed when 'stream' is true",
        ));
    }
    let options = as_object(options, "stream_options")?;
    reject_unknown(options, &["include_usage"], || "stream_options".into())?;
    get(options, "include_usage")
        .map(|v| as_bool(v, "stream_options.include_usage"))
        .transpose()
        .map(|include| include.unwrap_or(false))
}

fn sampling(object: &Object) -> Result<SamplingOptions, ApiError> {
    let mut sampling = SamplingOptions::default();
    if let Some(v) = get(object, "temperature") {
        sampling.temperature = as_f32_in(v, "temperature", "[0, 2]", |t| (0.0..=2.0).contains(&t))?;
    }
    if let Some(v) = get(object, "top_p") {
        sampling.top_p = as_f32_in(v, "top_p", "(0, 1]", |p| p > 0.0 && p <= 1.0)?;
    }
    if let Some(v) = get(object, "top_k") {
        // -1 is vLLM's spelling of "disabled"; accept it as 0 so its clients work unchanged.
        let k = as_i64(v, "top_k")?;
        sampling.top_k = match k {
            -1 => 0,
            k => u32::try_from(k).map_err(|_| {
                ApiError::invalid_param(
                    "top_k",
                    format!("'top_k' must be 0 (disabled) or a positive integer, got {k}"),
                )
            })?,
        };
    }
    if let Some(v) = get(object, "seed") {
        // OpenAI takes any int64; keep its bits so a negative seed is still reproducible.
        sampling.seed = Some(as_i64(v, "seed")? as u64);
    }
    for (key, slot) in [
        ("presence_penalty", &mut sampling.presence_penalty),
        ("frequency_penalty", &mut sampling.frequency_penalty),
    ] {
        if let Some(v) = get(object, key) {
            *slot = as_f32_in(v, key, "[-2, 2]", |x| (-2.0..=2.0).contains(&x))?;
        }
    }
    Ok(sampling)
}

/// `stop`: a string, or a list of at most [`MAX_STOP_STRINGS`] non-empty strings.
fn stop(object: &Object) -> Result<Vec<String>, ApiError> {
    match get(object, "stop") {
        None => Ok(Vec::new()),
        Some(value @ Value::String(_)) => Ok(vec![one_stop(value, None)?]),
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP_STRINGS {
                return Err(ApiError::invalid_param(
                    "stop",
                    format!(
                        "'stop' may hold at most {MAX_STOP_STRINGS} strings, got {}",
                        items.len()
                    ),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, value)| one_stop(value, Some(i)))
                .collect()
        }
        Some(other) => Err(ApiError::invalid_param(
            "stop",
            format!(
                "'stop' must be a string or an array of strings, got {}",
                kind_of(other)
            ),
        )),
    }
}

fn one_stop(value: &Value, index: Option<usize>) -> Result<String, ApiError> {
    let param = || index.map_or_else(|| "stop".to_string(), |i| format!("stop[{i}]"));
    match value.as_str() {
        Some("") => Err(ApiError::invalid_param(
            param(),
            "stop strings must not be empty",
        )),
        Some(text) => Ok(text.to_string()),
        None => Err(ApiError::invalid_param(
            param(),
            format!("stop strings must be strings, got {}", kind_of(value)),
        )),
    }
}

/// Most alternatives per token: OpenAI's limits, 20 for chat's `top_logprobs` and 5 for
/// the completions' `logprobs`.
const CHAT_TOP_LOGPROBS_MAX: u32 = 20;
const COMPLETIONS_LOGPROBS_MAX: u32 = 5;

/// How many alternatives per token the request asks log-probabilities for: chat's
/// `logprobs: true` with `top_logprobs` (0 to 20), or the completions' `logprobs` (0 to
/// 5); `None` when it asks for none.
pub(crate) fn logprobs(object: &Object, endpoint: Endpoint) -> Result<Option<u32>, ApiError> {
    let bounded = |key: &str, max: u32| -> Result<Option<u32>, ApiError> {
        match get(object, key) {
            None => Ok(None),
            Some(v) => {
                let n = as_u32_at_least(v, key, 0)?;
                if n > max {
                    return Err(ApiError::invalid_param(
                        key,
                        format!("'{key}' must be at most {max}, got {n}"),
                    ));
                }
                Ok(Some(n))
            }
        }
    };
    match endpoint {
        Endpoint::ChatCompletions => {
            let on = match get(object, "logprobs") {
                None => false,
                Some(v) => as_bool(v, "logprobs")?,
            };
            let top = bounded("top_logprobs", CHAT_TOP_LOGPROBS_MAX)?;
            match (on, top) {
                (true, top) => Ok(Some(top.unwrap_or(0))),
                (false, Some(n)) if n > 0 => Err(ApiError::invalid_param(
                    "top_logprobs",
                    "'top_logprobs' needs 'logprobs' to be true",
                )),
                (false, _) => Ok(None),
            }
        }
        Endpoint::Completions => bounded("logprobs", COMPLETIONS_LOGPROBS_MAX),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(body: Value) -> Result<SharedParams, ApiError> {
        shared(body.as_object().unwrap())
    }

    #[test]
    fn defaults_when_absent_or_null() {
        let params = parse(json!({"temperature": null, "stop": null})).unwrap();
        assert_eq!(params.sampling, SamplingOptions::default());
        assert!(params.stop.is_empty());
        assert!(!params.stream && !params.include_usage);
        assert_eq!(params.max_tokens, None);
    }

    #[test]
    fn reads_every_parameter() {
        let params = parse(json!({
            "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 9,
            "temperature": 0.5, "top_p": 0.9, "top_k": 40, "seed": -1, "stop": ["a", "b"],
            "presence_penalty": -2, "frequency_penalty": 2, "n": 1, "user": "u", "ignore_eos": true
        }))
        .unwrap();
        assert!(params.stream && params.include_usage && params.ignore_eos);
        assert_eq!(params.max_tokens, Some(9));
        assert_eq!(params.sampling.temperature, 0.5);
        assert_eq!(params.sampling.top_p, 0.9);
        assert_eq!(params.sampling.top_k, 40);
        assert_eq!(params.sampling.seed, Some(u64::MAX));
        assert_eq!(params.sampling.presence_penalty, -2.0);
        assert_eq!(params.stop, vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn nvext_ignore_eos_is_understood() {
        assert!(
            parse(json!({"nvext": {"ignore_eos": true}}))
                .unwrap()
                .ignore_eos
        );
        assert!(!parse(json!({"nvext": {}})).unwrap().ignore_eos);
    }

    #[test]
    fn names_the_offending_parameter() {
        let cases = [
            (json!({"temperature": 2.5}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_k": -3}), "top_k"),
            (json!({"stop": ["a", ""]}), "stop[1]"),
            (json!({"stop": ["a", 3]}), "stop[1]"),
            (json!({"stop": ""}), "stop"),
            (json!({"stop": 3}), "stop"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"n": 2}), "n"),
            (
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (
                json!({"stream": true, "stream_options": {"x": 1}}),
                "stream_options.x",
            ),
            (json!({"frequency_penalty": -2.01}), "frequency_penalty"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"logit_bias": {"1": 5}}), "logit_bias"),
            (json!({"nvext": {"min_tokens": 5}}), "nvext.min_tokens"),
            (json!({"nvext": {"ignore_eos": 1}}), "nvext.ignore_eos"),
            (json!({"nvext": []}), "nvext"),
        ];
        for (body, param) in cases {
            let error = parse(body.clone()).expect_err(&body.to_string());
            assert_eq!(error.param.as_deref(), Some(param), "{body}");
            assert_eq!(error.status.as_u16(), 400);
        }
    }
}
