//! The frontend with an echo downstream that streams the prompt's last text back word by
//! word: for trying OpenAI clients against the frontend without an engine.
//!
//! `cargo run -p dynamo-frontend --example echo -- 127.0.0.1:8000` (Ctrl-C stops it), then
//! `curl -N localhost:8000/v1/chat/completions -d '{"model":"echo","stream":true,
//!  "messages":[{"role":"user","content":"hello there"}]}'`

use std::sync::Arc;
use std::time::Duration;

use dynamo_frontend::{serve, Frontend, FrontendConfig};
use dynamo_protocol::{ChatRequest, FinishReason, Prompt, TextDelta, Usage};
use dynamo_runtime::{RequestContext, ResponseStream, ServeError, Service};
use tokio_util::sync::CancellationToken;

struct Echo;

impl Service<ChatRequest, TextDelta> for Echo {
    fn call(&self, req: ChatRequest, _ctx: RequestContext) -> ResponseStream<TextDelta> {
        let text = match &req.prompt {
            Prompt::Chat(messages) => messages.last().map(|m| m.content.clone()),
            Prompt::Text(text) => Some(text.clone()),
            Prompt::Tokens(ids) => Some(format!("{} token ids", ids.len())),
        };
        let Some(text) = text.filter(|t| !t.contains("fail")) else {
            return Box::pin(futures::stream::iter([Err(ServeError::invalid(
                "the echo refuses prompts that ask it to fail",
            ))]));
        };
        let words: Vec<String> = text.split_inclusive(' ').map(str::to_string).collect();
        let limit = req
            .max_tokens
            .map_or(words.len(), |m| words.len().min(m as usize));
        let n = limit.max(1);
        let words: Vec<String> = words.into_iter().take(n).collect();
        let count = words.len().max(1) as u32;
        let deltas = (0..count).map(move |i| {
            let last = i + 1 == count;
            Ok(TextDelta {
                text: words.get(i as usize).cloned().unwrap_or_default(),
                tokens: 1,
                finish_reason: last.then_some(FinishReason::Stop),
                usage: last.then_some(Usage {
                    prompt_tokens: 0,
                    completion_tokens: count,
                    cached_tokens: 0,
                }),
                logprobs: Vec::new(),
            })
        });
        Box::pin(futures::StreamExt::then(
            futures::stream::iter(deltas),
            |d| async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                d
            },
        ))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8000".into());
    let frontend = Frontend::new(FrontendConfig::for_models(["echo"]), Arc::new(Echo))?;
    let listener = tokio::net::TcpListener::bind(&address).await?;
    println!("echo frontend on http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.cancel();
        }
    });
    serve(listener, frontend, shutdown).await?;
    Ok(())
}
