//! The Responses API's shapes: a request turned into a chat request, a stream turned into a
//! Response object, and a stream's chunks turned into Responses events with deterministic
//! sequence numbers (so a replay from the store numbers them as the live stream did).
//!
//! Sequence numbers: `response.created` 0, `response.in_progress` 1, `response.output_item.added`
//! 2, `response.content_part.added` 3. The chunk with event id `k` owns numbers `4k` to `4k + 3`:
//! its `response.output_text.delta` is `4k`; a tool call it starts is announced
//! (`response.output_item.added`) at `4k + 1` and its arguments' piece
//! (`response.function_call_arguments.delta`) is `4k + 2`. A chunk with none of these has no
//! event, so numbers skip. The ending, whose event id is `T`, is numbered from `4T`.

use serde_json::{json, Map, Value};

use crate::api::ApiError;
use crate::stream::{Reason, Status};

/// Numbers each chunk owns.
const SLOTS: u64 = 4;

/// The chunk to replay after so that every event numbered above `n` is sent (the caller still
/// filters out those at or below `n`).
pub(super) fn chunk_after(n: u64) -> u64 {
    n.saturating_sub(SLOTS) / SLOTS
}

/// One function call the model made.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Call {
    pub(super) index: u64,
    pub(super) call_id: String,
    pub(super) name: String,
    pub(super) arguments: String,
}

/// What one chunk says of a tool call.
struct CallPiece {
    index: u64,
    /// The call's id and the function's name, if this chunk starts the call.
    start: Option<(String, String)>,
    /// A piece of its arguments.
    args: String,
}

/// The text and the tool-call pieces of one chunk's JSON.
struct Piece {
    text: String,
    calls: Vec<CallPiece>,
    finish_reason: Option<String>,
}

fn piece(data: &Value) -> Piece {
    let choice = &data["choices"][0];
    let delta = &choice["delta"];
    let calls = delta["tool_calls"]
        .as_array()
        .map(|calls| {
            calls
                .iter()
                .map(|c| {
                    let start = c["id"].as_str().map(|id| {
                        (
                            id.to_string(),
                            c["function"]["name"].as_str().unwrap_or("").to_string(),
                        )
                    });
                    CallPiece {
                        index: c["index"].as_u64().unwrap_or(0),
                        start,
                        args: c["function"]["arguments"]
                            .as_str()
                            .unwrap_or("")
                            .to_string(),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    Piece {
        text: delta["content"].as_str().unwrap_or("").to_string(),
        calls,
        finish_reason: choice["finish_reason"].as_str().map(str::to_string),
    }
}

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
    /// The function calls it made.
    pub(super) calls: Vec<Call>,
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
            calls: Vec::new(),
        }
    }

    /// Notes what chunk `data` adds: its finish reason, usage and tool calls.
    pub(super) fn note(&mut self, data: &Value) {
        let p = piece(data);
        if p.finish_reason.is_some() {
            self.finish_reason = p.finish_reason;
        }
        if let Some(u) = data.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(u.clone());
        }
        for CallPiece { index, start, args } in p.calls {
            if let Some((call_id, name)) = start {
                self.calls.push(Call {
                    index,
                    call_id,
                    name,
                    arguments: String::new(),
                });
            }
            if let Some(call) = self.calls.iter_mut().rev().find(|c| c.index == index) {
                call.arguments.push_str(&args);
            }
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
                    ("function_call", _) => Ok(json!({"role": "assistant", "content": null, "tool_calls": [{
                        "id": item.get("call_id").cloned().unwrap_or(Value::Null),
                        "type": "function",
                        "function": {"name": item.get("name").cloned().unwrap_or(Value::Null),
                                     "arguments": item.get("arguments").cloned().unwrap_or(json!("{}"))},
                    }]})),
                    ("function_call_output", _) => Ok(json!({"role": "tool",
                        "tool_call_id": item.get("call_id").cloned().unwrap_or(Value::Null),
                        "content": item.get("output").cloned().unwrap_or(json!(""))})),
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
                        "only message, function_call and function_call_output items are supported",
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
    let mut chat = crate::api::chat::chat_base(body, messages);
    if let Some(n) = body.get("max_output_tokens").filter(|v| !v.is_null()) {
        chat.insert("max_tokens".into(), n.clone());
    }
    if let Some(Value::Array(tools)) = body.get("tools") {
        // Responses' function tools are flat; chat's nest the function.
        let tools: Vec<Value> = tools
            .iter()
            .filter(|t| t["type"] == "function")
            .map(|t| {
                let mut function = t.as_object().cloned().unwrap_or_default();
                function.remove("type");
                json!({"type": "function", "function": function})
            })
            .collect();
        if !tools.is_empty() {
            chat.insert("tools".into(), Value::Array(tools));
        }
    }
    match body.get("tool_choice") {
        Some(Value::String(c)) => {
            chat.insert("tool_choice".into(), json!(c));
        }
        Some(Value::Object(c)) if c.get("type").and_then(Value::as_str) == Some("function") => {
            chat.insert(
                "tool_choice".into(),
                json!({"type": "function", "function": {"name": c.get("name").cloned().unwrap_or(Value::Null)}}),
            );
        }
        _ => {}
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

fn call_item_id(meta: &Meta, index: u64) -> String {
    format!("fc_{}_{index}", meta.id.trim_start_matches("resp_"))
}

fn call_item(meta: &Meta, call: &Call, arguments: &str, status: &str) -> Value {
    json!({
        "id": call_item_id(meta, call.index),
        "type": "function_call",
        "call_id": call.call_id,
        "name": call.name,
        "arguments": arguments,
        "status": status,
    })
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
        let mut output = vec![message_item(meta, text, item_status)];
        let call_status = if status == "in_progress" {
            "in_progress"
        } else {
            "completed"
        };
        output.extend(
            state
                .calls
                .iter()
                .map(|c| call_item(meta, c, &c.arguments, call_status)),
        );
        output
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

/// The events of chunk `seq` (its JSON `data`): its text, and the tool calls it starts or adds
/// arguments to.
pub(super) fn chunk_events(meta: &Meta, seq: u64, data: &Value) -> Vec<Event> {
    let p = piece(data);
    let base = SLOTS * seq;
    let mut out = Vec::new();
    if !p.text.is_empty() {
        out.push((
            base,
            json!({"type": "response.output_text.delta", "sequence_number": base, "item_id": item_id(meta),
                   "output_index": 0, "content_index": 0, "delta": p.text, "logprobs": []}),
        ));
    }
    // One call per chunk is what upstreams send; the numbering leaves room for one.
    if let Some(CallPiece { index, start, args }) = p.calls.into_iter().next() {
        let output_index = 1 + index;
        if let Some((call_id, name)) = start {
            let call = Call {
                index,
                call_id,
                name,
                arguments: String::new(),
            };
            out.push((
                base + 1,
                json!({"type": "response.output_item.added", "sequence_number": base + 1,
                       "output_index": output_index, "item": call_item(meta, &call, "", "in_progress")}),
            ));
        }
        if !args.is_empty() {
            out.push((
                base + 2,
                json!({"type": "response.function_call_arguments.delta", "sequence_number": base + 2,
                       "item_id": call_item_id(meta, index), "output_index": output_index, "delta": args}),
            ));
        }
    }
    out
}

/// The events that end a response whose ending has event id `terminal`, with all its text.
pub(super) fn suffix(meta: &Meta, terminal: u64, state: &State, text: &str) -> Vec<Event> {
    let (status, last) = state.status();
    let n = SLOTS * terminal;
    let item_status = if status == "completed" {
        "completed"
    } else {
        "incomplete"
    };
    let part = json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
    let mut out = vec![
        json!({"type": "response.output_text.done", "item_id": item_id(meta),
               "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
        json!({"type": "response.content_part.done", "item_id": item_id(meta),
               "output_index": 0, "content_index": 0, "part": part}),
        json!({"type": "response.output_item.done", "output_index": 0,
               "item": message_item(meta, text, item_status)}),
    ];
    for call in &state.calls {
        out.push(json!({"type": "response.function_call_arguments.done", "item_id": call_item_id(meta, call.index),
                        "output_index": 1 + call.index, "name": call.name, "arguments": call.arguments}));
        out.push(
            json!({"type": "response.output_item.done", "output_index": 1 + call.index,
                        "item": call_item(meta, call, &call.arguments, "completed")}),
        );
    }
    out.push(json!({"type": last, "response": response(meta, state, text)}));
    out.into_iter()
        .zip(n..)
        .map(|(mut event, number)| {
            event["sequence_number"] = json!(number);
            (number, event)
        })
        .collect()
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
        let bad = json!({"model": "sim", "input": [{"type": "reasoning"}]});
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
        let text = |t: &str| json!({"choices": [{"delta": {"content": t}}]});
        let numbers = |events: Vec<Event>| events.iter().map(|e| e.0).collect::<Vec<_>>();
        assert_eq!(numbers(chunk_events(&m, 1, &text("He"))), [4]);
        assert!(
            chunk_events(&m, 2, &text("")).is_empty(),
            "no event for a chunk without text"
        );
        let done = State {
            status: Status::Completed,
            reason: None,
            detail: None,
            finish_reason: Some("stop".into()),
            usage: Some(json!({"prompt_tokens": 1, "completion_tokens": 2})),
            calls: Vec::new(),
        };
        let s = suffix(&m, 3, &done, "Hello");
        assert_eq!(numbers(s.clone()), [12, 13, 14, 15]);
        assert!(s.iter().all(|(n, e)| e["sequence_number"] == *n));
        assert_eq!(
            chunk_after(15),
            2,
            "replay after chunk 2 to send what follows 15"
        );
        assert_eq!(chunk_after(3), 0);
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

    #[test]
    fn tool_calls_become_function_call_items_and_events() {
        let m = meta();
        let start = json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "lookup", "arguments": ""}}]}}]});
        let more = json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"q\":1}"}}]}}]});
        let end = json!({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]});
        let e = chunk_events(&m, 2, &start);
        assert_eq!(
            (e[0].0, e[0].1["type"].as_str()),
            (9, Some("response.output_item.added"))
        );
        let e = chunk_events(&m, 3, &more);
        assert_eq!((e[0].0, e[0].1["delta"].as_str()), (14, Some("{\"q\":1}")));
        let mut s = State::running();
        for chunk in [&start, &more, &end] {
            s.note(chunk);
        }
        s.status = Status::Completed;
        assert_eq!(s.calls[0].arguments, "{\"q\":1}");
        let events = suffix(&m, 5, &s, "");
        let kinds: Vec<_> = events
            .iter()
            .map(|e| e.1["type"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(
            kinds,
            [
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        assert_eq!(
            events.iter().map(|e| e.0).collect::<Vec<_>>(),
            [20, 21, 22, 23, 24, 25]
        );
        let r = &events[5].1["response"];
        assert_eq!(r["output"][1]["type"], "function_call");
        assert_eq!(r["output"][1]["name"], "lookup");
        assert_eq!(r["status"], "completed");
    }
}
