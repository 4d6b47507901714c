//! `POST /v1/chat/completions` and `POST /v1/completions`: admit, read, parse, call the
//! downstream, answer (streamed or whole).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use dynamo_runtime::{telemetry, RequestContext};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tracing::Instrument;

use crate::chunks::ChunkWriter;
use crate::downstream::{ended_early, Call};
use crate::error::ApiError;
use crate::frontend::{unix_now, Frontend};
use crate::openai::{parse_request, Endpoint};
use crate::stream::{aggregate, completion_body, SseBody};
use crate::tracker::RequestTracker;

/// Request id header: taken from the client when it sends a sane one, always echoed.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
/// The request's trace id (32 hex digits), when the graph exports traces.
pub const TRACE_ID_HEADER: HeaderName = HeaderName::from_static("x-trace-id");
/// Longest client-supplied request id kept.
const MAX_REQUEST_ID_LEN: usize = 128;

pub(crate) async fn generate(
    frontend: Arc<Frontend>,
    endpoint: Endpoint,
    request: Request,
) -> Response {
    let started = tokio::time::Instant::now();
    let mut tracker = RequestTracker::new(frontend.metrics.clone(), endpoint, started.into_std());
    let (parts, body) = request.into_parts();
    let request_id = request_id(&parts.headers, &frontend);
    // The root of the request's trace, or a child of the client's `traceparent`.
    let span = tracing::info_span!(
        "http.request",
        request_id = %request_id,
        endpoint = endpoint.label(),
        model = tracing::field::Empty,
        http.status_code = tracing::field::Empty,
        prompt_tokens = tracing::field::Empty,
        completion_tokens = tracing::field::Empty,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let incoming = parts
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok());
    telemetry::follow_traceparent(&span, incoming);
    // Its own span when traces are exported, else the client's context passed on.
    let traceparent = telemetry::traceparent_of(&span).or_else(|| incoming.map(str::to_string));
    let trace_id = telemetry::trace_id(&span);
    // Every log line of the request (its span's fields are printed with it) names the
    // trace, so an error in the log leads to its trace in Jaeger.
    if let Some(t) = &trace_id {
        span.record("trace_id", t.as_str());
    }
    tracker.set_span(span.clone());
    let request = Incoming {
        endpoint,
        headers: &parts.headers,
        body,
        request_id: &request_id,
        traceparent,
        started,
    };
    let mut response = answer(&frontend, request, tracker, &span)
        .instrument(span.clone())
        .await;
    if response.status().is_server_error() {
        span.in_scope(|| tracing::error!(status = %response.status(), "request failed"));
    }
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    if let Some(value) = trace_id.and_then(|t| HeaderValue::from_str(&t).ok()) {
        response.headers_mut().insert(TRACE_ID_HEADER, value);
    }
    response
}

/// What arrived, before it is checked.
struct Incoming<'a> {
    endpoint: Endpoint,
    headers: &'a HeaderMap,
    body: Body,
    request_id: &'a str,
    /// What the next hop gets as its caller.
    traceparent: Option<String>,
    started: tokio::time::Instant,
}

async fn answer(
    frontend: &Frontend,
    request: Incoming<'_>,
    mut tracker: RequestTracker,
    span: &tracing::Span,
) -> Response {
    let Incoming {
        endpoint,
        headers,
        body,
        request_id,
        traceparent,
        started,
    } = request;
    let config = &frontend.config;
    if !tracker.admit(config.max_inflight) {
        return reject(&mut tracker, ApiError::overloaded(config.max_inflight));
    }
    let deadline = started + config.request_timeout;
    let body =
        match tokio::time::timeout_at(deadline, read_body(body, headers, config.max_body_bytes))
            .await
        {
            Ok(Ok(body)) => body,
            Ok(Err(error)) => return reject(&mut tracker, error),
            Err(_) => return reject(&mut tracker, ApiError::timeout(config.request_timeout)),
        };
    let parsed = match parse_request(endpoint, &body, &config.served_models) {
        Ok(parsed) => parsed,
        Err(rejected) => {
            tracker.set_model(rejected.model_index);
            return reject(&mut tracker, rejected.error);
        }
    };
    drop(body);
    tracker.set_model(Some(parsed.model_index));
    // Borrowed from the config, which outlives the request: no copy of the name.
    let model = config
        .served_models
        .get(parsed.model_index)
        .map_or("", String::as_str);
    span.record("model", model);
    let ctx = RequestContext::new(request_id).with_traceparent(traceparent);
    let cancel_on_drop = ctx.cancellation_token().drop_guard();
    // In the span, so an in-process downstream that spawns work can inherit it.
    let stream = span.in_scope(|| frontend.downstream.call(parsed.request, ctx));
    let mut call = Call::new(
        stream,
        cancel_on_drop,
        started,
        config.request_timeout,
        frontend.stopping.clone(),
    );

    // Wait for the first delta before answering, so that a downstream refusal (unknown
    // model, prompt too long, no worker) still gets its own HTTP status.
    let first = match call.next_delta().await {
        Some(Ok(delta)) => delta,
        Some(Err(error)) => return reject(&mut tracker, error),
        None => return reject(&mut tracker, ended_early()),
    };
    let created = unix_now();
    let id = match endpoint {
        Endpoint::ChatCompletions => format!("chatcmpl-{request_id}"),
        Endpoint::Completions => format!("cmpl-{request_id}"),
    };

    if parsed.stream {
        let writer = ChunkWriter::new(endpoint, &id, created, model);
        let body = SseBody::new(call, writer, tracker, parsed.include_usage, first);
        return sse_response(Body::from_stream(body));
    }

    let answer = match aggregate(&mut call, &mut tracker, first).await {
        Ok(answer) => answer,
        Err(error) => return reject(&mut tracker, error),
    };
    match completion_body(endpoint, &id, created, model, &answer) {
        Ok(json) => {
            tracker.finish(200, Some(answer.usage.prompt_tokens));
            json_response(StatusCode::OK, json)
        }
        Err(error) => reject(
            &mut tracker,
            ApiError::from(dynamo_runtime::ServeError::internal(format!(
                "could not serialise the response: {error}"
            ))),
        ),
    }
}

fn reject(tracker: &mut RequestTracker, error: ApiError) -> Response {
    tracker.finish(error.status.as_u16(), None);
    error.into_response()
}

/// The body, or 413 past `limit` (checked against `Content-Length` first, so an honest
/// oversized request is refused before it is read).
async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::too_large(limit))
        }
        Err(error) => Err(ApiError::invalid_body(format!(
            "could not read the request body: {error}"
        ))),
    }
}

fn request_id(headers: &HeaderMap, frontend: &Frontend) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_LEN
                && id.bytes().all(|b| b.is_ascii_graphic())
        })
        .map_or_else(|| frontend.ids.next(), str::to_string)
}

fn sse_response(body: Body) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tell buffering proxies (nginx) to pass events through as they come.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

pub(crate) fn json_response(status: StatusCode, json: Vec<u8>) -> Response {
    let mut response = (status, json).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
