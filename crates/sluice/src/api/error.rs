//! [`ApiError`]: every error the API answers with, in OpenAI's JSON format (`{"error":
//! {"message", "type", "param", "code"}}`) and with the right status.

use std::sync::Arc;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::auth::Refused;
use crate::redact::truncate;
use crate::stream::{Ending, Reason, Status};

use super::{MAX_ECHO, STREAM_ID_HEADER};

/// An error in OpenAI's format.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) kind: &'static str,
    pub(super) message: String,
    pub(super) param: Option<String>,
    pub(super) code: Option<&'static str>,
    pub(super) stream_id: Option<Arc<str>>,
}

impl ApiError {
    /// An error with this status, type and message.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            stream_id: None,
        }
    }

    /// The same error with this `code`.
    pub fn with_code(self, code: &'static str) -> Self {
        Self {
            code: Some(code),
            ..self
        }
    }

    pub(super) fn bad_request(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    pub(super) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// A store failure: `503 store_unavailable` when the store cannot be
    /// reached, else `500`. `doing` says what failed ("the stream could not be recorded").
    pub(super) fn store(doing: &str, e: &crate::store::StoreError) -> Self {
        if e.is_unavailable() {
            Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!("{doing}: the store is unavailable ({})", e.report()),
            )
            .with_code("store_unavailable")
        } else {
            Self::internal(format!("{doing}: {}", e.report()))
        }
    }

    /// The error a stream that ended abnormally before its first byte answers with.
    pub(super) fn for_ending(ending: &Ending, stream_id: Arc<str>) -> Self {
        let status = match ending.status() {
            Status::TimedOut => StatusCode::GATEWAY_TIMEOUT,
            Status::Failed if ending.reason() == Some(Reason::StoreError) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Status::Failed => StatusCode::BAD_GATEWAY,
            Status::Interrupted => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self {
            status,
            kind: ending.status().as_str(),
            message: ending.detail().unwrap_or("the stream failed").to_string(),
            param: None,
            code: ending.reason().map(|r| r.as_str()),
            stream_id: Some(stream_id),
        }
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(id) = &self.stream_id {
            if let Ok(v) = HeaderValue::from_str(id) {
                response.headers_mut().insert(STREAM_ID_HEADER, v);
            }
        }
        response
    }
}

/// A 429 in OpenAI's format, with `Retry-After`.
pub(super) fn refused(why: Refused) -> Response {
    let (message, code, retry_after) = match why {
        Refused::Concurrency { limit } => (
            format!("this key already has {limit} streams running, its limit"),
            "concurrency_limit_exceeded",
            1,
        ),
        Refused::Rate {
            per_minute,
            retry_after,
        } => (
            format!("this key is limited to {per_minute} requests per minute"),
            "rate_limit_exceeded",
            retry_after.as_secs_f64().ceil().max(1.0) as u64,
        ),
    };
    let mut response = ApiError {
        code: Some(code),
        ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
    }
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    response
}

pub(super) fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no stream `{}`", truncate(id, MAX_ECHO)),
    )
}
