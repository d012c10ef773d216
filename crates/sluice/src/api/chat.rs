//! `POST /v1/chat/completions`: the body read under its size and time bounds, parsed and
//! validated, handed to the relay, and the relay's frames turned into SSE or one JSON completion.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::BytesMut;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sluice_flow::{QueueError, Timed};
use tokio::time::Instant;

use crate::auth::{Caller, Refused};
use crate::redact::truncate;
use crate::relay::{self, Frame, Frames, StreamRequest};
use crate::store::StoreError;
use crate::stream::{millis_or, Millis, OnDisconnect, Timeouts};
use crate::upstream::{sim, Payload, Upstream, UpstreamRequest};

use super::error::refused;
use super::sse::{abandoned, sse_response, Events};
use super::{ApiError, AppState, MAX_ECHO, STREAM_ID_HEADER};

/// Per-request gateway options: the body field `"sluice"`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SluiceOptions {
    first_token_timeout_ms: Option<Millis>,
    idle_timeout_ms: Option<Millis>,
    total_timeout_ms: Option<Millis>,
    on_disconnect: Option<OnDisconnect>,
}

/// A validated chat request.
pub(crate) struct ChatRequest {
    model: String,
    stream: bool,
    options: SluiceOptions,
    /// Whether the body carried gateway options (`sluice`), which `body` no longer has.
    had_options: bool,
    pub(crate) body: Map<String, Value>,
}

/// Parses and validates a chat request body.
pub(crate) fn parse_chat(bytes: &[u8]) -> Result<ChatRequest, ApiError> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("body", format!("the body is not valid JSON: {e}")))?;
    chat_request(value)
}

/// Validates a chat request given as JSON.
pub(super) fn chat_request(value: Value) -> Result<ChatRequest, ApiError> {
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
    let given = body.remove("sluice");
    let had_options = given.is_some();
    let options = match given {
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
    Ok(ChatRequest {
        model,
        stream,
        options,
        had_options,
        body,
    })
}

/// Reads a request body of at most `limit` bytes within `time`. Memory follows the body's
/// size: each piece is copied out of the connection's read buffer as it arrives (holding on to
/// hyper's pieces would pin a whole read buffer per byte of a body dripped a byte at a time).
/// A request's body as a JSON object (what the Responses and Messages front doors read).
pub(super) async fn json_object(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Map<String, Value>, ApiError> {
    let bytes = json_body(state, headers, body).await?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(body)) => Ok(body),
        _ => Err(ApiError::bad_request(
            "body",
            "the body must be a JSON object",
        )),
    }
}

/// The start of a chat request translated from another API's `body`: its `model`, these
/// `messages`, and its `stream`.
pub(super) fn chat_base(body: &Map<String, Value>, messages: Vec<Value>) -> Map<String, Value> {
    let mut chat = Map::new();
    chat.insert(
        "model".into(),
        body.get("model").cloned().unwrap_or(Value::Null),
    );
    chat.insert("messages".into(), Value::Array(messages));
    chat.insert(
        "stream".into(),
        Value::Bool(body.get("stream").and_then(Value::as_bool).unwrap_or(false)),
    );
    chat
}

/// A request's JSON body, within the configured size and time ([`require_json`], [`read_body`]).
pub(super) async fn json_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, ApiError> {
    require_json(headers)?;
    read_body(
        body,
        headers,
        state.config.max_body_bytes,
        state.config.body_timeout,
    )
    .await
}

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
    match sluice_flow::timeout(time, read).await {
        Timed::Completed(read) => read,
        Timed::Expired(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!("the body was not received within {time:?} (body_timeout_ms)"),
        )
        .with_code("body_timeout")),
    }
}

/// Refuses a body that does not say it is JSON: `415`. Browsers can send `text/plain` and form
/// bodies across sites without asking; they cannot send `application/json` without a preflight.
pub(super) fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
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

pub(super) async fn chat_completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let bytes = json_body(&state, &headers, body).await?;
    let chat = parse_chat(&bytes)?;
    // The transcript keeps the request as received (valid JSON: it just parsed, so valid UTF-8),
    // rather than its parsed tree cloned and serialized again; gateway options are not part of
    // it, so a body that had them is stored as parsed, without them.
    let client_request = if chat.had_options {
        Value::Object(chat.body.clone()).to_string()
    } else {
        String::from_utf8_lossy(&bytes).into_owned()
    };
    // The parsed request holds what is needed; the raw body need not wait for the stream.
    drop(bytes);
    let id: Arc<str> = Arc::from(crate::stream::new_stream_id());
    let stream = chat.stream;
    let (frames, model) =
        match start_stream(&state, &caller, chat, client_request, id.clone(), started).await? {
            Ok(started) => started,
            Err(refusal) => return Ok(refusal),
        };
    if stream {
        stream_response(frames, id, &model).await
    } else {
        complete_response(frames, id, &model).await
    }
}

/// Starts a stream for a validated chat request: finds the model, checks the simulated model's
/// fields, takes one of the caller's requests, records the stream as `client_request` under
/// `id`, and starts its relay. Returns its frames and the model's name, or (`Ok(Err)`) the
/// answer to a request a limit refused.
pub(super) async fn start_stream(
    state: &AppState,
    caller: &Caller,
    chat: ChatRequest,
    client_request: String,
    id: Arc<str>,
    started: Instant,
) -> Result<Result<(Frames, String), Response>, ApiError> {
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
    match caller.take_request(&state.relay.store).await {
        Ok(Ok(())) => {}
        Ok(Err(why)) => return Ok(Err(refused(why))),
        Err(e) => return Err(ApiError::store("the request could not be admitted", &e)),
    }

    let mut upstream_body = chat.body;
    upstream_body.insert("stream".into(), Value::Bool(true));
    if let Some(name) = &model.upstream_model {
        upstream_body.insert("model".into(), Value::String(name.clone()));
    }
    let timeouts = Timeouts {
        first_token: millis_or(
            chat.options.first_token_timeout_ms,
            model.timeouts.first_token,
        ),
        idle: millis_or(chat.options.idle_timeout_ms, model.timeouts.idle),
        total: millis_or(chat.options.total_timeout_ms, model.timeouts.total),
    };
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
        key: caller.stream_key(),
    };
    match relay::start(&state.relay, request).await {
        Ok(frames) => Ok(Ok((frames, model.name.clone()))),
        Err(StoreError::KeyBusy { limit }) => Ok(Err(refused(Refused::Concurrency { limit }))),
        Err(e) => Err(ApiError::store("the stream could not be recorded", &e)),
    }
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
    let body = Events::new(frames, first);
    Ok(sse_response(Body::from_stream(body), &id))
}

async fn complete_response(
    mut frames: Frames,
    id: Arc<str>,
    model: &str,
) -> Result<Response, ApiError> {
    let mut content = String::new();
    let mut finish_reason = None;
    let mut usage = None;
    // The last chunk: a gather route's lists every target's outcome and content.
    let mut last = None;
    while let Some(item) = frames.recv().await {
        match item {
            Ok(Frame::Chunk(c)) => {
                let data = c.data;
                // The relay parsed this chunk before; it cannot fail now.
                if let Ok(Payload::Chunk(chunk)) = Payload::parse(&data) {
                    content.push_str(&chunk.content);
                    finish_reason = chunk.finish_reason.or(finish_reason);
                    usage = chunk.usage.or(usage);
                }
                last = Some(data);
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
    let mut body = json!({
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
    let gathered = last
        .filter(|data| data.contains("\"sluice_gather\""))
        .and_then(|data| serde_json::from_str::<Value>(&data).ok())
        .and_then(|mut v| v.get_mut("sluice_gather").map(Value::take));
    if let Some(targets) = gathered {
        body["choices"] = gather_choices(&targets);
        body["sluice_gather"] = targets;
    }
    let mut response = Json(body).into_response();
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(STREAM_ID_HEADER, v);
    }
    Ok(response)
}

/// A gather's answer as choices: one per target, in the route's order, with its text; a target
/// that did not complete has its status as `finish_reason`.
fn gather_choices(targets: &Value) -> Value {
    let choices = targets
        .as_array()
        .map(|list| {
            list.iter()
                .map(|t| {
                    let status = t["status"].as_str().unwrap_or("failed");
                    json!({
                        "index": t["index"],
                        "message": {"role": "assistant", "content": t["content"]},
                        "finish_reason": if status == "completed" { "stop" } else { status },
                        "sluice_target": t["target"],
                    })
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    Value::Array(choices)
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
        assert_eq!(
            ok.options.idle_timeout_ms.map(Duration::from),
            Some(Duration::from_millis(5))
        );
        assert!(
            !ok.body.contains_key("sluice"),
            "gateway options are stripped before forwarding"
        );
    }
}
