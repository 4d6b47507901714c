//! `graph up --interactive`: a chat prompt in the terminal against the graph's own
//! OpenAI endpoint, keeping the conversation, streaming each answer as it comes.

use std::io::Write;

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The `content` of each `data:` line of an SSE body; `None` at `[DONE]`.
fn sse_content(line: &str) -> Option<Option<String>> {
    let data = line.strip_prefix("data: ")?;
    if data.trim() == "[DONE]" {
        return Some(None);
    }
    let v: Value = serde_json::from_str(data).ok()?;
    if let Some(msg) = v["error"]["message"].as_str() {
        return Some(Some(format!("\n[error: {msg}]")));
    }
    Some(Some(
        v["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap_or("")
            .to_string(),
    ))
}

/// Read lines from stdin until EOF or `/quit`; each is a user turn.
pub async fn repl(url: &str, model: &str) {
    let client = reqwest::Client::new();
    let mut history: Vec<Value> = Vec::new();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    println!("chatting with `{model}` at {url} — an empty line does nothing, /quit or Ctrl-D ends");
    loop {
        print!("> ");
        let _ = std::io::stdout().flush();
        let Ok(Some(line)) = lines.next_line().await else {
            break;
        };
        let line = line.trim();
        if line == "/quit" {
            break;
        }
        if line.is_empty() {
            continue;
        }
        history.push(json!({"role": "user", "content": line}));
        let body = json!({"model": model, "messages": history, "stream": true, "max_tokens": 256});
        let resp = match client
            .post(format!("{url}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                println!("[cannot reach the graph: {e}]");
                history.pop();
                continue;
            }
        };
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            let msg = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(String::from))
                .unwrap_or(text);
            println!("[{status}: {msg}]");
            history.pop();
            continue;
        }
        let mut answer = String::new();
        let mut pending = String::new();
        let mut body = resp.bytes_stream();
        'stream: while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            pending.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(i) = pending.find('\n') {
                let line: String = pending.drain(..=i).collect();
                match sse_content(line.trim_end()) {
                    Some(Some(text)) => {
                        print!("{text}");
                        let _ = std::io::stdout().flush();
                        answer.push_str(&text);
                    }
                    Some(None) => break 'stream,
                    None => {}
                }
            }
        }
        println!();
        history.push(json!({"role": "assistant", "content": answer}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sse_lines() {
        assert_eq!(
            sse_content(r#"data: {"choices":[{"delta":{"content":"Hi"}}]}"#),
            Some(Some("Hi".into()))
        );
        assert_eq!(sse_content("data: [DONE]"), Some(None));
        assert_eq!(sse_content("event: error"), None);
        assert!(
            matches!(sse_content(r#"data: {"error":{"message":"boom"}}"#), Some(Some(s)) if s.contains("boom"))
        );
    }
}
