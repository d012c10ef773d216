//! `POST /v1/messages`: an Anthropic-compatible front door to **any** configured model or route.
//!
//! The request is translated to a chat request (the `system` prompt first, text, `tool_use` and
//! `tool_result` blocks, `max_tokens`, `stop_sequences`, `temperature`, `top_p`, tools and
//! `tool_choice`), runs as a sluice stream like any other (recorded, resumable, cancellable,
//! under the disconnect policy), and its chunks are translated back: Anthropic's event stream
//! (`message_start`, `content_block_start`/`_delta`/`_stop` for text and tool use,
//! `message_delta` with the stop reason and usage, `message_stop`; an `error` event when the
//! stream ends abnormally), or one message JSON. Errors are Anthropic's error JSON.

use std::sync::Arc;

use async_stream::stream;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use sluice_flow::QueueError;
use tokio::time::Instant;

use crate::auth::Caller;
use crate::relay::{Frame, Frames};
use crate::stream::{Ending, Terminal};

use super::chat::{chat_request, json_object, start_stream};
use super::sse::sse_response;
use super::{ApiError, AppState};

/// The recorded request's marker: this stream was asked for in Anthropic's shape.
pub(super) const MARKER: &str = "sluice_api";

/// Anthropic's error JSON for a status and message.
pub(super) fn error_body(status: StatusCode, message: &str) -> Value {
    let kind = match status.as_u16() {
        400 | 405 | 408 | 415 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    };
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

fn anthropic_error(e: ApiError) -> Response {
    let mut response = (e.status, Json(error_body(e.status, &e.message))).into_response();
    if let Some(id) = &e.stream_id {
        if let Ok(v) = axum::http::HeaderValue::from_str(id) {
            response.headers_mut().insert(super::STREAM_ID_HEADER, v);
        }
    }
    response
}

/// Re-shapes an OpenAI-shaped error response (a limit's `429`) as Anthropic's.
async fn reshape(response: Response) -> Response {
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let message = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| "the request was refused".into());
    (status, Json(error_body(status, &message))).into_response()
}

fn text_of(content: &Value) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => Ok(blocks
            .iter()
            .filter(|b| b["type"] == "text")
            .filter_map(|b| b["text"].as_str())
            .collect()),
        _ => Err(ApiError::bad_request(
            "content",
            "must be a string or a list of blocks",
        )),
    }
}

/// The chat request for a Messages request.
fn chat_body(body: &Map<String, Value>) -> Result<Value, ApiError> {
    let mut messages = Vec::new();
    if let Some(system) = body.get("system").filter(|s| !s.is_null()) {
        messages.push(json!({"role": "system", "content": text_of(system)?}));
    }
    let given = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::bad_request("messages", "`messages` must be a list"))?;
    for (i, m) in given.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or("");
        if role != "user" && role != "assistant" {
            return Err(ApiError::bad_request(
                format!("messages[{i}].role"),
                "must be user or assistant",
            ));
        }
        let blocks = match &m["content"] {
            Value::String(s) => vec![json!({"type": "text", "text": s})],
            Value::Array(b) => b.clone(),
            _ => {
                return Err(ApiError::bad_request(
                    format!("messages[{i}].content"),
                    "must be a string or a list of blocks",
                ))
            }
        };
        let mut text = String::new();
        let mut calls = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            match b["type"].as_str().unwrap_or("") {
                "text" => text.push_str(b["text"].as_str().unwrap_or("")),
                "tool_use" => calls.push(json!({"id": b["id"], "type": "function", "function": {
                    "name": b["name"], "arguments": b.get("input").cloned().unwrap_or_else(|| json!({})).to_string()}})),
                "tool_result" => messages.push(json!({"role": "tool", "tool_call_id": b["tool_use_id"],
                    "content": text_of(b.get("content").unwrap_or(&Value::Null)).unwrap_or_default()})),
                other => {
                    return Err(ApiError::bad_request(
                        format!("messages[{i}].content[{j}]"),
                        format!("blocks of type {other:?} are not supported"),
                    ))
                }
            }
        }
        if !text.is_empty() || !calls.is_empty() {
            let mut msg = json!({"role": role, "content": text});
            if !calls.is_empty() {
                msg["tool_calls"] = Value::Array(calls);
            }
            messages.push(msg);
        }
    }
    let mut chat = crate::api::chat::chat_base(body, messages);
    if let Some(n) = body.get("max_tokens") {
        chat.insert("max_tokens".into(), n.clone());
    }
    if let Some(stop) = body.get("stop_sequences").filter(|s| !s.is_null()) {
        chat.insert("stop".into(), stop.clone());
    }
    for key in ["temperature", "top_p", "sim", "sluice"] {
        if let Some(v) = body.get(key).filter(|v| !v.is_null()) {
            chat.insert(key.into(), v.clone());
        }
    }
    if let Some(Value::Array(tools)) = body.get("tools") {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| json!({"type": "function", "function": {"name": t["name"],
                "description": t.get("description").cloned().unwrap_or(Value::Null),
                "parameters": t.get("input_schema").cloned().unwrap_or_else(|| json!({"type": "object"}))}}))
            .collect();
        chat.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = body.get("tool_choice") {
        let c = match choice["type"].as_str() {
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => json!({"type": "function", "function": {"name": choice["name"]}}),
            _ => json!("auto"),
        };
        chat.insert("tool_choice".into(), c);
    }
    Ok(Value::Object(chat))
}

/// `POST /v1/messages`.
pub(super) async fn messages(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match answer(state, caller, headers, body).await {
        Ok(response) => response,
        Err(e) => anthropic_error(e),
    }
}

async fn answer(
    state: AppState,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let mut body = json_object(&state, &headers, body).await?;
    let chat = chat_request(chat_body(&body)?)?;
    let streaming = body.get("stream").and_then(Value::as_bool) == Some(true);
    body.insert(MARKER.into(), json!("anthropic"));
    let id: Arc<str> = Arc::from(crate::stream::new_stream_id());
    let (mut frames, model) = match start_stream(
        &state,
        &caller,
        chat,
        Value::Object(body).to_string(),
        id.clone(),
        started,
    )
    .await?
    {
        Ok(started) => started,
        Err(refusal) => return Ok(reshape(refusal).await),
    };
    let message_id = format!("msg_{}", id.replace('-', ""));
    if streaming {
        // Commit to 200 only once the first frame is here, as chat does.
        let first = frames.recv().await;
        if let Some(Err(QueueError::Failed(t))) = &first {
            return Err(ApiError::for_ending(&t.ending, id));
        }
        let events = events(message_id, model, first, frames);
        return Ok(sse_response(Body::from_stream(events), &id));
    }
    let mut m = Message::new(message_id, model);
    loop {
        match frames.recv().await {
            Some(Ok(Frame::Chunk(c))) => {
                m.chunk(&c.data);
            }
            Some(Ok(Frame::KeepAlive)) => {}
            Some(Err(QueueError::Failed(t))) => return Err(ApiError::for_ending(&t.ending, id)),
            Some(Err(QueueError::Abandoned)) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "api_error",
                    "the relay stopped before the message ended",
                ))
            }
            None => break,
        }
    }
    let mut response = Json(m.json()).into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        response.headers_mut().insert(super::STREAM_ID_HEADER, v);
    }
    Ok(response)
}

/// A message being assembled from chunks: its blocks, stop reason and usage.
pub(super) struct Message {
    id: String,
    model: String,
    blocks: Vec<Value>,
    stop_reason: Option<&'static str>,
    input_tokens: u64,
    output_tokens: u64,
}

impl Message {
    pub(super) fn new(id: String, model: String) -> Self {
        Self {
            id,
            model,
            blocks: Vec::new(),
            stop_reason: None,
            input_tokens: 0,
            output_tokens: 0,
        }
    }

    /// Notes one chunk; returns the Anthropic events it makes.
    pub(super) fn chunk(&mut self, data: &str) -> Vec<(&'static str, Value)> {
        let Ok(c) = serde_json::from_str::<Value>(data) else {
            return vec![];
        };
        let mut out = Vec::new();
        let delta = &c["choices"][0]["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            if self.blocks.last().is_none_or(|b| b["type"] != "text") {
                out.extend(self.close());
                self.blocks.push(json!({"type": "text", "text": ""}));
                out.push((
                    "content_block_start",
                    json!({"type": "content_block_start", "index": self.blocks.len() - 1,
                    "content_block": {"type": "text", "text": ""}}),
                ));
            }
            let i = self.blocks.len() - 1;
            let so_far = self.blocks[i]["text"].as_str().unwrap_or("").to_string();
            self.blocks[i]["text"] = json!(so_far + text);
            out.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": i,
                "delta": {"type": "text_delta", "text": text}}),
            ));
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            if let Some(call_id) = call["id"].as_str() {
                out.extend(self.close());
                self.blocks.push(json!({"type": "tool_use", "id": call_id, "name": call["function"]["name"], "input": {}, "partial": ""}));
                out.push(("content_block_start", json!({"type": "content_block_start", "index": self.blocks.len() - 1,
                    "content_block": {"type": "tool_use", "id": call_id, "name": call["function"]["name"], "input": {}}})));
            }
            if let Some(piece) = call["function"]["arguments"]
                .as_str()
                .filter(|p| !p.is_empty())
            {
                if let Some(i) = self.blocks.iter().rposition(|b| b["type"] == "tool_use") {
                    let so_far = self.blocks[i]["partial"].as_str().unwrap_or("").to_string();
                    self.blocks[i]["partial"] = json!(so_far + piece);
                    out.push((
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": i,
                        "delta": {"type": "input_json_delta", "partial_json": piece}}),
                    ));
                }
            }
        }
        if let Some(reason) = c["choices"][0]["finish_reason"].as_str() {
            self.stop_reason = Some(match reason {
                "length" => "max_tokens",
                "tool_calls" => "tool_use",
                _ => "end_turn",
            });
        }
        if let Some(u) = c.get("usage").filter(|u| u.is_object()) {
            self.input_tokens = u["prompt_tokens"].as_u64().unwrap_or(self.input_tokens);
            self.output_tokens = u["completion_tokens"]
                .as_u64()
                .unwrap_or(self.output_tokens);
        }
        out
    }

    /// Ends the open block, if any.
    fn close(&mut self) -> Option<(&'static str, Value)> {
        let i = self.blocks.len().checked_sub(1)?;
        if self.blocks[i].get("closed").is_some() {
            return None;
        }
        self.blocks[i]["closed"] = json!(true);
        Some((
            "content_block_stop",
            json!({"type": "content_block_stop", "index": i}),
        ))
    }

    fn start(&self) -> Value {
        json!({"type": "message_start", "message": {"id": self.id, "type": "message", "role": "assistant",
            "model": self.model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 0, "output_tokens": 0}}})
    }

    fn usage(&self) -> Value {
        json!({"input_tokens": self.input_tokens, "output_tokens": self.output_tokens})
    }

    /// The whole message.
    pub(super) fn json(&self) -> Value {
        let content: Vec<Value> = self
            .blocks
            .iter()
            .map(|b| match b["type"].as_str() {
                Some("tool_use") => json!({"type": "tool_use", "id": b["id"], "name": b["name"],
                    "input": serde_json::from_str::<Value>(b["partial"].as_str().unwrap_or("{}")).unwrap_or_else(|_| json!({}))}),
                _ => json!({"type": "text", "text": b["text"]}),
            })
            .collect();
        json!({"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
               "stop_reason": self.stop_reason.unwrap_or("end_turn"), "stop_sequence": null, "usage": self.usage()})
    }

    /// The events that end the message: the open block's end, the stop reason and usage, the stop.
    pub(super) fn end(&mut self) -> Vec<(&'static str, Value)> {
        let mut out: Vec<_> = self.close().into_iter().collect();
        out.push((
            "message_delta",
            json!({"type": "message_delta",
            "delta": {"stop_reason": self.stop_reason.unwrap_or("end_turn"), "stop_sequence": null},
            "usage": {"output_tokens": self.output_tokens}}),
        ));
        out.push(("message_stop", json!({"type": "message_stop"})));
        out
    }
}

/// The `error` event that ends a stream that ended abnormally.
pub(super) fn error_event(t: &Terminal) -> (&'static str, Value) {
    let detail = t.ending.detail().unwrap_or("the stream failed");
    let kind = if detail.contains("overloaded_error") {
        "overloaded_error"
    } else {
        "api_error"
    };
    let message = match t.ending.reason() {
        Some(r) => format!("{} ({}): {detail}", t.ending.status().as_str(), r.as_str()),
        None => detail.to_string(),
    };
    (
        "error",
        json!({"type": "error", "error": {"type": kind, "message": message}}),
    )
}

pub(super) fn sse((kind, data): &(&'static str, Value)) -> String {
    format!("event: {kind}\ndata: {data}\n\n")
}

/// A stream asked for in Anthropic's shape, replayed in it (`/v1/streams/{id}/events`): from the
/// start, `message_start` first; each chunk's events carry the chunk's event id, so
/// `Last-Event-ID` resumes after it.
pub(super) fn replay(
    id: String,
    from_start: bool,
    followed: impl futures_util::Stream<Item = Result<crate::follow::Followed, crate::store::StoreError>>
        + Send
        + 'static,
) -> impl futures_util::Stream<Item = Result<String, std::io::Error>> {
    stream! {
        let mut m = Message::new(format!("msg_{}", id.replace('-', "")), String::new());
        if from_start {
            yield Ok(sse(&("message_start", m.start())));
        }
        futures_util::pin_mut!(followed);
        while let Some(item) = futures_util::StreamExt::next(&mut followed).await {
            match item {
                Ok(crate::follow::Followed::Chunk { seq, data }) => {
                    for e in m.chunk(&data) {
                        yield Ok(format!("id: {seq}\n{}", sse(&e)));
                    }
                }
                Ok(crate::follow::Followed::End(t)) => {
                    let events = match t.ending {
                        Ending::Completed => m.end(),
                        _ => vec![error_event(&t)],
                    };
                    for e in events {
                        yield Ok(format!("id: {}\n{}", t.seq, sse(&e)));
                    }
                    return;
                }
                Err(e) => {
                    yield Err(std::io::Error::other(e.report()));
                    return;
                }
            }
        }
    }
}

fn events(
    id: String,
    model: String,
    first: Option<Result<Frame, QueueError<Terminal>>>,
    mut frames: Frames,
) -> impl futures_util::Stream<Item = Result<String, std::convert::Infallible>> {
    stream! {
        let mut m = Message::new(id, model);
        yield Ok(sse(&("message_start", m.start())));
        let mut next = Some(first);
        loop {
            let item = match next.take() {
                Some(item) => item,
                None => frames.recv().await,
            };
            match item {
                Some(Ok(Frame::Chunk(c))) => {
                    // Only what is in the transcript reaches the client.
                    if let Some(committed) = &c.committed {
                        committed.reached(c.seq).await;
                        if !committed.is_stored(c.seq) {
                            continue;
                        }
                    }
                    for e in m.chunk(&c.data) {
                        yield Ok(sse(&e));
                    }
                }
                Some(Ok(Frame::KeepAlive)) => yield Ok(sse(&("ping", json!({"type": "ping"})))),
                Some(Err(QueueError::Failed(t))) => {
                    yield Ok(sse(&error_event(&t)));
                    return;
                }
                Some(Err(QueueError::Abandoned)) => {
                    yield Ok(sse(&error_event(&Terminal { seq: 0, ending: Ending::abnormal(crate::stream::Reason::Shutdown, "the relay stopped before the message ended") })));
                    return;
                }
                None => {
                    for e in m.end() {
                        yield Ok(sse(&e));
                    }
                    return;
                }
            }
        }
    }
}
