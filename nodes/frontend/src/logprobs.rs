//! OpenAI's `logprobs` objects, from the tokens' log-probabilities the preprocessor sends:
//! chat's `{"content": [{token, logprob, bytes, top_logprobs}]}` and the legacy
//! completions' `{tokens, token_logprobs, top_logprobs, text_offset}`.

use dynamo_protocol::TextLogprob;
use serde::Serialize;

use crate::openai::Endpoint;

#[derive(Serialize)]
struct ChatToken<'a> {
    token: &'a str,
    logprob: f32,
    bytes: &'a [u8],
    top_logprobs: Vec<ChatTop<'a>>,
}

#[derive(Serialize)]
struct ChatTop<'a> {
    token: &'a str,
    logprob: f32,
    bytes: &'a [u8],
}

#[derive(Serialize)]
struct ChatLogprobs<'a> {
    content: Vec<ChatToken<'a>>,
}

#[derive(Serialize)]
struct TextLogprobs<'a> {
    tokens: Vec<&'a str>,
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<serde_json::Map<String, serde_json::Value>>,
    text_offset: Vec<usize>,
}

/// Writes the `logprobs` value of a choice covering `tokens` (`null` when there are none).
/// `offset` is where the completion's text stood before these tokens (in characters, as
/// `text_offset` counts them); it is advanced past them.
pub(crate) fn write(
    out: &mut Vec<u8>,
    endpoint: Endpoint,
    tokens: &[TextLogprob],
    offset: &mut usize,
) {
    if tokens.is_empty() {
        out.extend_from_slice(b"null");
        return;
    }
    let written = match endpoint {
        Endpoint::ChatCompletions => serde_json::to_writer(&mut *out, &chat(tokens)),
        Endpoint::Completions => serde_json::to_writer(&mut *out, &text(tokens, offset)),
    };
    if written.is_err() {
        out.extend_from_slice(b"null");
    }
}

fn chat(tokens: &[TextLogprob]) -> ChatLogprobs<'_> {
    ChatLogprobs {
        content: (tokens.iter())
            .map(|t| ChatToken {
                token: &t.token,
                logprob: finite(t.logprob),
                bytes: &t.bytes,
                top_logprobs: (t.top.iter())
                    .map(|a| ChatTop {
                        token: &a.token,
                        logprob: finite(a.logprob),
                        bytes: &a.bytes,
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn text<'a>(tokens: &'a [TextLogprob], offset: &mut usize) -> TextLogprobs<'a> {
    let mut out = TextLogprobs {
        tokens: Vec::with_capacity(tokens.len()),
        token_logprobs: Vec::with_capacity(tokens.len()),
        top_logprobs: Vec::with_capacity(tokens.len()),
        text_offset: Vec::with_capacity(tokens.len()),
    };
    for t in tokens {
        out.tokens.push(&t.token);
        out.token_logprobs.push(finite(t.logprob));
        out.top_logprobs.push(
            (t.top.iter())
                .map(|a| (a.token.clone(), serde_json::json!(finite(a.logprob))))
                .collect(),
        );
        out.text_offset.push(*offset);
        *offset += t.token.chars().count();
    }
    out
}

/// JSON has no infinities: a token the model gives no chance gets the lowest finite value
/// (what OpenAI-compatible servers send as -9999.0).
fn finite(x: f32) -> f32 {
    if x.is_finite() {
        x
    } else {
        -9999.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(t: &str, lp: f32, top: &[(&str, f32)]) -> TextLogprob {
        TextLogprob {
            token: t.into(),
            bytes: t.as_bytes().to_vec(),
            logprob: lp,
            top: (top.iter())
                .map(|&(t, lp)| TextLogprob {
                    token: t.into(),
                    bytes: t.as_bytes().to_vec(),
                    logprob: lp,
                    top: Vec::new(),
                })
                .collect(),
        }
    }

    fn json(endpoint: Endpoint, tokens: &[TextLogprob], offset: &mut usize) -> serde_json::Value {
        let mut out = Vec::new();
        write(&mut out, endpoint, tokens, offset);
        serde_json::from_slice(&out).unwrap_or_default()
    }

    #[test]
    fn chat_and_completions_shapes() {
        let toks = [
            token("Par", -0.5, &[("Par", -0.5), ("Lyon", -2.0)]),
            token("is", f32::NEG_INFINITY, &[]),
        ];
        let mut offset = 0;
        let chat = json(Endpoint::ChatCompletions, &toks, &mut offset);
        assert_eq!(chat["content"][0]["token"], "Par");
        assert_eq!(
            chat["content"][0]["bytes"],
            serde_json::json!([80, 97, 114])
        );
        assert_eq!(chat["content"][0]["top_logprobs"][1]["token"], "Lyon");
        assert_eq!(chat["content"][1]["logprob"], -9999.0);
        let mut offset = 3;
        let text = json(Endpoint::Completions, &toks, &mut offset);
        assert_eq!(text["tokens"], serde_json::json!(["Par", "is"]));
        assert_eq!(text["text_offset"], serde_json::json!([3, 6]));
        assert_eq!(text["top_logprobs"][0]["Lyon"], -2.0);
        assert_eq!(offset, 8);
        let mut none = Vec::new();
        write(&mut none, Endpoint::Completions, &[], &mut offset);
        assert_eq!(none, b"null");
    }
}
