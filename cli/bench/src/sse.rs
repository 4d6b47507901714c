//! Incremental Server-Sent Events parsing for OpenAI streams: bytes in (split anywhere),
//! [`StreamEvent`]s out. Pure and synchronous, so it is tested without a network.

use serde_json::Value;

/// Token counts from a `usage` object (the last chunk when `stream_options.include_usage`
/// is sent, or the whole answer when not streaming).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// What one SSE event means for the measurement.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// A chunk with generated text (`choices[0].delta.content` or `choices[0].text`).
    /// Empty text (a role-only first chunk, a finish chunk) is reported as `Content("")`
    /// and not counted as a token.
    Content(String),
    /// A chunk with a `usage` object (and maybe no choices).
    Usage(Usage),
    /// `data: [DONE]`.
    Done,
    /// `event: error`, or a chunk that is `{"error": ...}`; carries the message.
    Error(String),
    /// A data line that is not JSON an OpenAI server sends.
    Malformed(String),
}

/// Splits a byte stream into SSE events and interprets each (`data:` lines, `event:`
/// names, blank-line dispatch; comments and other fields are ignored).
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
}

impl SseParser {
    pub fn new() -> Self {
        SseParser::default()
    }

    /// Feeds the next bytes and appends every event they complete to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<StreamEvent>) {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + pos;
            let line = &self.buf[start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            // A line ends at an ASCII byte, so it never splits a UTF-8 sequence.
            let line = String::from_utf8_lossy(line).into_owned();
            self.line(&line, out);
            start = end + 1;
        }
        self.buf.drain(..start);
    }

    /// Ends the stream: dispatches an event whose blank line never came.
    pub fn finish(&mut self, out: &mut Vec<StreamEvent>) {
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            let line = String::from_utf8_lossy(&rest).into_owned();
            self.line(line.trim_end_matches('\r'), out);
        }
        self.dispatch(out);
    }

    fn line(&mut self, line: &str, out: &mut Vec<StreamEvent>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            "event" => self.event = Some(value.to_string()),
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<StreamEvent>) {
        let event = self.event.take();
        let Some(data) = self.data.take() else {
            return;
        };
        if event.as_deref() == Some("error") {
            out.push(StreamEvent::Error(error_message(&data)));
            return;
        }
        interpret(&data, out);
    }
}

fn interpret(data: &str, out: &mut Vec<StreamEvent>) {
    if data.trim() == "[DONE]" {
        out.push(StreamEvent::Done);
        return;
    }
    let value: Value = match serde_json::from_str(data) {
        Ok(v) => v,
        Err(e) => {
            out.push(StreamEvent::Malformed(format!("{e}: {}", clip(data))));
            return;
        }
    };
    if value.get("error").is_some() {
        out.push(StreamEvent::Error(error_message(data)));
        return;
    }
    let choice = value.get("choices").and_then(|c| c.get(0));
    if let Some(choice) = choice {
        let text = choice
            .get("delta")
            .and_then(|d| d.get("content"))
            .or_else(|| choice.get("text"))
            .and_then(Value::as_str)
            .unwrap_or("");
        out.push(StreamEvent::Content(text.to_string()));
    }
    if let Some(usage) = usage_of(&value) {
        out.push(StreamEvent::Usage(usage));
    }
    if choice.is_none() && value.get("usage").is_none_or(Value::is_null) {
        out.push(StreamEvent::Malformed(format!(
            "chunk has neither choices nor usage: {}",
            clip(data)
        )));
    }
}

/// The `usage` object of a chunk or a whole answer, when present and not null.
pub fn usage_of(value: &Value) -> Option<Usage> {
    let usage = value.get("usage").filter(|u| u.is_object())?;
    let field = |name: &str| usage.get(name).and_then(Value::as_u64).unwrap_or(0);
    Some(Usage {
        prompt_tokens: field("prompt_tokens"),
        completion_tokens: field("completion_tokens"),
    })
}

/// `error.message` of an OpenAI error body, else the (clipped) raw text.
pub fn error_message(data: &str) -> String {
    serde_json::from_str::<Value>(data)
        .ok()
        .and_then(|v| {
            let e = v.get("error")?;
            e.get("message")
                .and_then(Value::as_str)
                .or_else(|| e.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| clip(data))
}

fn clip(s: &str) -> String {
    const MAX: usize = 200;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(input: &str, piece: usize) -> Vec<StreamEvent> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for chunk in input.as_bytes().chunks(piece) {
            p.push(chunk, &mut out);
        }
        p.finish(&mut out);
        out
    }

    const CHAT: &str = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hé\"}}]}\n\n",
        ": keep-alive comment\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there\"},\"finish_reason\":null}]}\r\n\r\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n",
        "data: [DONE]\n\n",
    );

    fn expected_chat() -> Vec<StreamEvent> {
        vec![
            StreamEvent::Content(String::new()),
            StreamEvent::Content("Hé".into()),
            StreamEvent::Content(" there".into()),
            StreamEvent::Usage(Usage {
                prompt_tokens: 5,
                completion_tokens: 2,
            }),
            StreamEvent::Done,
        ]
    }

    #[test]
    fn chat_stream_with_usage_chunk() {
        assert_eq!(parse_in_pieces(CHAT, CHAT.len()), expected_chat());
    }

    #[test]
    fn chunks_split_across_reads_at_every_size() {
        // Piece size 1 splits the two-byte 'é' and every "\r\n".
        for piece in 1..40 {
            assert_eq!(
                parse_in_pieces(CHAT, piece),
                expected_chat(),
                "piece {piece}"
            );
        }
    }

    #[test]
    fn completions_text_chunks() {
        let s = "data: {\"choices\":[{\"text\":\"a\",\"index\":0}]}\n\ndata: {\"choices\":[{\"text\":\"b\"}],\"usage\":null}\n\ndata: [DONE]\n\n";
        assert_eq!(
            parse_in_pieces(s, 7),
            vec![
                StreamEvent::Content("a".into()),
                StreamEvent::Content("b".into()),
                StreamEvent::Done
            ]
        );
    }

    #[test]
    fn error_event_and_error_chunk() {
        let s = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\nevent: error\ndata: {\"error\":{\"message\":\"engine died\",\"type\":\"internal\"}}\n\n";
        assert_eq!(
            parse_in_pieces(s, 5),
            vec![
                StreamEvent::Content("x".into()),
                StreamEvent::Error("engine died".into())
            ]
        );
        let s = "data: {\"error\":{\"message\":\"overloaded\"}}\n\n";
        assert_eq!(
            parse_in_pieces(s, 3),
            vec![StreamEvent::Error("overloaded".into())]
        );
        let s = "event: error\ndata: plain words\n\n";
        assert_eq!(
            parse_in_pieces(s, 100),
            vec![StreamEvent::Error("plain words".into())]
        );
    }

    #[test]
    fn malformed_data_and_missing_final_blank_line() {
        let s = "data: {not json\n\ndata: {\"id\":1}\n\ndata: [DONE]";
        let out = parse_in_pieces(s, 4);
        assert!(
            matches!(out.first(), Some(StreamEvent::Malformed(_))),
            "{out:?}"
        );
        assert!(
            matches!(out.get(1), Some(StreamEvent::Malformed(_))),
            "{out:?}"
        );
        assert_eq!(out.get(2), Some(&StreamEvent::Done));
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn multi_line_data_is_joined() {
        let s = "data: {\"choices\":\ndata: [{\"text\":\"z\"}]}\n\n";
        assert_eq!(
            parse_in_pieces(s, 2),
            vec![StreamEvent::Content("z".into())]
        );
    }
}
