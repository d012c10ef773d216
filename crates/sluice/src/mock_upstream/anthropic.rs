//! The mock upstream's Anthropic dialect: `POST /v1/messages` answers with Anthropic's event
//! stream, made from the same simulated steps (and the same `"sim"` staging) as the OpenAI
//! dialect: `message_start`, a text block (a `ping` whenever the next step is 100 ms late), a `tool_use` block
//! when `sim.tool_call` is set, `message_delta` with the stop reason and usage, `message_stop`.
//! `fail_after` sends an `error` event (`overloaded_error`); `http_status` answers Anthropic's
//! error JSON (`529`: `overloaded_error`).

use std::sync::atomic::Ordering;

use async_stream::stream;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::{json, Map, Value};

use super::{event_stream, Mock, Watch};
use crate::upstream::sim::{self, SimStep};

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"type": "error", "error": {"type": kind, "message": message}})),
    )
        .into_response()
}

/// How long the mock waits for the next step before it sends a `ping`.
const PING_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

fn event(kind: &str, data: &Value) -> String {
    format!("event: {kind}\ndata: {data}\n\n")
}

/// `POST /v1/messages`.
pub(super) async fn messages(State(mock): State<Mock>, body: Bytes) -> Response {
    mock.stats.started.fetch_add(1, Ordering::SeqCst);
    let refuse = |message: String| {
        mock.stats.completed.fetch_add(1, Ordering::SeqCst);
        error(StatusCode::BAD_REQUEST, "invalid_request_error", &message)
    };
    let body: Map<String, Value> = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return refuse(format!("invalid JSON: {e}")),
    };
    let params = match sim::params(&body) {
        Ok(p) => mock.options.defaults.faults_into(p),
        Err(e) => return refuse(format!("invalid sim field: {e}")),
    };
    if let Some(status) = params.http_status {
        mock.stats.completed.fetch_add(1, Ordering::SeqCst);
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let kind = match status.as_u16() {
            529 => "overloaded_error",
            429 => "rate_limit_error",
            400 => "invalid_request_error",
            _ => "api_error",
        };
        return error(status, kind, &format!("simulated HTTP {}", status.as_u16()));
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("claude-sim")
        .to_string();
    let tool = body
        .get("tools")
        .and_then(|t| t[0]["name"].as_str())
        .map(str::to_string);
    let input_tokens = sim::usage(&body, 0)["prompt_tokens"].as_u64().unwrap_or(0);
    let id = format!("msg_mock_{}", uuid::Uuid::new_v4().simple());
    let steps = sim::steps(mock.options.defaults, params, 0);
    let events = stream! {
        let mut watch = Watch { stats: mock.stats.clone(), done: false };
        yield Ok::<_, std::io::Error>(Bytes::from(event("message_start", &json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": input_tokens, "output_tokens": 0}}}))));
        yield Ok(Bytes::from(event("content_block_start", &json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}))));
        let mut count = 0u64;
        futures_util::pin_mut!(steps);
        loop {
            // While a step is late (a slow token, a stall), a ping every so often, as Anthropic
            // sends them: it is not a token, and must never look like progress.
            let step = tokio::select! {
                step = steps.next() => step,
                () = tokio::time::sleep(PING_EVERY) => {
                    yield Ok(Bytes::from(event("ping", &json!({"type": "ping"}))));
                    continue;
                }
            };
            let Some(step) = step else { break };
            match step {
                SimStep::Token(text) => {
                    count += 1;
                    yield Ok(Bytes::from(event("content_block_delta", &json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": text}}))));
                }
                SimStep::Fail => {
                    watch.done = true;
                    yield Ok(Bytes::from(event("error", &json!({"type": "error",
                        "error": {"type": "overloaded_error", "message": "Overloaded"}}))));
                    return;
                }
                SimStep::Garbage => {
                    watch.done = true;
                    yield Ok(Bytes::from_static(b"event: content_block_delta\ndata: {not json\n\n"));
                    return;
                }
                SimStep::Drop => {
                    watch.done = true;
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    yield Err(std::io::Error::other("simulated connection drop (drop_after)"));
                    return;
                }
                SimStep::Finish => {
                    yield Ok(Bytes::from(event("content_block_stop", &json!({"type": "content_block_stop", "index": 0}))));
                    let mut stop = "end_turn";
                    if let (Some(true), Some(name)) = (params.tool_call, &tool) {
                        stop = "tool_use";
                        yield Ok(Bytes::from(event("content_block_start", &json!({"type": "content_block_start", "index": 1,
                            "content_block": {"type": "tool_use", "id": format!("toolu_{}", uuid::Uuid::new_v4().simple()), "name": name, "input": {}}}))));
                        for piece in ["{\"query\":", "\"sluice\"", "}"] {
                            yield Ok(Bytes::from(event("content_block_delta", &json!({"type": "content_block_delta", "index": 1,
                                "delta": {"type": "input_json_delta", "partial_json": piece}}))));
                        }
                        yield Ok(Bytes::from(event("content_block_stop", &json!({"type": "content_block_stop", "index": 1}))));
                    }
                    yield Ok(Bytes::from(event("message_delta", &json!({"type": "message_delta",
                        "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": {"output_tokens": count}}))));
                    yield Ok(Bytes::from(event("message_stop", &json!({"type": "message_stop"}))));
                    watch.done = true;
                    return;
                }
            }
        }
    };
    event_stream(events)
}
