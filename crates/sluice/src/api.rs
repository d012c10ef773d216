//! The HTTP API: OpenAI-compatible shapes in, relay outcomes out.
//!
//! This module parses and validates requests (OpenAI's chat shape, sluice's own `"sluice"`
//! options), picks the model, and turns a relay's [`Frames`] into SSE or a JSON completion. It
//! owns no timing logic. Errors use OpenAI's error JSON (`{"error": {"message", "type", "param",
//! "code"}}`) with the right status.
//!
//! A streamed response commits to `200` only when its first frame arrives: a stream that fails
//! before that (a first-token timeout, an upstream error status) gets a real HTTP error (`504`,
//! `502`) instead of a `200` with an error inside. After that, failures are SSE error events,
//! and `data: [DONE]` ends a stream only when it succeeded.

use std::sync::Arc;
use std::time::Duration;

use async_stream::stream;
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::BytesMut;
use futures_util::FutureExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sluice_flow::QueueError;
use tokio::time::Instant;

use crate::auth::{Caller, Keys, Refused, Unauthenticated};
use crate::config::Config;
use crate::edge::{self, EdgePolicy, TenantName};
use crate::hub::{CancelResult, Live};
use crate::redact::truncate;
use crate::relay::{self, Frame, Frames, RelayContext, StreamRequest};
use crate::store::TranscriptHead;
use crate::stream::{Ending, OnDisconnect, Reason, Status, Terminal, Timeouts};
use crate::upstream::{sim, Payload, Upstream, UpstreamRequest};

/// The response header that names the stream.
pub const STREAM_ID_HEADER: &str = "x-sluice-stream-id";

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The configuration.
    pub config: Arc<Config>,
    /// The relays' shared context.
    pub relay: RelayContext,
    /// API keys and their limits.
    pub keys: Arc<Keys>,
}

/// The most of a client's own input (a model name, a stream id) echoed back in an error.
const MAX_ECHO: usize = 64;

/// The API's routes.
///
/// Everything under `/v1` needs a key when keys are configured; `/healthz` and `/metrics` do not
/// (they carry no tenant data). Every request passes the [`edge`] first.
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
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(v1)
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

/// An error in OpenAI's format.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
    stream_id: Option<Arc<str>>,
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

    fn bad_request(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The error a stream that ended abnormally before its first byte answers with.
    fn for_ending(ending: &Ending, stream_id: Arc<str>) -> Self {
        let status = match ending.status() {
            Status::TimedOut => StatusCode::GATEWAY_TIMEOUT,
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

/// Finds the caller's tenant from `Authorization: Bearer KEY`; 401 without a valid key.
async fn authenticate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match state.keys.authenticate(header) {
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
            ApiError {
                code: Some("invalid_api_key"),
                ..ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            }
            .into_response()
        }
    }
}

/// A 429 in OpenAI's format, with `Retry-After`.
fn refused(why: Refused) -> Response {
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

/// Per-request gateway options: the body field `"sluice"`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SluiceOptions {
    first_token_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    total_timeout_ms: Option<u64>,
    on_disconnect: Option<OnDisconnect>,
}

/// A validated chat request.
pub(crate) struct ChatRequest {
    model: String,
    stream: bool,
    options: SluiceOptions,
    pub(crate) body: Map<String, Value>,
}

/// Parses and validates a chat request body.
pub(crate) fn parse_chat(bytes: &[u8]) -> Result<ChatRequest, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("body", format!("the body is not valid JSON: {e}")))?;
    let Value::Object(mut body) = value else {
        return Err(ApiError::bad_request(
            "body",
            "the body must be a JSON object",
        ));
    };
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => {
            return Err(ApiError::bad_request(
                "model",
                "`model` must be a non-empty string",
            ))
        }
        None => return Err(ApiError::bad_request("model", "`model` is required")),
    };
    match body.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => {
            if let Some(i) = m.iter().position(|msg| !msg.is_object()) {
                return Err(ApiError::bad_request(
                    format!("messages[{i}]"),
                    "each message must be an object",
                ));
            }
        }
        Some(Value::Array(_)) => {
            return Err(ApiError::bad_request(
                "messages",
                "`messages` must not be empty",
            ))
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "messages",
                "`messages` must be an array",
            ))
        }
        None => return Err(ApiError::bad_request("messages", "`messages` is required")),
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::bad_request(
                "stream",
                "`stream` must be true or false",
            ))
        }
    };
    let options = match body.remove("sluice") {
        None | Some(Value::Null) => SluiceOptions::default(),
        Some(v) => serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            let param = if path == "." {
                "sluice".to_string()
            } else {
                format!("sluice.{path}")
            };
            ApiError::bad_request(param, format!("invalid gateway option: {}", e.inner()))
        })?,
    };
    for (name, value) in [
        ("first_token_timeout_ms", options.first_token_timeout_ms),
        ("idle_timeout_ms", options.idle_timeout_ms),
        ("total_timeout_ms", options.total_timeout_ms),
    ] {
        if value == Some(0) {
            return Err(ApiError::bad_request(
                format!("sluice.{name}"),
                "must be greater than 0",
            ));
        }
    }
    Ok(ChatRequest {
        model,
        stream,
        options,
        body,
    })
}

/// Reads a request body of at most `limit` bytes within `time`. Memory follows the body's
/// size: each piece is copied out of the connection's read buffer as it arrives (holding on to
/// hyper's pieces would pin a whole read buffer per byte of a body dripped a byte at a time).
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    time: Duration,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the body is larger than the limit of {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let read = async {
        use http_body_util::BodyExt;
        let mut body = body;
        let mut out = BytesMut::with_capacity(declared.unwrap_or(0).min(limit));
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::bad_request("body", format!("the body could not be read: {e}"))
            })?;
            if let Ok(data) = frame.into_data() {
                if out.len() + data.len() > limit {
                    return Err(too_large());
                }
                out.extend_from_slice(&data);
            }
        }
        Ok(out.freeze())
    };
    match tokio::time::timeout(time, read).await {
        Ok(read) => read,
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!("the body was not received within {time:?} (body_timeout_ms)"),
        )
        .with_code("body_timeout")),
    }
}

/// Refuses a body that does not say it is JSON: `415`. Browsers can send `text/plain` and form
/// bodies across sites without asking; they cannot send `application/json` without a preflight.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let essence = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    match essence {
        Some(t) if t.eq_ignore_ascii_case("application/json") => Ok(()),
        _ => Err(ApiError {
            param: Some("content-type".into()),
            ..ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "the body must be JSON: send Content-Type: application/json",
            )
        }),
    }
}

async fn chat_completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    require_json(&headers)?;
    let bytes = read_body(
        body,
        &headers,
        state.config.max_body_bytes,
        state.config.body_timeout,
    )
    .await?;
    let chat = parse_chat(&bytes)?;
    // The parsed request holds what is needed; the raw body need not wait for the stream.
    drop(bytes);
    let Some(model) = state.config.model(&chat.model) else {
        return Err(ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "the model `{}` does not exist",
                    truncate(&chat.model, MAX_ECHO)
                ),
            )
        });
    };
    if let Upstream::Sim(defaults) = &model.upstream {
        sim::checked_params(defaults, &chat.body)
            .map_err(|e| ApiError::bad_request(e.param, e.message))?;
    }
    metrics::counter!("sluice_requests_total", "model" => model.name.clone(), "stream" => if chat.stream { "true" } else { "false" }).increment(1);
    let permit = match caller.admit() {
        Ok(permit) => permit,
        Err(why) => return Ok(refused(why)),
    };

    let client_request = Value::Object(chat.body.clone());
    let mut upstream_body = chat.body;
    upstream_body.insert("stream".into(), Value::Bool(true));
    if let Some(name) = &model.upstream_model {
        upstream_body.insert("model".into(), Value::String(name.clone()));
    }
    let ms = |v: Option<u64>, d: Duration| v.map(Duration::from_millis).unwrap_or(d);
    let timeouts = Timeouts {
        first_token: ms(
            chat.options.first_token_timeout_ms,
            model.timeouts.first_token,
        ),
        idle: ms(chat.options.idle_timeout_ms, model.timeouts.idle),
        total: ms(chat.options.total_timeout_ms, model.timeouts.total),
    };
    let id: Arc<str> = Arc::from(uuid::Uuid::new_v4().to_string());
    let request = StreamRequest {
        id: id.clone(),
        tenant: caller.tenant.to_string(),
        model: model.name.clone(),
        client_request,
        upstream: model.upstream.clone(),
        upstream_request: UpstreamRequest {
            body: upstream_body,
        },
        timeouts,
        started,
        on_disconnect: chat.options.on_disconnect.unwrap_or(model.on_disconnect),
    };
    let frames = relay::start(&state.relay, request, permit)
        .await
        .map_err(|e| ApiError::internal(format!("the stream could not be recorded: {e}")))?;
    if chat.stream {
        stream_response(frames, id, &model.name).await
    } else {
        complete_response(frames, id, &model.name).await
    }
}

/// The ending a client sees when the relay vanished without saying how the stream ended.
fn abandoned() -> Ending {
    Ending::abnormal(
        Reason::Shutdown,
        "the relay stopped before the stream ended",
    )
}

async fn stream_response(
    mut frames: Frames,
    id: Arc<str>,
    _model: &str,
) -> Result<Response, ApiError> {
    // Commit to 200 only once the first frame is here.
    let first = match frames.recv().await {
        Some(Ok(frame)) => Some(frame),
        Some(Err(QueueError::Failed(t))) => return Err(ApiError::for_ending(&t.ending, id)),
        Some(Err(QueueError::Abandoned)) => return Err(ApiError::for_ending(&abandoned(), id)),
        None => None,
    };
    let body = stream! {
        let mut last_seq = 0;
        // The next item to handle, if one was already taken from the queue.
        let mut next = Some(first.map(Ok));
        loop {
            let item = match next.take() {
                Some(item) => item,
                None => frames.recv().await,
            };
            match item {
                Some(Ok(frame)) => {
                    // This frame and every other one already waiting go out in one write.
                    let mut out = BytesMut::new();
                    let mut frame = frame;
                    loop {
                        if let Frame::Chunk { seq, committed, .. } = &frame {
                            // Only what is in the transcript reaches the client.
                            if let Some(committed) = committed {
                                committed.reached(*seq).await;
                            }
                            last_seq = *seq;
                        }
                        encode_frame(&frame, &mut out);
                        if out.len() >= COALESCE_BYTES {
                            break;
                        }
                        match frames.recv().now_or_never() {
                            Some(Some(Ok(more))) => frame = more,
                            Some(end) => {
                                next = Some(end);
                                break;
                            }
                            None => break,
                        }
                    }
                    yield Ok::<_, std::convert::Infallible>(out.freeze());
                }
                Some(Err(QueueError::Failed(t))) => {
                    yield Ok(encode_error(&t));
                    return;
                }
                Some(Err(QueueError::Abandoned)) => {
                    yield Ok(encode_error(&Terminal { seq: last_seq + 1, ending: abandoned() }));
                    return;
                }
                None => {
                    yield Ok(encode_terminal(&Terminal { seq: last_seq + 1, ending: Ending::Completed }));
                    return;
                }
            }
        }
    };
    Ok(sse_response(Body::from_stream(body), &id))
}

/// The most bytes of ready frames coalesced into one write.
const COALESCE_BYTES: usize = 64 * 1024;

/// One SSE event; multi-line data becomes several `data:` lines.
fn sse_event(seq: u64, data: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 24);
    write_event(&mut out, seq, data);
    out.freeze()
}

/// Appends one SSE event to `out`.
fn write_event(out: &mut BytesMut, seq: u64, data: &str) {
    out.reserve(data.len() + 24);
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(seq.to_string().as_bytes());
    out.extend_from_slice(b"\n");
    for line in data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.strip_suffix('\r').unwrap_or(line).as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"\n");
}

fn encode_frame(frame: &Frame, out: &mut BytesMut) {
    match frame {
        Frame::Chunk { seq, data, .. } => write_event(out, *seq, data),
        Frame::KeepAlive => out.extend_from_slice(b": keep-alive\n\n"),
    }
}

/// The event that ends a stream: `[DONE]` if it completed, else the error event.
fn encode_terminal(t: &Terminal) -> Bytes {
    match t.ending {
        Ending::Completed => Bytes::from(format!("id: {}\ndata: [DONE]\n\n", t.seq)),
        _ => encode_error(t),
    }
}

/// The error event that ends a failed stream: OpenAI's error object, which the SDKs raise.
fn encode_error(t: &Terminal) -> Bytes {
    let body = json!({"error": {
        "message": t.ending.detail().unwrap_or("the stream failed"),
        "type": t.ending.status().as_str(),
        "param": null,
        "code": t.ending.reason().map(|r| r.as_str()),
    }});
    sse_event(t.seq, &body.to_string())
}

async fn complete_response(
    mut frames: Frames,
    id: Arc<str>,
    model: &str,
) -> Result<Response, ApiError> {
    let mut content = String::new();
    let mut finish_reason = None;
    let mut usage = None;
    while let Some(item) = frames.recv().await {
        match item {
            Ok(Frame::Chunk { data, .. }) => {
                // The relay parsed this chunk before; it cannot fail now.
                if let Ok(Payload::Chunk(chunk)) = Payload::parse(&data) {
                    content.push_str(&chunk.content);
                    finish_reason = chunk.finish_reason.or(finish_reason);
                    usage = chunk.usage.or(usage);
                }
            }
            Ok(Frame::KeepAlive) => {}
            Err(QueueError::Failed(t)) => return Err(ApiError::for_ending(&t.ending, id)),
            Err(QueueError::Abandoned) => return Err(ApiError::for_ending(&abandoned(), id)),
        }
    }
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let body = json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": finish_reason.unwrap_or_else(|| "stop".into()),
        }],
        "usage": usage,
    });
    let mut response = Json(body).into_response();
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(STREAM_ID_HEADER, v);
    }
    Ok(response)
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

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    after: Option<String>,
}

async fn list_streams(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad_request(
            "limit",
            "`limit` must be between 1 and 100",
        ));
    }
    let (data, has_more) = state
        .relay
        .store
        .list(&caller.tenant, limit, q.after)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let last_id = data.last().map(|s| s.id.clone());
    Ok(Json(
        json!({"object": "list", "data": data, "has_more": has_more, "last_id": last_id}),
    ))
}

/// The `{id}` of a stream's path; a malformed one (bad percent-encoding) is a 400.
fn stream_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id).map_err(|e| {
        ApiError::bad_request(
            "id",
            format!(
                "the stream id in the path is not valid: {}",
                truncate(&e.body_text(), 200)
            ),
        )
    })
}

/// How many stored chunks a transcript read or a replay reads at a time, at most.
const PAGE_CHUNKS: usize = 256;
/// About how many bytes of chunks a transcript read or a replay reads at a time (at least one
/// chunk): what a read holds in memory, whatever the transcript's size.
const PAGE_BYTES: usize = 256 * 1024;

/// `GET /v1/streams/{id}`: the transcript, streamed out page by page, so reading one costs
/// memory in proportion to a page, never to the transcript. Its chunks are the ones stored when
/// the read began (a running stream's later chunks are for `/events`). If the store fails
/// midway, the body is cut off, so a client never mistakes part of a transcript for all of it.
async fn show_stream(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = stream_id(path)?;
    let store = state.relay.store.clone();
    let head = store
        .head(&caller.tenant, &id)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(|| not_found(&id))?;
    let body = stream! {
        yield Ok::<_, std::io::Error>(Bytes::from(transcript_prefix(&head)));
        // The answer's text, then the chunks: two passes over the same pages.
        for pass in [Pass::Content, Pass::Chunks] {
            let mut after = 0;
            let mut first = true;
            while after < head.last_seq {
                let page = store
                    .chunk_page(&head.id, after, PAGE_CHUNKS, PAGE_BYTES)
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                let mut out = String::new();
                for chunk in page.iter().filter(|c| c.seq <= head.last_seq) {
                    match pass {
                        Pass::Content => push_json_string_body(&mut out, &chunk.content),
                        Pass::Chunks => {
                            if !std::mem::take(&mut first) {
                                out.push(',');
                            }
                            push_chunk(&mut out, chunk);
                        }
                    }
                }
                yield Ok(Bytes::from(out));
            }
            yield Ok(Bytes::from_static(match pass {
                Pass::Content => b"\",\"chunks\":[",
                Pass::Chunks => b"]",
            }));
        }
        yield Ok(Bytes::from(transcript_suffix(&head)));
    };
    let mut response = Response::new(Body::from_stream(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

#[derive(Clone, Copy)]
enum Pass {
    Content,
    Chunks,
}

/// Stored JSON text as a JSON value, or as a string if it is not valid JSON (it always is,
/// unless the database was edited by hand).
fn raw_or_string(text: &str) -> Box<serde_json::value::RawValue> {
    serde_json::value::RawValue::from_string(text.to_string()).unwrap_or_else(|_| {
        serde_json::value::to_raw_value(text)
            .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned())
    })
}

/// The transcript's JSON up to the opening quote of `content`, in the order of
/// [`crate::store::Transcript`]'s fields.
fn transcript_prefix(head: &TranscriptHead) -> String {
    #[derive(serde::Serialize)]
    struct Prefix<'a> {
        id: &'a str,
        object: &'static str,
        model: &'a str,
        created: i64,
        status: Status,
        reason: Option<Reason>,
        detail: Option<&'a str>,
        request: Box<serde_json::value::RawValue>,
    }
    let mut text = serde_json::to_string(&Prefix {
        id: &head.id,
        object: "sluice.stream",
        model: &head.model,
        created: head.created,
        status: head.status,
        reason: head.reason,
        detail: head.detail.as_deref(),
        request: raw_or_string(&head.request),
    })
    .unwrap_or_else(|_| "{".into());
    text.pop(); // the closing brace
    text.push_str(",\"content\":\"");
    text
}

/// The transcript's JSON after `chunks`.
fn transcript_suffix(head: &TranscriptHead) -> String {
    let timings = serde_json::to_string(&head.timings).unwrap_or_else(|_| "null".into());
    let usage = head
        .usage
        .as_deref()
        .map(raw_or_string)
        .map_or_else(|| "null".to_string(), |u| u.get().to_string());
    format!(",\"timings\":{timings},\"usage\":{usage}}}")
}

/// Appends `text` escaped as the inside of a JSON string.
fn push_json_string_body(out: &mut String, text: &str) {
    let quoted = serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into());
    out.push_str(&quoted[1..quoted.len() - 1]);
}

/// Appends one chunk as `{"seq":..,"offset_ms":..,"data":..}`.
fn push_chunk(out: &mut String, chunk: &crate::store::ChunkRecord) {
    #[derive(serde::Serialize)]
    struct Chunk {
        seq: u64,
        offset_ms: f64,
        data: Box<serde_json::value::RawValue>,
    }
    let c = Chunk {
        seq: chunk.seq,
        offset_ms: chunk.offset_ms,
        data: raw_or_string(&chunk.data),
    };
    if let Ok(text) = serde_json::to_string(&c) {
        out.push_str(&text);
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no stream `{}`", truncate(id, MAX_ECHO)),
    )
}

fn sse_response(body: Body, id: &str) -> Response {
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert(STREAM_ID_HEADER, v);
    }
    response
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    after: Option<u64>,
}

/// `GET /v1/streams/{id}/events`: replays the stored chunks after `Last-Event-ID` (or
/// `?after=N`), then follows the live stream to its end, finishing with the same terminal event
/// as the original. No gap and no duplicate at the seam: the live feed is subscribed *before*
/// the replay, live chunks already replayed are skipped, and anything the live feed skipped
/// (a slow reader) is refilled from the store, which has every chunk before it is published.
async fn stream_events(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let id = stream_id(path)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request("after", e.body_text()))?;
    let after = match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                ApiError::bad_request("Last-Event-ID", "must be an event id (a whole number)")
            })?,
        None => q.after.unwrap_or(0),
    };
    let store = state.relay.store.clone();
    // Subscribe first, then look in the store: a chunk published after this point is either
    // in the replay or in the live feed (or both: skipped by id).
    let live = state.relay.hub.subscribe(&caller.tenant, &id);
    let found = store
        .state(&caller.tenant, &id)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if found.is_none() {
        return Err(not_found(&id));
    }
    let tenant = caller.tenant.clone();
    let stream_id = id.clone();
    let body = stream! {
        let mut last = after;
        macro_rules! replay {
            () => {
                loop {
                    let page = match store.chunks_after(&stream_id, last, PAGE_CHUNKS, PAGE_BYTES).await {
                        Ok(page) => page,
                        Err(e) => {
                            tracing::error!(stream = %stream_id, error = %e, "replay failed");
                            return;
                        }
                    };
                    if page.is_empty() {
                        break;
                    }
                    for (seq, data) in page {
                        last = seq;
                        yield Ok::<_, std::convert::Infallible>(sse_event(seq, &data));
                    }
                }
            };
        }
        replay!();
        let Some(mut live) = live else {
            // Not running here: finished. Its terminal event, from the store.
            if let Ok(Some(st)) = store.state(&tenant, &stream_id).await {
                if let Some(ending) = st.ending() {
                    if st.last_seq + 1 > after {
                        yield Ok(encode_terminal(&Terminal { seq: st.last_seq + 1, ending }));
                    }
                }
            }
            return;
        };
        loop {
            match live.recv().await {
                Ok(Live::Chunk { seq, data }) => {
                    if seq <= last {
                        continue; // already replayed
                    }
                    if seq > last + 1 {
                        replay!(); // the feed skipped some: the store has them
                        if seq <= last {
                            continue;
                        }
                    }
                    last = seq;
                    yield Ok(sse_event(seq, &data));
                }
                Ok(Live::Large { seq }) => {
                    if seq > last {
                        replay!(); // committed before it was published: the store has it
                    }
                }
                Ok(Live::End(terminal)) => {
                    replay!();
                    if terminal.seq > after {
                        yield Ok(encode_terminal(&terminal));
                    }
                    return;
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    metrics::counter!("sluice_resume_refills_total").increment(1);
                    replay!();
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    // The relay went away without its terminal event: report what the store says.
                    replay!();
                    if let Ok(Some(st)) = store.state(&tenant, &stream_id).await {
                        if let Some(ending) = st.ending() {
                            yield Ok(encode_terminal(&Terminal { seq: st.last_seq + 1, ending }));
                        }
                    }
                    return;
                }
            }
        }
    };
    Ok(sse_response(Body::from_stream(body), &id))
}

/// `POST /v1/streams/{id}/cancel`: stops a running stream (`cancelled(requested)`; the original
/// client and every resumer get the terminal error event) and answers with its final status.
/// Idempotent: on a finished stream it changes nothing and answers with the final status.
async fn cancel_stream(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = stream_id(path)?;
    let hub = &state.relay.hub;
    let live = hub.subscribe(&caller.tenant, &id);
    if hub.cancel(&caller.tenant, &id) == CancelResult::Cancelling {
        if let Some(mut live) = live {
            // Wait for the final status to be written: the relay publishes its end after that.
            let ended = async {
                loop {
                    match live.recv().await {
                        Ok(Live::End(_))
                        | Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                        _ => {}
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(30), ended).await;
        }
    }
    let st = state
        .relay
        .store
        .state(&caller.tenant, &id)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(json!({
        "id": id,
        "object": "sluice.stream",
        "status": st.status,
        "reason": st.reason,
        "detail": st.detail,
    })))
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_requests_name_the_field() {
        let err = |body: &str| {
            parse_chat(body.as_bytes())
                .err()
                .map(|e| (e.status, e.param))
        };
        let p = |s: &str| Some((StatusCode::BAD_REQUEST, Some(s.to_string())));
        assert_eq!(err("{"), p("body"));
        assert_eq!(err("[]"), p("body"));
        assert_eq!(err(r#"{"messages":[{}]}"#), p("model"));
        assert_eq!(err(r#"{"model":"sim"}"#), p("messages"));
        assert_eq!(err(r#"{"model":"sim","messages":[]}"#), p("messages"));
        assert_eq!(err(r#"{"model":"sim","messages":[1]}"#), p("messages[0]"));
        assert_eq!(
            err(r#"{"model":"sim","messages":[{}],"stream":"yes"}"#),
            p("stream")
        );
        assert_eq!(
            err(r#"{"model":"sim","messages":[{}],"sluice":{"idle_ms":1}}"#),
            p("sluice.idle_ms")
        );
        assert_eq!(
            err(r#"{"model":"sim","messages":[{}],"sluice":{"idle_timeout_ms":"x"}}"#),
            p("sluice.idle_timeout_ms")
        );
        assert_eq!(
            err(r#"{"model":"sim","messages":[{}],"sluice":{"idle_timeout_ms":0}}"#),
            p("sluice.idle_timeout_ms")
        );
        let ok = parse_chat(
            br#"{"model":"sim","messages":[{}],"stream":true,"sluice":{"idle_timeout_ms":5}}"#,
        )
        .expect("valid");
        assert!(ok.stream);
        assert_eq!(ok.options.idle_timeout_ms, Some(5));
        assert!(
            !ok.body.contains_key("sluice"),
            "gateway options are stripped before forwarding"
        );
    }

    #[test]
    fn events_carry_ids_and_split_multiline_data() {
        assert_eq!(
            &sse_event(3, "{\"a\":1}")[..],
            b"id: 3\ndata: {\"a\":1}\n\n"
        );
        assert_eq!(&sse_event(1, "a\nb")[..], b"id: 1\ndata: a\ndata: b\n\n");
        let e = encode_error(&Terminal {
            seq: 4,
            ending: Ending::abnormal(Reason::Idle, "idle"),
        });
        let text = String::from_utf8(e.to_vec()).expect("utf8");
        assert!(text.starts_with("id: 4\ndata: {\"error\":"), "{text}");
        assert!(text.contains("\"code\":\"idle\""), "{text}");
        assert!(!text.contains("[DONE]"));
    }
}
