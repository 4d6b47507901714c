//! The service end to end with the real SmolLM2 tokenizer and a scripted engine:
//! byte-level BPE tokens that split characters, special tokens, stop strings.

mod common;

use std::sync::Arc;

use dynamo_preprocessor::{Preprocessor, PreprocessorConfig, PreprocessorService};
use dynamo_protocol::{
    ChatMessage, ChatRequest, FinishReason, Prompt, SamplingOptions, TextDelta, TokenDelta,
    TokenRequest,
};
use dynamo_runtime::{RequestContext, ResponseStream, ServeError, Service};
use futures::StreamExt;

use common::model_or_skip;

/// Replays `ids` one per step, the last step with `Stop`, like an engine that ends on EOS.
struct Replay(Vec<u32>);

impl Service<TokenRequest, TokenDelta> for Replay {
    fn call(&self, _req: TokenRequest, _ctx: RequestContext) -> ResponseStream<TokenDelta> {
        let n = self.0.len();
        let steps: Vec<Result<TokenDelta, ServeError>> = self
            .0
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                Ok(TokenDelta {
                    token_ids: vec![id],
                    finish_reason: (i + 1 == n).then_some(FinishReason::Stop),
                    cached_tokens: None,
                    logprobs: Vec::new(),
                })
            })
            .collect();
        Box::pin(futures::stream::iter(steps))
    }
}

async fn run(pre: &Arc<Preprocessor>, answer_ids: Vec<u32>, stop: &[&str]) -> Vec<TextDelta> {
    let svc = PreprocessorService::new(pre.clone(), Arc::new(Replay(answer_ids)));
    let req = ChatRequest {
        model: "smollm2".into(),
        prompt: Prompt::Chat(vec![ChatMessage {
            role: "user".into(),
            content: "Capital?".into(),
        }]),
        sampling: SamplingOptions::default(),
        max_tokens: Some(100),
        stop: stop.iter().map(|s| s.to_string()).collect(),
        ignore_eos: false,
    };
    svc.call(req, RequestContext::new("t"))
        .map(|r| r.expect("no error"))
        .collect()
        .await
}

#[tokio::test]
async fn real_tokens_stream_to_text() {
    let Some(path) = model_or_skip("real_tokens_stream_to_text") else {
        return;
    };
    let pre = Arc::new(Preprocessor::new(PreprocessorConfig::gguf(path)).unwrap());
    let answer = "日本の首都は東京です 🗼. The capital of France is Paris.";
    let mut ids = pre.tokenizer().encode(answer, false).unwrap();
    ids.push(pre.tokenizer().token_to_id("<|im_end|>").unwrap());
    let n = ids.len() as u32;

    let out = run(&pre, ids.clone(), &[]).await;
    let text: String = out.iter().map(|d| d.text.as_str()).collect();
    assert_eq!(text, answer);
    assert!(out.iter().all(|d| !d.text.contains('\u{FFFD}')), "{out:?}");
    let last = out.last().unwrap();
    assert_eq!(last.finish_reason, Some(FinishReason::Stop));
    assert_eq!(last.usage.unwrap().completion_tokens, n);
    assert_eq!(out.iter().map(|d| d.tokens).sum::<u32>(), n);

    // A multi-byte stop string that several tokens make up.
    let out = run(&pre, ids.clone(), &["東京"]).await;
    let text: String = out.iter().map(|d| d.text.as_str()).collect();
    assert_eq!(text, "日本の首都は");
    assert_eq!(out.last().unwrap().finish_reason, Some(FinishReason::Stop));
    assert!(out.last().unwrap().usage.unwrap().completion_tokens < n);

    let out = run(&pre, ids, &["Paris", "France"]).await;
    let text: String = out.iter().map(|d| d.text.as_str()).collect();
    assert_eq!(text, "日本の首都は東京です 🗼. The capital of ");
}
