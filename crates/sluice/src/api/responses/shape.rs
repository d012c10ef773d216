//! The Responses API's shapes: a request turned into a chat request, a stream turned into a
//! Response object, and a stream's chunks turned into Responses events with deterministic
//! sequence numbers (so a replay from the store numbers them as the live stream did).
//!
//! Sequence numbers: `response.created` 0, `response.in_progress` 1, `response.output_item.added`
//! 2, `response.content_part.added` 3; the chunk with event id `k` is
//! `response.output_text.delta` number `3 + k` (a chunk with no text has none: numbers may skip);
//! the ending, whose event id is `T`, is numbered from `3 + T`.

use serde_json::{json, Map, Value};

use crate::api::ApiError;
use crate::stream::{Reason, Status};

/// Events before the first chunk.
pub(super) const PREFIX: u64 = 3;

/// What a Response object is made of, whatever its source (a live stream or the store).
#[derive(Debug, Clone)]
pub(super) struct Meta {
    pub(super) id: String,
    pub(super) created_at: i64,
    pub(super) model: String,
    /// The request as recorded (the client's Responses body).
    pub(super) request: Value,
}

/// How a response stands.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct State {
    pub(super) status: Status,
    pub(super) reason: Option<Reason>,
    pub(super) detail: Option<String>,
    /// The upstream's finish reason (`length`: the answer hit `max_output_tokens`).
    pub(super) finish_reason: Option<String>,
    pub(super) usage: Option<Value>,
}

impl State {
    /// A response still running.
    pub(super) fn running() -> Self {
        Self {
            status: Status::Streaming,
            reason: None,
            detail: None,
            finish_reason: None,
            usage: None,
        }
    }

    /// The Responses status, and the event that ends its stream.
    fn status(&self) -> (&'static str, &'static str) {
        match self.status {
            Status::Streaming => ("in_progress", "response.in_progress"),
            Status::Completed if self.finish_reason.as_deref() == Some("length") => {
                ("incomplete", "response.incomplete")
            }
            Status::Completed => ("completed", "response.completed"),
            Status::Cancelled => ("cancelled", "response.incomplete"),
            Status::TimedOut => ("incomplete", "response.incomplete"),
            Status::Failed | Status::Interrupted => ("failed", "response.failed"),
        }
    }
}

fn text_of(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
        ),
        _ => None,
    }
}

/// The conversation a request's `input` adds, as chat messages.
pub(super) fn input_messages(input: &Value) -> Result<Vec<Value>, ApiError> {
    match input {
        Value::String(s) => Ok(vec![json!({"role": "user", "content": s})]),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
                let role = item.get("role").and_then(Value::as_str);
                match (kind, role) {
                    ("message", Some(role @ ("user" | "assistant" | "system" | "developer"))) => {
                        let text = item.get("content").and_then(text_of).ok_or_else(|| {
                            ApiError::bad_request(
                                format!("input[{i}].content"),
                                "must be a string or a list of text parts",
                            )
                        })?;
                        let role = if role == "developer" { "system" } else { role };
                        Ok(json!({"role": role, "content": text}))
                    }
                    _ => Err(ApiError::bad_request(
                        format!("input[{i}]"),
                        "only message items (role user, assistant, system or developer) are supported",
                    )),
                }
            })
            .collect(),
        _ => Err(ApiError::bad_request(
            "input",
            "`input` must be a string or a list of input items",
        )),
    }
}

/// The chat request for a Responses request: `instructions` first, then the previous response's
/// conversation, then this `input`. Returns it and the conversation to record (without the
/// instructions, which a follow-up does not inherit).
pub(super) fn chat_body(
    body: &Map<String, Value>,
    previous: Vec<Value>,
) -> Result<(Value, Vec<Value>), ApiError> {
    let input = body
        .get("input")
        .ok_or_else(|| ApiError::bad_request("input", "`input` is required"))?;
    let mut conversation = previous;
    conversation.extend(input_messages(input)?);
    let mut messages = Vec::new();
    match body.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(_) => {
            return Err(ApiError::bad_request(
                "instructions",
                "`instructions` must be a string",
            ))
        }
    }
    messages.extend(conversation.iter().cloned());
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
    if let Some(n) = body.get("max_output_tokens").filter(|v| !v.is_null()) {
        chat.insert("max_tokens".into(), n.clone());
    }
    for key in ["temperature", "top_p", "sim"] {
        if let Some(v) = body.get(key).filter(|v| !v.is_null()) {
            chat.insert(key.into(), v.clone());
        }
    }
    let mut sluice = body
        .get("sluice")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if body.get("background").and_then(Value::as_bool) == Some(true) {
        // A background response runs on when its client leaves (within its total deadline).
        sluice.insert("on_disconnect".into(), json!("continue"));
    }
    if !sluice.is_empty() {
        chat.insert("sluice".into(), Value::Object(sluice));
    }
    Ok((Value::Object(chat), conversation))
}

fn message_item(meta: &Meta, text: &str, status: &str) -> Value {
    json!({
        "id": item_id(meta),
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    })
}

fn item_id(meta: &Meta) -> String {
    format!("msg_{}", meta.id.trim_start_matches("resp_"))
}

/// Chat usage (`prompt_tokens`, `completion_tokens`) as Responses usage.
fn usage(usage: Option<&Value>) -> Value {
    let Some(u) = usage else { return Value::Null };
    let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
    let (input, output) = (n("prompt_tokens"), n("completion_tokens"));
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input + output,
    })
}

/// The Response object.
pub(super) fn response(meta: &Meta, state: &State, text: &str) -> Value {
    let (status, _) = state.status();
    let field = |k: &str| meta.request.get(k).cloned().unwrap_or(Value::Null);
    let output = if state.status == Status::Streaming && text.is_empty() {
        vec![]
    } else {
        let item_status = match status {
            "completed" => "completed",
            "in_progress" => "in_progress",
            _ => "incomplete",
        };
        vec![message_item(meta, text, item_status)]
    };
    let error = match status {
        "failed" => json!({
            "code": "server_error",
            "message": state.detail.clone().unwrap_or_else(|| "the response failed".into()),
        }),
        _ => Value::Null,
    };
    let incomplete = match (status, state.finish_reason.as_deref()) {
        ("incomplete", Some("length")) => json!({"reason": "max_output_tokens"}),
        ("incomplete", _) => json!({"reason": null}),
        _ => Value::Null,
    };
    json!({
        "id": meta.id,
        "object": "response",
        "created_at": meta.created_at,
        "status": status,
        "background": field("background").as_bool().unwrap_or(false),
        "model": meta.model,
        "output": output,
        "instructions": field("instructions"),
        "metadata": meta.request.get("metadata").filter(|m| m.is_object()).cloned().unwrap_or_else(|| json!({})),
        "temperature": field("temperature"),
        "top_p": field("top_p"),
        "max_output_tokens": field("max_output_tokens"),
        "previous_response_id": field("previous_response_id"),
        "parallel_tool_calls": false,
        "tool_choice": "auto",
        "tools": [],
        "store": true,
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "usage": usage(state.usage.as_ref()),
        "error": error,
        "incomplete_details": incomplete,
        // How sluice recorded it: the stream's own status and reason (a timer, a cancel).
        "sluice": {"status": state.status, "reason": state.reason, "detail": state.detail},
    })
}

/// One event: its sequence number and JSON.
pub(super) type Event = (u64, Value);

/// The events before the first chunk.
pub(super) fn prefix(meta: &Meta) -> Vec<Event> {
    let running = response(meta, &State::running(), "");
    let item = message_item(meta, "", "in_progress");
    let mut item_added = item.clone();
    item_added["content"] = json!([]);
    vec![
        (
            0,
            json!({"type": "response.created", "sequence_number": 0, "response": running}),
        ),
        (
            1,
            json!({"type": "response.in_progress", "sequence_number": 1, "response": running}),
        ),
        (
            2,
            json!({"type": "response.output_item.added", "sequence_number": 2, "output_index": 0, "item": item_added}),
        ),
        (
            3,
            json!({"type": "response.content_part.added", "sequence_number": 3, "item_id": item_id(meta), "output_index": 0, "content_index": 0,
                   "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
        ),
    ]
}

/// The event of chunk `seq` adding `text` (none for a chunk with no text).
pub(super) fn delta(meta: &Meta, seq: u64, text: &str) -> Option<Event> {
    (!text.is_empty()).then(|| {
        let n = PREFIX + seq;
        (
            n,
            json!({"type": "response.output_text.delta", "sequence_number": n, "item_id": item_id(meta),
                   "output_index": 0, "content_index": 0, "delta": text, "logprobs": []}),
        )
    })
}

/// The events that end a response whose ending has event id `terminal`, with all its text.
pub(super) fn suffix(meta: &Meta, terminal: u64, state: &State, text: &str) -> Vec<Event> {
    let (status, last) = state.status();
    let n = PREFIX + terminal;
    let item_status = if status == "completed" {
        "completed"
    } else {
        "incomplete"
    };
    let part = json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
    vec![
        (
            n,
            json!({"type": "response.output_text.done", "sequence_number": n, "item_id": item_id(meta),
                   "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
        ),
        (
            n + 1,
            json!({"type": "response.content_part.done", "sequence_number": n + 1, "item_id": item_id(meta),
                       "output_index": 0, "content_index": 0, "part": part}),
        ),
        (
            n + 2,
            json!({"type": "response.output_item.done", "sequence_number": n + 2, "output_index": 0,
                       "item": message_item(meta, text, item_status)}),
        ),
        (
            n + 3,
            json!({"type": last, "sequence_number": n + 3, "response": response(meta, state, text)}),
        ),
    ]
}

/// An event as SSE: its type, its sequence number as the event id, its JSON.
pub(super) fn sse((n, event): &Event) -> String {
    let kind = event
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    format!("event: {kind}\nid: {n}\ndata: {event}\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Meta {
        Meta {
            id: "resp_abc".into(),
            created_at: 1,
            model: "sim".into(),
            request: json!({"model": "sim", "input": "hi", "metadata": {"k": "v"}}),
        }
    }

    #[test]
    fn requests_become_chat_with_instructions_first_and_history_before_input() {
        let body = json!({"model": "sim", "instructions": "be brief", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]}
        ], "max_output_tokens": 5, "background": true, "stream": true});
        let previous = vec![
            json!({"role": "user", "content": "q"}),
            json!({"role": "assistant", "content": "r"}),
        ];
        let (chat, conversation) = chat_body(body.as_object().unwrap(), previous).unwrap();
        assert_eq!(
            chat["messages"][0],
            json!({"role": "system", "content": "be brief"})
        );
        assert_eq!(chat["messages"][1]["content"], "q");
        assert_eq!(
            chat["messages"][3],
            json!({"role": "user", "content": "ab"})
        );
        assert_eq!(conversation.len(), 3, "instructions are not inherited");
        assert_eq!(chat["max_tokens"], 5);
        assert_eq!(chat["stream"], true);
        assert_eq!(chat["sluice"]["on_disconnect"], "continue");
        let bad = json!({"model": "sim", "input": [{"type": "function_call_output"}]});
        assert_eq!(
            chat_body(bad.as_object().unwrap(), vec![])
                .err()
                .and_then(|e| e.param),
            Some("input[0]".into())
        );
    }

    #[test]
    fn events_are_numbered_from_the_chunks_event_ids() {
        let m = meta();
        let p = prefix(&m);
        assert_eq!(p.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(delta(&m, 1, "He").map(|e| e.0), Some(4));
        assert!(
            delta(&m, 2, "").is_none(),
            "no event for a chunk without text"
        );
        let done = State {
            status: Status::Completed,
            reason: None,
            detail: None,
            finish_reason: Some("stop".into()),
            usage: Some(json!({"prompt_tokens": 1, "completion_tokens": 2})),
        };
        let s = suffix(&m, 3, &done, "Hello");
        assert_eq!(s.iter().map(|e| e.0).collect::<Vec<_>>(), [6, 7, 8, 9]);
        assert_eq!(s[3].1["type"], "response.completed");
        assert_eq!(s[3].1["response"]["usage"]["total_tokens"], 3);
        assert_eq!(
            s[3].1["response"]["output"][0]["content"][0]["text"],
            "Hello"
        );
        let timed_out = State {
            status: Status::TimedOut,
            reason: Some(Reason::Idle),
            ..done.clone()
        };
        let t = suffix(&m, 3, &timed_out, "He");
        assert_eq!(t[3].1["type"], "response.incomplete");
        assert_eq!(t[3].1["response"]["sluice"]["reason"], "idle");
        let capped = State {
            finish_reason: Some("length".into()),
            ..done
        };
        assert_eq!(
            response(&m, &capped, "x")["incomplete_details"]["reason"],
            "max_output_tokens"
        );
    }
}
