//! One request's bookkeeping: its in-flight slot, its timings and its final count in
//! `dynamo_frontend_requests_total`. Whatever path a request leaves by (answer, error,
//! client gone), dropping the tracker records it exactly once.

use std::sync::Arc;
use std::time::Instant;

use crate::metrics::{FrontendMetrics, InflightGuard, ModelHandles};
use crate::openai::Endpoint;

/// The status recorded for a request whose client went away before the end (nginx's).
pub const CLIENT_CLOSED: u16 = 499;

#[derive(Debug)]
pub(crate) struct RequestTracker {
    metrics: Arc<FrontendMetrics>,
    endpoint: Endpoint,
    model: Option<usize>,
    handles: Option<ModelHandles>,
    start: Instant,
    last_token_at: Option<Instant>,
    done: bool,
    slot: Option<InflightGuard>,
    /// The request's `http.request` span: status and token counts are recorded on it.
    span: tracing::Span,
    output_tokens: u64,
}

impl RequestTracker {
    pub(crate) fn new(metrics: Arc<FrontendMetrics>, endpoint: Endpoint, start: Instant) -> Self {
        RequestTracker {
            metrics,
            endpoint,
            model: None,
            handles: None,
            start,
            last_token_at: None,
            done: false,
            slot: None,
            span: tracing::Span::none(),
            output_tokens: 0,
        }
    }

    /// The span the answer's status and token counts are recorded on.
    pub(crate) fn set_span(&mut self, span: tracing::Span) {
        self.span = span;
    }

    /// Takes an in-flight slot; false when the limit is reached.
    pub(crate) fn admit(&mut self, max_inflight: usize) -> bool {
        self.slot = self.metrics.admit(max_inflight);
        self.slot.is_some()
    }

    /// The served model the request named; counts go to its label from now on.
    pub(crate) fn set_model(&mut self, model_index: Option<usize>) {
        self.model = model_index;
        self.handles = model_index.map(|i| self.metrics.model_handles(i));
    }

    /// A delta with `tokens` generated tokens reached the client.
    pub(crate) fn on_tokens(&mut self, tokens: u32) {
        if tokens == 0 {
            return;
        }
        self.output_tokens += u64::from(tokens);
        let now = Instant::now();
        if let Some(handles) = &self.handles {
            match self.last_token_at {
                None => handles
                    .ttft
                    .observe(now.duration_since(self.start).as_secs_f64()),
                Some(last) => handles
                    .itl
                    .observe(now.duration_since(last).as_secs_f64() / f64::from(tokens)),
            }
            handles.output_tokens.inc_by(u64::from(tokens));
        }
        self.last_token_at = Some(now);
    }

    /// Records the answer's status (and the prompt size, when known) once.
    pub(crate) fn finish(&mut self, status: u16, prompt_tokens: Option<u32>) {
        if self.done {
            return;
        }
        self.done = true;
        self.span.record("http.status_code", status);
        self.span.record("completion_tokens", self.output_tokens);
        if let Some(tokens) = prompt_tokens {
            self.span.record("prompt_tokens", tokens);
        }
        if status >= 500 {
            self.span.record("otel.status_code", "ERROR");
        }
        self.metrics
            .count_request(self.endpoint, self.model, status);
        if let Some(handles) = &self.handles {
            handles.duration.observe(self.start.elapsed().as_secs_f64());
            if let Some(tokens) = prompt_tokens {
                handles.input_tokens.inc_by(u64::from(tokens));
            }
        }
        // The slot is free as soon as the answer is complete.
        self.slot = None;
    }
}

impl Drop for RequestTracker {
    fn drop(&mut self) {
        self.finish(CLIENT_CLOSED, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_request_counts_as_client_closed_once() {
        let metrics = Arc::new(FrontendMetrics::new(&["m".to_string()]));
        {
            let mut tracker =
                RequestTracker::new(metrics.clone(), Endpoint::ChatCompletions, Instant::now());
            assert!(tracker.admit(4));
            tracker.set_model(Some(0));
            tracker.on_tokens(2);
            tracker.on_tokens(3);
            assert_eq!(metrics.inflight(), 1);
        }
        assert_eq!(metrics.inflight(), 0);
        let text = metrics.encode();
        assert!(text.contains(r#"status="499"} 1"#), "{text}");
        assert!(text.contains(r#"dynamo_frontend_output_tokens_total{model="m"} 5"#));
        assert!(text.contains(r#"dynamo_frontend_inter_token_latency_seconds_count{model="m"} 1"#));
    }

    #[test]
    fn finish_is_recorded_once() {
        let metrics = Arc::new(FrontendMetrics::new(&["m".to_string()]));
        let mut tracker =
            RequestTracker::new(metrics.clone(), Endpoint::Completions, Instant::now());
        tracker.finish(400, None);
        tracker.finish(200, None);
        drop(tracker);
        let text = metrics.encode();
        assert!(text.contains(r#"status="400"} 1"#), "{text}");
        assert!(!text.contains(r#"status="200""#));
        assert!(!text.contains(r#"status="499""#));
    }
}
