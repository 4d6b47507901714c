//! The async shell: the node's `llm.chat/v1` input port. It preprocesses a request,
//! calls the `llm.tokens/v1` downstream with a child context, and turns the token stream
//! into text deltas.

use std::sync::Arc;

use dynamo_protocol::{
    ChatRequest, FinishReason, TextDelta, TextLogprob, TokenDelta, TokenLogprob, TokenRequest,
    Usage,
};
use dynamo_runtime::{telemetry, RequestContext, ResponseStream, ServeError, Service};
use futures::StreamExt;

use crate::detokenizer::Detokenizer;
use crate::preprocess::Preprocessor;
use crate::stop::StopMatcher;

/// Prompt ids the detokenizer starts with, so the first generated token decodes in
/// context (enough for SentencePiece's leading space; byte-level BPE needs none).
const DETOKENIZER_CONTEXT: usize = 4;

/// `llm.chat/v1` → `llm.tokens/v1` → `llm.chat/v1` stream.
pub struct PreprocessorService {
    preprocessor: Arc<Preprocessor>,
    downstream: Arc<dyn Service<TokenRequest, TokenDelta>>,
}

impl PreprocessorService {
    pub fn new(
        preprocessor: Arc<Preprocessor>,
        downstream: Arc<dyn Service<TokenRequest, TokenDelta>>,
    ) -> Self {
        PreprocessorService {
            preprocessor,
            downstream,
        }
    }
}

impl Service<ChatRequest, TextDelta> for PreprocessorService {
    fn call(&self, req: ChatRequest, ctx: RequestContext) -> ResponseStream<TextDelta> {
        // The hop's span: a child of the caller's (the frontend's) through the context's
        // `traceparent`; the router's span, called in it, is its child.
        let span = tracing::info_span!(
            "preprocess",
            request_id = %ctx.request_id,
            prompt_tokens = tracing::field::Empty,
            max_tokens = tracing::field::Empty,
            completion_tokens = tracing::field::Empty,
            cached_tokens = tracing::field::Empty,
            finish_reason = tracing::field::Empty,
        );
        telemetry::follow(&span, &ctx);
        let _enter = span.enter();
        let token_request = match self.preprocessor.preprocess(&req) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e, "request rejected");
                return Box::pin(futures::stream::once(async move { Err(e) }));
            }
        };
        let prompt = &token_request.token_ids;
        let context = &prompt[prompt.len().saturating_sub(DETOKENIZER_CONTEXT)..];
        let detokenizer = Detokenizer::with_context(context);
        let prompt_tokens = u32::try_from(prompt.len()).unwrap_or(u32::MAX);
        span.record("prompt_tokens", prompt_tokens);
        span.record("max_tokens", token_request.stop.max_tokens);
        tracing::debug!(
            prompt_tokens,
            max_tokens = token_request.stop.max_tokens,
            "forwarding"
        );
        let upstream = self
            .downstream
            .call(token_request, telemetry::child_context(&ctx, &span));
        let state = TextStream {
            preprocessor: self.preprocessor.clone(),
            detokenizer,
            stop: StopMatcher::new(&req.stop),
            prompt_tokens,
            completion_tokens: 0,
            cached_tokens: 0,
            unreported_tokens: 0,
            unreported_logprobs: Vec::new(),
            ctx,
            upstream: Some(upstream),
            span: span.clone(),
            detokenize: None,
            detokenize_ns: 0,
        };
        // The span is not entered on every poll (per token): entering and leaving it costs
        // CPU in every layer, which with traces exported was a third of the pipeline's
        // cost per request. The few log lines below enter it themselves.
        Box::pin(futures::stream::unfold(state, |mut s| async move {
            s.next().await.map(|item| (item, s))
        }))
    }
}

/// The per-request state of the response stream.
struct TextStream {
    preprocessor: Arc<Preprocessor>,
    detokenizer: Detokenizer,
    stop: StopMatcher,
    prompt_tokens: u32,
    completion_tokens: u32,
    cached_tokens: u32,
    /// Tokens received since the last delta that was sent.
    unreported_tokens: u32,
    /// Their log-probabilities, when asked for.
    unreported_logprobs: Vec<TextLogprob>,
    ctx: RequestContext,
    /// `None` once the stream is over; dropping it cancels the downstream call.
    upstream: Option<ResponseStream<TokenDelta>>,
    span: tracing::Span,
    /// From the first token to the last: the detokenize span (one per request, not per
    /// token, so tracing stays cheap), and the time spent in the detokenizer within it.
    detokenize: Option<tracing::Span>,
    detokenize_ns: u64,
}

impl TextStream {
    /// The next delta to send, or `None` after the last one.
    async fn next(&mut self) -> Option<Result<TextDelta, ServeError>> {
        loop {
            let upstream = self.upstream.as_mut()?;
            let item = tokio::select! {
                biased;
                _ = self.ctx.cancelled() => {
                    return Some(Ok(self.finish(String::new(), FinishReason::Cancelled)));
                }
                item = upstream.next() => item,
            };
            let delta = match item {
                Some(Ok(delta)) => delta,
                Some(Err(e)) => {
                    self.span
                        .in_scope(|| tracing::debug!(error = %e, "downstream failed"));
                    self.upstream = None;
                    return Some(Err(e));
                }
                None => {
                    self.upstream = None;
                    return Some(Err(ServeError::unavailable(
                        "the engine's stream ended without a finish reason",
                    )));
                }
            };
            match self.on_delta(delta) {
                Ok(Some(out)) => return Some(Ok(out)),
                Ok(None) => continue,
                Err(e) => {
                    self.upstream = None;
                    return Some(Err(e));
                }
            }
        }
    }

    /// Consumes one engine step; returns a delta when there is something to send.
    fn on_delta(&mut self, delta: TokenDelta) -> Result<Option<TextDelta>, ServeError> {
        if let Some(cached) = delta.cached_tokens {
            self.cached_tokens = cached;
        }
        let n = u32::try_from(delta.token_ids.len()).unwrap_or(u32::MAX);
        self.completion_tokens = self.completion_tokens.saturating_add(n);
        self.unreported_tokens = self.unreported_tokens.saturating_add(n);
        let tokenizer = self.preprocessor.tokenizer();
        for lp in &delta.logprobs {
            self.unreported_logprobs.push(text_logprob(tokenizer, lp));
        }
        if self.detokenize.is_none() {
            self.detokenize = Some(tracing::info_span!(
                parent: &self.span,
                "detokenize",
                tokens = tracing::field::Empty,
                detokenize_us = tracing::field::Empty,
            ));
        }
        let t0 = std::time::Instant::now();
        let text = self
            .detokenizer
            .push(tokenizer, &delta.token_ids)
            .map_err(|e| ServeError::internal(e.to_string()))?;
        let out = self.stop.push(&text);
        self.detokenize_ns += u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if out.stopped {
            // Dropping the upstream (in `finish`) cancels the engine's work.
            return Ok(Some(self.finish(out.text, FinishReason::Stop)));
        }
        let Some(reason) = delta.finish_reason else {
            if out.text.is_empty() {
                return Ok(None);
            }
            return Ok(Some(TextDelta {
                text: out.text,
                tokens: std::mem::take(&mut self.unreported_tokens),
                finish_reason: None,
                usage: None,
                logprobs: std::mem::take(&mut self.unreported_logprobs),
            }));
        };
        // The engine is done: what the detokenizer and the stop matcher held back can
        // come out now, unless it completes a stop string.
        let mut text = out.text;
        let tail = self
            .detokenizer
            .flush(tokenizer)
            .map_err(|e| ServeError::internal(e.to_string()))?;
        let last = self.stop.push(&tail);
        text.push_str(&last.text);
        let reason = if last.stopped {
            FinishReason::Stop
        } else {
            text.push_str(&self.stop.flush());
            reason
        };
        Ok(Some(self.finish(text, reason)))
    }

    /// The last delta; drops the upstream so nothing more is read.
    fn finish(&mut self, text: String, reason: FinishReason) -> TextDelta {
        self.upstream = None;
        self.span.in_scope(|| {
            tracing::debug!(
                finish_reason = reason.as_openai(),
                completion_tokens = self.completion_tokens,
                "finished"
            )
        });
        self.span.record("finish_reason", reason.as_openai());
        self.span
            .record("completion_tokens", self.completion_tokens);
        self.span.record("cached_tokens", self.cached_tokens);
        if let Some(d) = self.detokenize.take() {
            d.record("tokens", self.completion_tokens);
            d.record("detokenize_us", self.detokenize_ns / 1000);
        }
        TextDelta {
            text,
            tokens: std::mem::take(&mut self.unreported_tokens),
            finish_reason: Some(reason),
            usage: Some(Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.completion_tokens,
                cached_tokens: self.cached_tokens,
            }),
            logprobs: std::mem::take(&mut self.unreported_logprobs),
        }
    }
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;

/// A token's log-probability with its text and bytes, and its alternatives'.
fn text_logprob(tokenizer: &crate::tokenizer::Tokenizer, lp: &TokenLogprob) -> TextLogprob {
    let one = |id: u32, logprob: f32| {
        let bytes = tokenizer.token_bytes(id);
        TextLogprob {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            logprob,
            top: Vec::new(),
        }
    };
    TextLogprob {
        top: lp.top.iter().map(|&(id, l)| one(id, l)).collect(),
        ..one(lp.token_id, lp.logprob)
    }
}
