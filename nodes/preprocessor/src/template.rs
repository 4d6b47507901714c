//! Chat templates: the model's Jinja2 template (GGUF `tokenizer.chat_template` or an
//! override) rendered with minijinja the way Hugging Face `transformers` renders it:
//! `trim_blocks` and `lstrip_blocks` on, Python string methods through
//! `minijinja-contrib`'s pycompat, `raise_exception`, and `tojson` / `fromjson` that
//! behave like Python's `json`.

use dynamo_protocol::ChatMessage;
use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

const TEMPLATE_NAME: &str = "chat";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("invalid chat template: {0:#}")]
    Syntax(#[source] Error),
    #[error("chat template failed: {0:#}")]
    Render(#[source] Error),
}

/// A compiled chat template with the values it is rendered with.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    default_system_prompt: Option<String>,
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token` / `eos_token` are the texts the template sees.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(TemplateError::Syntax)?;
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_filter("fromjson", fromjson);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(TemplateError::Syntax)?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            default_system_prompt: None,
        })
    }

    /// A system prompt put first when a conversation has no system message (instead of
    /// whatever default the template itself has).
    pub fn with_default_system_prompt(mut self, prompt: Option<String>) -> Self {
        self.default_system_prompt = prompt;
        self
    }

    /// Renders `messages`, ending with the assistant's turn opened
    /// (`add_generation_prompt = true`).
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, TemplateError> {
        let with_system;
        let messages = match &self.default_system_prompt {
            Some(prompt) if !messages.iter().any(|m| m.role == "system") => {
                with_system = std::iter::once(ChatMessage {
                    role: "system".into(),
                    content: prompt.clone(),
                })
                .chain(messages.iter().cloned())
                .collect::<Vec<_>>();
                &with_system[..]
            }
            _ => messages,
        };
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(TemplateError::Render)?;
        template
            .render(context! {
                messages => Value::from(Serde(messages)),
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(TemplateError::Render)
    }
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn fromjson(text: &str) -> Result<Value, Error> {
    let parsed: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        Error::new(ErrorKind::InvalidOperation, "fromjson: invalid JSON").with_source(e)
    })?;
    Ok(Value::from(Serde(parsed)))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`,
/// which is what `transformers` uses; minijinja's own `tojson` escapes HTML characters
/// and has other separators.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let to_err = |e: serde_json::Error| {
        Error::new(ErrorKind::InvalidOperation, "tojson: cannot serialize").with_source(e)
    };
    let mut out = Vec::new();
    let result = if sort_keys.unwrap_or(false) {
        // Sorted explicitly: serde_json's map keeps insertion order if any crate in
        // the build enables its preserve_order feature.
        let sorted = serde_json::to_value(value).map_err(to_err)?;
        let sorted = sort_json(sorted);
        write_json(&mut out, &sorted, indent)
    } else {
        write_json(&mut out, value, indent)
    };
    result.map_err(to_err)?;
    let text = String::from_utf8(out)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, "tojson: not UTF-8").with_source(e))?;
    Ok(Value::from_safe_string(text))
}

fn sort_json(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sort_json(v)))
                    .collect(),
            )
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(sort_json).collect())
        }
        other => other,
    }
}

fn write_json<T: Serialize + ?Sized>(
    out: &mut Vec<u8>,
    value: &T,
    indent: Option<usize>,
) -> Result<(), serde_json::Error> {
    match indent {
        Some(n) => {
            let spaces = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&spaces);
            value.serialize(&mut serde_json::Serializer::with_formatter(out, fmt))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(out, PyCompact)),
    }
}

/// Python's default separators without indent: `", "` and `": "`.
struct PyCompact;

impl serde_json::ser::Formatter for PyCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

#[cfg(test)]
#[path = "template_tests.rs"]
mod tests;
