//! Errors: [`ApiError`] is what a client sees (an HTTP status and OpenAI's error JSON);
//! [`FrontendError`] is what the caller that starts the frontend sees.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use dynamo_runtime::{ErrorKind, ServeError};
use serde::Serialize;

/// Why the frontend could not be built or could not serve.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The configuration is unusable; the message lists every problem.
    #[error("invalid frontend configuration: {0}")]
    Config(String),
    /// The listener failed (it is the caller's; the frontend never binds one itself).
    #[error("frontend listener failed: {0}")]
    Io(#[from] std::io::Error),
}

/// OpenAI's `type` for a mistake of the client.
pub const INVALID_REQUEST: &str = "invalid_request_error";
/// OpenAI's `type` for a failure on the server's side.
pub const SERVER_ERROR: &str = "server_error";

/// An error answer: the status and the body `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: [`INVALID_REQUEST`] or [`SERVER_ERROR`].
    pub error_type: &'static str,
    /// The offending request parameter, as a path (`messages[0].role`), if one is to blame.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    error_type: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            error_type,
            param: None,
            code: None,
        }
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 400 naming the parameter at fault.
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut error = Self::new(StatusCode::BAD_REQUEST, INVALID_REQUEST, message);
        error.param = Some(param.into());
        error.with_code("invalid_value")
    }

    /// 400 about the body as a whole (not JSON, not UTF-8, not an object).
    pub fn invalid_body(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, INVALID_REQUEST, message).with_code("invalid_json")
    }

    /// 404 for a model this frontend does not serve.
    pub fn model_not_found(model: &str) -> Self {
        let mut error = Self::new(
            StatusCode::NOT_FOUND,
            INVALID_REQUEST,
            format!("The model `{model}` does not exist or you do not have access to it."),
        );
        error.param = Some("model".to_string());
        error.with_code("model_not_found")
    }

    /// 413 for a body over the limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            INVALID_REQUEST,
            format!("request body is larger than the limit of {limit} bytes"),
        )
        .with_code("request_too_large")
    }

    /// 503 when the frontend already has `max_inflight` requests.
    pub fn overloaded(max_inflight: usize) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            SERVER_ERROR,
            format!("server is at its limit of {max_inflight} requests in flight; retry later"),
        )
        .with_code("overloaded")
    }

    /// 504 when a request ran past the configured timeout.
    pub fn timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            SERVER_ERROR,
            format!("request did not finish within {} s", limit.as_secs_f64()),
        )
        .with_code("timeout")
    }

    /// 404 for a path no route serves.
    pub fn unknown_url(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            INVALID_REQUEST,
            format!("Unknown request URL: {method} {path}. Please check the URL for typos."),
        )
        .with_code("unknown_url")
    }

    /// 405 for a known path with the wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            INVALID_REQUEST,
            format!("Method {method} is not allowed for {path}."),
        )
        .with_code("method_not_allowed")
    }

    /// 503 when the downstream is not ready (health check).
    pub fn not_ready() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            SERVER_ERROR,
            "the model backend is not ready",
        )
        .with_code("unavailable")
    }

    /// The body, serialised: `{"error":{...}}`.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        let body = Body {
            error: Inner {
                message: &self.message,
                error_type: self.error_type,
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        // Serialising plain strings into a Vec cannot fail; keep a fixed body if it did.
        serde_json::to_vec(&body).unwrap_or_else(|_| {
            br#"{"error":{"message":"error","type":"server_error","param":null,"code":null}}"#
                .to_vec()
        })
    }
}

impl From<ServeError> for ApiError {
    /// A downstream error keeps its message; its kind picks the status.
    fn from(error: ServeError) -> Self {
        let (status, error_type, code) = match error.kind {
            ErrorKind::InvalidRequest => {
                (StatusCode::BAD_REQUEST, INVALID_REQUEST, "invalid_value")
            }
            ErrorKind::NotFound => (StatusCode::NOT_FOUND, INVALID_REQUEST, "not_found"),
            ErrorKind::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, SERVER_ERROR, "overloaded"),
            ErrorKind::Unavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, SERVER_ERROR, "unavailable")
            }
            ErrorKind::Cancelled => (StatusCode::SERVICE_UNAVAILABLE, SERVER_ERROR, "cancelled"),
            ErrorKind::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                SERVER_ERROR,
                "internal_error",
            ),
        };
        ApiError::new(status, error_type, error.message).with_code(code)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.to_json_bytes()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_openai_shape() {
        let error = ApiError::invalid_param("temperature", "too hot");
        let value: serde_json::Value = serde_json::from_slice(&error.to_json_bytes()).unwrap();
        assert_eq!(value["error"]["message"], "too hot");
        assert_eq!(value["error"]["type"], "invalid_request_error");
        assert_eq!(value["error"]["param"], "temperature");
        assert_eq!(value["error"]["code"], "invalid_value");
    }

    #[test]
    fn downstream_kinds_map_to_statuses() {
        let cases = [
            (ErrorKind::InvalidRequest, 400),
            (ErrorKind::NotFound, 404),
            (ErrorKind::Overloaded, 503),
            (ErrorKind::Unavailable, 503),
            (ErrorKind::Internal, 500),
        ];
        for (kind, status) in cases {
            let error = ApiError::from(ServeError::new(kind, "x"));
            assert_eq!(error.status.as_u16(), status, "{kind:?}");
        }
    }
}
