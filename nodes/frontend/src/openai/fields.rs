//! Typed reads of one JSON field, each naming the parameter when the value is wrong.
//! A JSON `null` counts as absent, as OpenAI's own API treats it.

use serde_json::{Map, Value};

use crate::error::ApiError;

pub(crate) type Object = Map<String, Value>;

/// The field's value, or `None` when it is missing or `null`.
pub(crate) fn get<'a>(object: &'a Object, key: &str) -> Option<&'a Value> {
    object.get(key).filter(|value| !value.is_null())
}

/// How a value is named in an error message.
pub(crate) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(param: &str, expected: &str, value: &Value) -> ApiError {
    ApiError::invalid_param(
        param,
        format!("'{param}' must be {expected}, got {}", kind_of(value)),
    )
}

/// Rejects any key not in `known`, naming the first one in the map's order (stable for
/// a given body). `prefix` is the object's own path, built only when there is an error.
pub(crate) fn reject_unknown(
    object: &Object,
    known: &[&str],
    prefix: impl FnOnce() -> String,
) -> Result<(), ApiError> {
    match object.keys().find(|key| !known.contains(&key.as_str())) {
        None => Ok(()),
        Some(key) => {
            let prefix = prefix();
            let param = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            Err(ApiError::invalid_param(
                param.clone(),
                format!("Unrecognized request argument supplied: {param}"),
            ))
        }
    }
}

pub(crate) fn as_object<'a>(value: &'a Value, param: &str) -> Result<&'a Object, ApiError> {
    value
        .as_object()
        .ok_or_else(|| wrong_type(param, "an object", value))
}

pub(crate) fn as_str<'a>(value: &'a Value, param: &str) -> Result<&'a str, ApiError> {
    value
        .as_str()
        .ok_or_else(|| wrong_type(param, "a string", value))
}

pub(crate) fn as_bool(value: &Value, param: &str) -> Result<bool, ApiError> {
    value
        .as_bool()
        .ok_or_else(|| wrong_type(param, "a boolean", value))
}

/// A JSON integer (not `1.0`), as i64.
pub(crate) fn as_i64(value: &Value, param: &str) -> Result<i64, ApiError> {
    match value.as_i64() {
        Some(n) => Ok(n),
        None if value.as_u64().is_some() => Err(ApiError::invalid_param(
            param,
            format!("'{param}' is too large"),
        )),
        None => Err(wrong_type(param, "an integer", value)),
    }
}

/// An integer in `min..=u32::MAX`.
pub(crate) fn as_u32_at_least(value: &Value, param: &str, min: u32) -> Result<u32, ApiError> {
    let n = as_i64(value, param)?;
    if n < i64::from(min) {
        return Err(ApiError::invalid_param(
            param,
            format!("'{param}' must be at least {min}, got {n}"),
        ));
    }
    u32::try_from(n).map_err(|_| {
        ApiError::invalid_param(
            param,
            format!("'{param}' must be at most {}, got {n}", u32::MAX),
        )
    })
}

/// A finite number; `in_range` says whether it is allowed and `range` names the range.
pub(crate) fn as_f32_in(
    value: &Value,
    param: &str,
    range: &str,
    in_range: impl Fn(f64) -> bool,
) -> Result<f32, ApiError> {
    let n = value
        .as_f64()
        .ok_or_else(|| wrong_type(param, "a number", value))?;
    if n.is_finite() && in_range(n) {
        // Every value in the ranges used here fits an f32.
        Ok(n as f32)
    } else {
        Err(ApiError::invalid_param(
            param,
            format!("'{param}' must be in {range}, got {n}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn integers_must_be_integers() {
        assert_eq!(as_u32_at_least(&json!(7), "x", 1), Ok(7));
        assert!(as_u32_at_least(&json!(1.0), "x", 1).is_err());
        assert!(as_u32_at_least(&json!(0), "x", 1).is_err());
        assert!(as_u32_at_least(&json!(u64::MAX), "x", 1).is_err());
        assert!(as_u32_at_least(&json!(5_000_000_000u64), "x", 1).is_err());
        assert!(as_u32_at_least(&json!("7"), "x", 1).is_err());
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        let object = json!({"a": 1, "zz": 2});
        let object = object.as_object().unwrap();
        let error = reject_unknown(object, &["a"], || "messages[0]".into()).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("messages[0].zz"));
        assert!(reject_unknown(object, &["a", "zz"], String::new).is_ok());
    }

    #[test]
    fn null_counts_as_absent() {
        let object = json!({"a": null, "b": 1});
        let object = object.as_object().unwrap();
        assert!(get(object, "a").is_none());
        assert!(get(object, "b").is_some());
        assert!(get(object, "c").is_none());
    }

    #[test]
    fn numbers_outside_the_range_name_the_range() {
        let error = as_f32_in(&json!(5), "temperature", "[0, 2]", |t| {
            (0.0..=2.0).contains(&t)
        })
        .unwrap_err();
        assert!(error.message.contains("[0, 2]"), "{}", error.message);
    }
}
