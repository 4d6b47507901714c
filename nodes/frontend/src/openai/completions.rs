//! `POST /v1/completions`: the prompt and the completion-only parameters.

use dynamo_protocol::Prompt;
use serde_json::Value;

use super::fields::{get, kind_of, Object};
use super::params::SHARED_FIELDS;
use crate::error::ApiError;

/// Keys only the completions endpoint reads.
const COMPLETION_FIELDS: &[&str] = &["prompt", "echo", "best_of", "suffix"];

pub(crate) fn is_known(key: &str) -> bool {
    SHARED_FIELDS.contains(&key) || COMPLETION_FIELDS.contains(&key)
}

/// Checks the completion-only parameters and returns the prompt, moving its text out of
/// `object` rather than copying it.
pub(crate) fn parse(object: &mut Object) -> Result<Prompt, ApiError> {
    let unsupported = |key: &str| {
        ApiError::invalid_param(key, format!("'{key}' is not supported by this server"))
    };
    match get(object, "echo") {
        None | Some(Value::Bool(false)) => {}
        Some(_) => return Err(unsupported("echo")),
    }
    match get(object, "best_of") {
        None => {}
        Some(v) if v.as_u64() == Some(1) => {}
        Some(_) => return Err(unsupported("best_of")),
    }
    match get(object, "suffix") {
        None => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(_) => return Err(unsupported("suffix")),
    }
    prompt(object)
}

/// A string, a list holding one string, a list of token ids, or a list holding one list
/// of token ids. Several prompts in one request (batching) are refused.
fn prompt(object: &mut Object) -> Result<Prompt, ApiError> {
    let value = match object.get_mut("prompt") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                "prompt",
                "you must provide a 'prompt' parameter",
            ))
        }
        Some(value) => value,
    };
    match value {
        Value::String(text) => Ok(Prompt::Text(std::mem::take(text))),
        Value::Array(items) => match items.as_mut_slice() {
            [] => Err(ApiError::invalid_param(
                "prompt",
                "'prompt' must not be an empty list",
            )),
            [Value::String(text)] => Ok(Prompt::Text(std::mem::take(text))),
            [Value::Array(ids)] => token_ids(ids, "prompt[0]").map(Prompt::Tokens),
            [Value::Number(_), ..] => token_ids(items, "prompt").map(Prompt::Tokens),
            [Value::String(_) | Value::Array(_), ..] => Err(ApiError::invalid_param(
                "prompt",
                format!(
                    "only one prompt per request is supported, got {}",
                    items.len()
                ),
            )),
            [other, ..] => Err(ApiError::invalid_param(
                "prompt[0]",
                format!(
                    "'prompt' items must be strings or token ids, got {}",
                    kind_of(other)
                ),
            )),
        },
        other => Err(ApiError::invalid_param(
            "prompt",
            format!(
                "'prompt' must be a string, a list of one string, or a list of token ids, got {}",
                kind_of(other)
            ),
        )),
    }
}

fn token_ids(items: &[Value], param: &str) -> Result<Vec<u32>, ApiError> {
    if items.is_empty() {
        return Err(ApiError::invalid_param(
            param,
            "a token-id prompt must not be empty",
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        format!("{param}[{i}]"),
                        format!("token ids must be integers in 0..={}, got {item}", u32::MAX),
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse_body(body: Value) -> Result<Prompt, ApiError> {
        let Value::Object(mut object) = body else {
            panic!("test body must be an object")
        };
        parse(&mut object)
    }

    #[test]
    fn accepted_prompt_shapes() {
        assert_eq!(
            parse_body(json!({"prompt": "hi"})),
            Ok(Prompt::Text("hi".into()))
        );
        assert_eq!(
            parse_body(json!({"prompt": ["hi"]})),
            Ok(Prompt::Text("hi".into()))
        );
        assert_eq!(
            parse_body(json!({"prompt": [1, 2, 3]})),
            Ok(Prompt::Tokens(vec![1, 2, 3]))
        );
        assert_eq!(
            parse_body(json!({"prompt": [[4, 5]], "echo": false, "best_of": 1})),
            Ok(Prompt::Tokens(vec![4, 5]))
        );
    }

    #[test]
    fn rejected_prompt_shapes_name_the_param() {
        let cases = [
            (json!({}), "prompt"),
            (json!({"prompt": 5}), "prompt"),
            (json!({"prompt": []}), "prompt"),
            (json!({"prompt": ["a", "b"]}), "prompt"),
            (json!({"prompt": [1, -2]}), "prompt[1]"),
            (json!({"prompt": [1, "x"]}), "prompt[1]"),
            (json!({"prompt": [[]]}), "prompt[0]"),
            (json!({"prompt": [true]}), "prompt[0]"),
            (json!({"prompt": "x", "echo": true}), "echo"),
            (json!({"prompt": "x", "best_of": 3}), "best_of"),
            (json!({"prompt": "x", "suffix": "end"}), "suffix"),
        ];
        for (body, param) in cases {
            let error = parse_body(body.clone()).expect_err(&body.to_string());
            assert_eq!(error.param.as_deref(), Some(param), "{body}");
        }
    }
}
