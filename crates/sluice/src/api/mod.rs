//! The HTTP API: OpenAI-compatible shapes in, relay outcomes out.
//!
//! This module parses and validates requests (OpenAI's chat shape, sluice's own `"sluice"`
//! options), picks the model, and turns a relay's [`Frames`](crate::relay::Frames) into SSE or a JSON completion. It
//! owns no timing logic. Errors use OpenAI's error JSON (`{"error": {"message", "type", "param",
//! "code"}}`) with the right status.
//!
//! A streamed response commits to `200` only when its first frame arrives: a stream that fails
//! before that (a first-token timeout, an upstream error status) gets a real HTTP error (`504`,
//! `502`) instead of a `200` with an error inside. After that, failures are SSE error events,
//! and `data: [DONE]` ends a stream only when it succeeded.
//!
//! | module | owns |
//! |---|---|
//! | [`edge`] | what every request passes first: Host and Origin checks, CORS, request id, access log |
//! | [`error`] | [`ApiError`]: every error in OpenAI's JSON format, with its status |
//! | `chat` | `POST /v1/chat/completions`: reading, parsing and validating the request, the response |
//! | `sse` | encoding frames and endings as server-sent events |
//! | `streams` | `GET /v1/streams`, `…/{id}/events` (resume), `POST …/{id}/cancel` |
//! | `transcript` | `GET /v1/streams/{id}`: a transcript's JSON, streamed page by page |
//! | `responses` | OpenAI's Responses API (`/v1/responses`) over any model, on top of streams |
//! | `messages` | an Anthropic-compatible front door (`/v1/messages`) over any model |
//! | `web` | the web page at `/`, its assets compiled in, under a strict Content-Security-Policy |

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::auth::{Keys, Unauthenticated};
use crate::config::Config;
use crate::relay::RelayContext;

use edge::{EdgePolicy, TenantName};

mod chat;
pub mod edge;
pub mod error;
mod messages;
mod responses;
mod sse;
mod streams;
mod transcript;
mod web;

use chat::chat_completions;
pub(crate) use chat::parse_chat;
pub use error::ApiError;
use streams::{cancel_stream, list_streams, stream_events};
use transcript::show_stream;

/// The response header that names the stream.
pub const STREAM_ID_HEADER: &str = "x-sluice-stream-id";

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The configuration.
    pub config: Arc<Config>,
    /// The relays' shared context (each relay holds a reference, not a copy).
    pub relay: Arc<RelayContext>,
    /// API keys and their limits.
    pub keys: Arc<Keys>,
}

/// The most of a client's own input (a model name, a stream id) echoed back in an error.
const MAX_ECHO: usize = 64;

/// The API's routes.
///
/// Everything under `/v1` needs a key when keys are configured; `/healthz`, `/metrics` and the
/// web page's assets do not (they carry no tenant data). Every request passes the [`edge`] first.
pub fn router(state: AppState) -> Router {
    let policy = EdgePolicy {
        allowed_hosts: (!state.keys.enabled()).then(|| {
            state
                .config
                .allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect()
        }),
        cors_origins: state.config.cors_origins.iter().cloned().collect(),
    };
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/streams", get(list_streams))
        .route("/v1/streams/{id}", get(show_stream))
        .route("/v1/streams/{id}/events", get(stream_events))
        .route("/v1/streams/{id}/cancel", post(cancel_stream))
        .route("/v1/messages", post(messages::messages))
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::retrieve).delete(responses::delete),
        )
        .route("/v1/responses/{id}/cancel", post(responses::cancel))
        .route(
            "/v1/responses/{id}/input_items",
            get(responses::input_items),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(v1)
        .merge(web::routes())
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .method_not_allowed_fallback(|request: Request| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                format!("{} is not allowed on this endpoint", request.method()),
            )
        })
        .with_state(state)
        .layer(middleware::from_fn_with_state(policy, edge::edge))
}

/// Finds the caller's tenant from `Authorization: Bearer KEY` (or Anthropic's `x-api-key: KEY`);
/// 401 without a valid key.
async fn authenticate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let caller = {
        let headers = request.headers();
        let text = |name: HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        match (
            text(header::AUTHORIZATION),
            text(HeaderName::from_static("x-api-key")),
        ) {
            (None, Some(key)) => state.keys.authenticate_key(Some(key)),
            (authorization, _) => state.keys.authenticate(authorization),
        }
    };
    let anthropic = request.uri().path() == "/v1/messages";
    match caller {
        Ok(caller) => {
            let tenant = TenantName(caller.tenant.clone());
            request.extensions_mut().insert(caller);
            let mut response = next.run(request).await;
            response.extensions_mut().insert(tenant);
            response
        }
        Err(why) => {
            let message = match why {
                Unauthenticated::Missing => {
                    "an API key is required: send Authorization: Bearer KEY"
                }
                Unauthenticated::Unknown => "the API key is not valid",
            };
            if anthropic {
                let body = messages::error_body(StatusCode::UNAUTHORIZED, message);
                return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
            }
            ApiError {
                code: Some("invalid_api_key"),
                ..ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            }
            .into_response()
        }
    }
}

async fn models(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = state
        .config
        .models
        .iter()
        .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": "sluice"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
}
