//! The routes: generation, models, health, liveness, metrics, and JSON answers for
//! unknown paths (404) and wrong methods (405).

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;

use crate::error::ApiError;
use crate::frontend::{unix_now, Frontend};
use crate::generate::{generate, json_response};
use crate::metrics::CONTENT_TYPE;
use crate::openai::Endpoint;

type Shared = Arc<Frontend>;

pub(crate) fn router(frontend: Shared) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/metrics", get(metrics))
        .fallback(unknown_url)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(frontend)
}

async fn chat_completions(State(frontend): State<Shared>, request: Request) -> Response {
    generate(frontend, Endpoint::ChatCompletions, request).await
}

async fn completions(State(frontend): State<Shared>, request: Request) -> Response {
    generate(frontend, Endpoint::Completions, request).await
}

#[derive(Serialize)]
struct ModelCard<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'a str,
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelCard<'a>>,
}

fn card<'a>(frontend: &'a Frontend, id: &'a str, created: u64) -> ModelCard<'a> {
    ModelCard {
        id,
        object: "model",
        created,
        owned_by: &frontend.config.owned_by,
    }
}

fn to_json(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(json) => json_response(status, json),
        Err(error) => ApiError::from(dynamo_runtime::ServeError::internal(format!(
            "could not serialise the response: {error}"
        )))
        .into_response(),
    }
}

async fn list_models(State(frontend): State<Shared>) -> Response {
    let created = unix_now();
    let list = ModelList {
        object: "list",
        data: frontend
            .config
            .served_models
            .iter()
            .map(|id| card(&frontend, id, created))
            .collect(),
    };
    to_json(StatusCode::OK, &list)
}

async fn get_model(State(frontend): State<Shared>, Path(model): Path<String>) -> Response {
    match frontend.config.served_models.iter().find(|m| **m == model) {
        Some(id) => to_json(StatusCode::OK, &card(&frontend, id, unix_now())),
        None => ApiError::model_not_found(&model).into_response(),
    }
}

#[derive(Serialize)]
struct Health<'a> {
    status: &'static str,
    models: &'a [String],
}

async fn health(State(frontend): State<Shared>) -> Response {
    let ready = (frontend.readiness)();
    let (status, word) = if ready {
        (StatusCode::OK, "healthy")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
    };
    to_json(
        status,
        &Health {
            status: word,
            models: &frontend.config.served_models,
        },
    )
}

async fn live() -> Response {
    json_response(StatusCode::OK, br#"{"status":"live"}"#.to_vec())
}

async fn metrics(State(frontend): State<Shared>) -> Response {
    let mut response = frontend.metrics.encode().into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

async fn unknown_url(method: Method, uri: Uri) -> Response {
    ApiError::unknown_url(method.as_str(), uri.path()).into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::method_not_allowed(method.as_str(), uri.path()).into_response()
}
