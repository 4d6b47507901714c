//! `POST /v1/chat/completions`: the messages and the chat-only parameters.

use dynamo_protocol::ChatMessage;
use serde_json::Value;

use super::fields::{as_bool, as_u32_at_least, get, kind_of, reject_unknown, Object};
use super::params::{SharedParams, SHARED_FIELDS};
use crate::error::ApiError;

/// Keys only the chat endpoint reads.
const CHAT_FIELDS: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "response_format",
    "parallel_tool_calls",
    "store",
    "metadata",
    "service_tier",
];

/// Roles a message may have. Tool messages need tool calling, which is not supported.
const ROLES: &[&str] = &["system", "developer", "user", "assistant"];

const MESSAGE_FIELDS: &[&str] = &["role", "content", "name"];

pub(crate) fn is_known(key: &str) -> bool {
    SHARED_FIELDS.contains(&key) || CHAT_FIELDS.contains(&key)
}

/// Applies the chat-only parameters to `shared` and returns the messages, moving their
/// text out of `object` rather than copying it.
pub(crate) fn parse(
    object: &mut Object,
    shared: &mut SharedParams,
) -> Result<Vec<ChatMessage>, ApiError> {
    if let Some(v) = get(object, "max_completion_tokens") {
        // The newer name wins over `max_tokens`; both mean the same bound.
        shared.max_tokens = Some(as_u32_at_least(v, "max_completion_tokens", 1)?);
    }
    reject_unsupported(object)?;
    for key in ["parallel_tool_calls", "store"] {
        if let Some(v) = get(object, key) {
            as_bool(v, key)?;
        }
    }
    messages(object)
}

/// OpenAI features that are accepted only at their "off" value.
fn reject_unsupported(object: &Object) -> Result<(), ApiError> {
    let off = |key: &str, is_off: fn(&Value) -> bool| match get(object, key) {
        Some(value) if !is_off(value) => Err(ApiError::invalid_param(
            key,
            format!("'{key}' is not supported by this server"),
        )),
        _ => Ok(()),
    };
    off("tools", |v| v.as_array().is_some_and(Vec::is_empty))?;
    off("tool_choice", |v| v.as_str() == Some("none"))?;
    off("response_format", |v| {
        v.get("type").and_then(Value::as_str) == Some("text")
    })?;
    off("metadata", Value::is_object)?;
    off("service_tier", Value::is_string)?;
    Ok(())
}

fn messages(object: &mut Object) -> Result<Vec<ChatMessage>, ApiError> {
    let messages = match object.get_mut("messages") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                "messages",
                "you must provide a 'messages' parameter",
            ))
        }
        Some(Value::Array(messages)) => messages,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "messages",
                format!("'messages' must be an array, got {}", kind_of(other)),
            ))
        }
    };
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "'messages' must contain at least one message",
        ));
    }
    messages
        .iter_mut()
        .enumerate()
        .map(|(i, message)| one_message(i, message))
        .collect()
}

fn one_message(i: usize, message: &mut Value) -> Result<ChatMessage, ApiError> {
    let Value::Object(message) = message else {
        return Err(ApiError::invalid_param(
            format!("messages[{i}]"),
            format!("each message must be an object, got {}", kind_of(message)),
        ));
    };
    reject_unknown(message, MESSAGE_FIELDS, || format!("messages[{i}]"))?;
    let role = role(i, message)?;
    if let Some(name) = get(message, "name") {
        if !name.is_string() {
            return Err(ApiError::invalid_param(
                format!("messages[{i}].name"),
                format!("'name' must be a string, got {}", kind_of(name)),
            ));
        }
    }
    let content = match message.get_mut("content") {
        Some(Value::String(text)) => std::mem::take(text),
        Some(Value::Array(parts)) => text_parts(i, parts)?,
        // An assistant turn may be empty (OpenAI allows null content there).
        None | Some(Value::Null) if role == "assistant" => String::new(),
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                format!("messages[{i}].content"),
                format!("messages[{i}] ({role}) must have 'content'"),
            ))
        }
        Some(other) => {
            return Err(ApiError::invalid_param(
                format!("messages[{i}].content"),
                format!(
                    "'content' must be a string or an array of text parts, got {}",
                    kind_of(other)
                ),
            ))
        }
    };
    Ok(ChatMessage {
        role: role.to_string(),
        content,
    })
}

fn role(i: usize, message: &Object) -> Result<&'static str, ApiError> {
    let param = || format!("messages[{i}].role");
    let role = match get(message, "role") {
        None => {
            return Err(ApiError::invalid_param(
                param(),
                "each message needs a 'role'",
            ))
        }
        Some(Value::String(role)) => role.as_str(),
        Some(other) => {
            return Err(ApiError::invalid_param(
                param(),
                format!("'role' must be a string, got {}", kind_of(other)),
            ))
        }
    };
    ROLES
        .iter()
        .copied()
        .find(|known| *known == role)
        .ok_or_else(|| {
            ApiError::invalid_param(
                param(),
                format!(
                    "unsupported role {role:?}: expected one of {}",
                    ROLES.join(", ")
                ),
            )
        })
}

/// `[{"type":"text","text":"..."}, ...]`, joined with newlines.
fn text_parts(i: usize, parts: &mut [Value]) -> Result<String, ApiError> {
    let mut content = String::new();
    for (j, part) in parts.iter_mut().enumerate() {
        let param = |field: &str| format!("messages[{i}].content[{j}]{field}");
        let Value::Object(part) = part else {
            return Err(ApiError::invalid_param(
                param(""),
                format!("content parts must be objects, got {}", kind_of(part)),
            ));
        };
        match part.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some(other) => {
                return Err(ApiError::invalid_param(
                    param(".type"),
                    format!("only text content parts are supported, got type {other:?}"),
                ))
            }
            None => {
                return Err(ApiError::invalid_param(
                    param(".type"),
                    "each content part needs a string 'type'",
                ))
            }
        }
        reject_unknown(part, &["type", "text"], || param(""))?;
        let Some(Value::String(text)) = part.get("text") else {
            return Err(ApiError::invalid_param(
                param(".text"),
                "a text part needs a string 'text'",
            ));
        };
        if j > 0 {
            content.push('\n');
        }
        content.push_str(text);
    }
    Ok(content)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse_messages(body: Value) -> Result<Vec<ChatMessage>, ApiError> {
        let Value::Object(mut object) = body else {
            panic!("test body must be an object")
        };
        messages(&mut object)
    }

    #[test]
    fn string_and_part_contents_become_text() {
        let messages = parse_messages(json!({"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null, "name": "bot"},
        ]}))
        .unwrap();
        assert_eq!(messages[0].content, "be brief");
        assert_eq!(messages[1].content, "a\nb");
        assert_eq!(messages[2].role, "assistant");
        assert_eq!(messages[2].content, "");
    }

    #[test]
    fn message_errors_name_their_path() {
        let cases = [
            (json!({}), "messages"),
            (json!({"messages": []}), "messages"),
            (json!({"messages": "hi"}), "messages"),
            (json!({"messages": ["hi"]}), "messages[0]"),
            (
                json!({"messages": [{"role": "wizard", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "tool", "content": "x"}]}),
                "messages[0].role",
            ),
            (json!({"messages": [{"content": "x"}]}), "messages[0].role"),
            (
                json!({"messages": [{"role": "user"}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": 5}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y", "foo": 1}]}),
                "messages[1].foo",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image", "text": "x"}]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
                "messages[0].content[0].text",
            ),
        ];
        for (body, param) in cases {
            let error = parse_messages(body.clone()).expect_err(&body.to_string());
            assert_eq!(error.param.as_deref(), Some(param), "{body}");
        }
    }
}
