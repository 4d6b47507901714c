//! Turning the downstream's deltas into the answer: SSE events for `stream: true`, one
//! JSON document otherwise.
//!
//! The SSE body owns the downstream [`Call`]: when the client disconnects, hyper drops the
//! body, which drops the call, which cancels the request context and drops the
//! downstream stream — nothing else holds either.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use dynamo_protocol::{TextDelta, TextLogprob};
use futures::Stream;
use serde::Serialize;

use crate::chunks::{error_event, ChunkWriter, OpenAiUsage, DONE};
use crate::downstream::{ended_early, Call};
use crate::error::ApiError;
use crate::openai::Endpoint;
use crate::tracker::RequestTracker;

/// The body of a streamed response.
#[derive(Debug)]
pub(crate) struct SseBody {
    call: Call,
    writer: ChunkWriter,
    tracker: RequestTracker,
    include_usage: bool,
    /// A delta read before the response headers were sent.
    first: Option<TextDelta>,
    completion_tokens: u32,
    ended: bool,
}

impl SseBody {
    pub(crate) fn new(
        call: Call,
        writer: ChunkWriter,
        tracker: RequestTracker,
        include_usage: bool,
        first: TextDelta,
    ) -> Self {
        SseBody {
            call,
            writer,
            tracker,
            include_usage,
            first: Some(first),
            completion_tokens: 0,
            ended: false,
        }
    }

    /// The bytes for one delta, or `None` for an empty non-final delta (nothing to send).
    fn on_delta(&mut self, delta: TextDelta) -> Option<Bytes> {
        self.tracker.on_tokens(delta.tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(delta.tokens);
        let Some(reason) = delta.finish_reason else {
            return (!delta.text.is_empty() || !delta.logprobs.is_empty())
                .then(|| self.writer.content_bytes(&delta.text, &delta.logprobs));
        };
        // The last delta: its text with the finish reason, the usage, `[DONE]`, in one write.
        self.ended = true;
        self.call.complete();
        let usage = OpenAiUsage::from_usage(delta.usage, self.completion_tokens);
        let mut out = Vec::with_capacity(delta.text.len() + 512);
        self.writer.content_with(
            &mut out,
            &delta.text,
            &delta.logprobs,
            Some(reason.as_openai()),
        );
        if self.include_usage {
            self.writer.usage(&mut out, &usage);
        }
        out.extend_from_slice(DONE);
        self.tracker.finish(200, Some(usage.prompt_tokens));
        Some(Bytes::from(out))
    }

    fn on_error(&mut self, error: &ApiError) -> Bytes {
        self.ended = true;
        tracing::warn!(status = %error.status, message = %error.message, "stream failed after it started");
        self.tracker.finish(error.status.as_u16(), None);
        let mut out = Vec::with_capacity(256);
        error_event(&mut out, error);
        Bytes::from(out)
    }
}

impl Stream for SseBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            let next = match this.first.take() {
                Some(first) => Some(Ok(first)),
                None => match this.call.poll_delta(cx) {
                    Poll::Ready(next) => next,
                    Poll::Pending => return Poll::Pending,
                },
            };
            let bytes = match next {
                Some(Ok(delta)) => match this.on_delta(delta) {
                    Some(bytes) => bytes,
                    None => continue,
                },
                Some(Err(error)) => this.on_error(&error),
                None => this.on_error(&ended_early()),
            };
            return Poll::Ready(Some(Ok(bytes)));
        }
    }
}

/// A whole response, aggregated from the deltas.
#[derive(Debug)]
pub(crate) struct Aggregated {
    pub text: String,
    pub finish_reason: &'static str,
    pub usage: OpenAiUsage,
    pub logprobs: Vec<TextLogprob>,
}

/// Reads the call to its end. `first` is a delta already read.
pub(crate) async fn aggregate(
    call: &mut Call,
    tracker: &mut RequestTracker,
    first: TextDelta,
) -> Result<Aggregated, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let mut completion_tokens = 0u32;
    let mut next = Some(first);
    loop {
        let delta = match next.take() {
            Some(delta) => delta,
            None => match call.next_delta().await {
                Some(result) => result?,
                None => return Err(ended_early()),
            },
        };
        tracker.on_tokens(delta.tokens);
        completion_tokens = completion_tokens.saturating_add(delta.tokens);
        text.push_str(&delta.text);
        logprobs.extend(delta.logprobs);
        if let Some(reason) = delta.finish_reason {
            call.complete();
            return Ok(Aggregated {
                text,
                finish_reason: reason.as_openai(),
                usage: OpenAiUsage::from_usage(delta.usage, completion_tokens),
                logprobs,
            });
        }
    }
}

#[derive(Serialize)]
struct ChatCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [ChatChoice<'a>; 1],
    usage: OpenAiUsage,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    logprobs: Option<serde_json::Value>,
    finish_reason: &'a str,
}

#[derive(Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct TextCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [TextChoice<'a>; 1],
    usage: OpenAiUsage,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<serde_json::Value>,
    finish_reason: &'a str,
}

/// The JSON body of a non-streamed response.
pub(crate) fn completion_body(
    endpoint: Endpoint,
    id: &str,
    created: u64,
    model: &str,
    answer: &Aggregated,
) -> Result<Vec<u8>, serde_json::Error> {
    let logprobs = if answer.logprobs.is_empty() {
        None
    } else {
        let mut raw = Vec::new();
        crate::logprobs::write(&mut raw, endpoint, &answer.logprobs, &mut 0);
        serde_json::from_slice(&raw).ok()
    };
    match endpoint {
        Endpoint::ChatCompletions => serde_json::to_vec(&ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model,
            choices: [ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: &answer.text,
                },
                logprobs: logprobs.clone(),
                finish_reason: answer.finish_reason,
            }],
            usage: answer.usage,
        }),
        Endpoint::Completions => serde_json::to_vec(&TextCompletion {
            id,
            object: "text_completion",
            created,
            model,
            choices: [TextChoice {
                index: 0,
                text: &answer.text,
                logprobs,
                finish_reason: answer.finish_reason,
            }],
            usage: answer.usage,
        }),
    }
}
