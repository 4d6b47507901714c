use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use dynamo_protocol::{ChatMessage, Prompt, SamplingOptions};
use dynamo_runtime::ErrorKind;

use super::*;
use crate::test_support::tiny_config;

/// A downstream that replays a script and records what it was asked and whether its
/// stream was dropped before the end.
struct Scripted {
    script: Vec<Result<TokenDelta, ServeError>>,
    /// Keep the stream open after the script (like an engine still working).
    hang: bool,
    seen: Mutex<Option<TokenRequest>>,
    dropped: Arc<AtomicBool>,
}

struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Service<TokenRequest, TokenDelta> for Scripted {
    fn call(&self, req: TokenRequest, _ctx: RequestContext) -> ResponseStream<TokenDelta> {
        *self.seen.lock().unwrap() = Some(req);
        let flag = DropFlag(self.dropped.clone());
        let items = futures::stream::iter(self.script.clone());
        let tail = if self.hang {
            futures::stream::pending().boxed()
        } else {
            futures::stream::empty().boxed()
        };
        Box::pin(items.chain(tail).map(move |i| {
            let _keep = &flag;
            i
        }))
    }
}

fn step(ids: &[u32]) -> Result<TokenDelta, ServeError> {
    Ok(TokenDelta {
        token_ids: ids.to_vec(),
        finish_reason: None,
        cached_tokens: None,
        logprobs: Vec::new(),
    })
}

fn tiny() -> Arc<Preprocessor> {
    Arc::new(Preprocessor::new(tiny_config(1000)).unwrap())
}

fn scripted(script: Vec<Result<TokenDelta, ServeError>>, hang: bool) -> Arc<Scripted> {
    Arc::new(Scripted {
        script,
        hang,
        seen: Mutex::new(None),
        dropped: Arc::new(AtomicBool::new(false)),
    })
}

fn request(stop: &[&str]) -> ChatRequest {
    ChatRequest {
        model: "tiny".into(),
        prompt: Prompt::Chat(vec![ChatMessage {
            role: "user".into(),
            content: "Hi".into(),
        }]),
        sampling: SamplingOptions::default(),
        max_tokens: Some(50),
        stop: stop.iter().map(|s| s.to_string()).collect(),
        ignore_eos: false,
    }
}

/// One engine step per token of `text`, the first with `cached`, the last with `reason`.
fn script_for(
    pre: &Preprocessor,
    text: &str,
    reason: FinishReason,
) -> Vec<Result<TokenDelta, ServeError>> {
    let ids = pre.tokenizer().encode(text, false).unwrap();
    let mut out: Vec<_> = ids.iter().map(|&i| step(&[i])).collect();
    if let Some(Ok(first)) = out.first_mut() {
        first.cached_tokens = Some(3);
    }
    if let Some(Ok(last)) = out.last_mut() {
        last.finish_reason = Some(reason);
    }
    out
}

async fn collect(
    svc: &PreprocessorService,
    req: ChatRequest,
) -> Vec<Result<TextDelta, ServeError>> {
    svc.call(req, RequestContext::new("r1")).collect().await
}

async fn texts(svc: &PreprocessorService, req: ChatRequest) -> Vec<TextDelta> {
    collect(svc, req)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

fn joined(out: &[TextDelta]) -> String {
    out.iter().map(|d| d.text.as_str()).collect()
}

#[tokio::test]
async fn streams_text_with_usage_on_the_last_delta() {
    let pre = tiny();
    let text = "Hé 😀 ok";
    let script = script_for(&pre, text, FinishReason::Length);
    let n = script.len() as u32;
    let down = scripted(script, false);
    let svc = PreprocessorService::new(pre, down.clone());
    let out = texts(&svc, request(&[])).await;
    assert_eq!(joined(&out), text);
    assert!(out.iter().all(|d| !d.text.contains('\u{FFFD}')), "{out:?}");
    assert_eq!(out.iter().map(|d| d.tokens).sum::<u32>(), n);
    let last = out.last().unwrap();
    assert_eq!(last.finish_reason, Some(FinishReason::Length));
    let seen = down.seen.lock().unwrap().clone().unwrap();
    assert_eq!(seen.stop.max_tokens, 50);
    assert_eq!(
        last.usage,
        Some(Usage {
            prompt_tokens: seen.token_ids.len() as u32,
            completion_tokens: n,
            cached_tokens: 3
        })
    );
    let (_, rest) = out.split_last().unwrap();
    assert!(rest
        .iter()
        .all(|d| d.finish_reason.is_none() && d.usage.is_none()));
}

#[tokio::test]
async fn stop_string_ends_the_stream_and_drops_the_engine() {
    let pre = tiny();
    let mut script = script_for(&pre, "one two three", FinishReason::Length);
    // The engine would go on; it must not be read to the end.
    script.last_mut().unwrap().as_mut().unwrap().finish_reason = None;
    let down = scripted(script, true);
    let svc = PreprocessorService::new(pre, down.clone());
    let out = texts(&svc, request(&["two"])).await;
    assert_eq!(joined(&out), "one ");
    let last = out.last().unwrap();
    assert_eq!(last.finish_reason, Some(FinishReason::Stop));
    assert_eq!(
        last.usage.unwrap().completion_tokens,
        "one two".len() as u32
    );
    assert!(
        down.dropped.load(Ordering::SeqCst),
        "engine stream was not dropped"
    );
}

#[tokio::test]
async fn held_back_stop_prefix_is_released_at_the_end() {
    let pre = tiny();
    let script = script_for(&pre, "abc tw", FinishReason::Stop);
    let down = scripted(script, false);
    let svc = PreprocessorService::new(pre, down);
    let out = texts(&svc, request(&["two"])).await;
    assert_eq!(joined(&out), "abc tw");
    assert_eq!(out.last().unwrap().finish_reason, Some(FinishReason::Stop));
}

#[tokio::test]
async fn special_tokens_are_not_in_the_text() {
    let pre = tiny();
    let end = pre.tokenizer().token_to_id("<|im_end|>").unwrap();
    let mut script = script_for(&pre, "ok", FinishReason::Length);
    script.last_mut().unwrap().as_mut().unwrap().finish_reason = None;
    script.push(Ok(TokenDelta {
        token_ids: vec![end],
        finish_reason: Some(FinishReason::Stop),
        cached_tokens: None,
        logprobs: Vec::new(),
    }));
    let down = scripted(script, false);
    let svc = PreprocessorService::new(pre, down);
    let out = texts(&svc, request(&[])).await;
    assert_eq!(joined(&out), "ok");
    assert_eq!(out.last().unwrap().usage.unwrap().completion_tokens, 3);
}

#[tokio::test]
async fn errors_are_forwarded_and_end_the_stream() {
    let pre = tiny();
    let script = vec![step(&[70]), Err(ServeError::unavailable("worker died"))];
    let down = scripted(script, false);
    let svc = PreprocessorService::new(pre.clone(), down);
    let out = collect(&svc, request(&[])).await;
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(out[1].as_ref().unwrap_err().kind, ErrorKind::Unavailable);

    // A stream that ends without a finish reason is an error too, not a silent end.
    let down = scripted(vec![step(&[70])], false);
    let svc = PreprocessorService::new(pre.clone(), down);
    let out = collect(&svc, request(&[])).await;
    assert!(out.last().unwrap().is_err(), "{out:?}");

    // A bad request never reaches the downstream.
    let down = scripted(vec![], false);
    let svc = PreprocessorService::new(pre, down.clone());
    let mut req = request(&[]);
    req.prompt = Prompt::Chat(vec![]);
    let out = collect(&svc, req).await;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].as_ref().unwrap_err().kind, ErrorKind::InvalidRequest);
    assert!(down.seen.lock().unwrap().is_none());
}

#[tokio::test]
async fn cancellation_ends_with_cancelled() {
    let pre = tiny();
    let down = scripted(vec![step(&[70])], true);
    let svc = PreprocessorService::new(pre, down.clone());
    let ctx = RequestContext::new("r2");
    let mut stream = svc.call(request(&[]), ctx.clone());
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.finish_reason.is_none());
    ctx.cancel();
    let last = stream.next().await.unwrap().unwrap();
    assert_eq!(last.finish_reason, Some(FinishReason::Cancelled));
    assert!(stream.next().await.is_none());
    assert!(down.dropped.load(Ordering::SeqCst));
}
