//! Anthropic's Messages API as an upstream dialect (`kind = "anthropic"`): an OpenAI-shaped chat
//! request becomes a Messages request, and Anthropic's event stream becomes OpenAI chunks, so
//! the relay, the transcript and every client see the same shape whatever the upstream speaks.
//!
//! | Anthropic event | becomes |
//! |---|---|
//! | `message_start` | nothing (its id, model and input tokens are kept for later chunks) |
//! | `content_block_start` (`tool_use`) | a chunk starting a tool call (`id`, `name`) |
//! | `content_block_delta` `text_delta` | a chunk with that text |
//! | `content_block_delta` `input_json_delta` | a chunk with that piece of the call's arguments |
//! | `message_delta` | the last chunk: `finish_reason` (`end_turn`/`stop_sequence` → `stop`, `max_tokens` → `length`, `tool_use` → `tool_calls`) and usage |
//! | `message_stop` | the end (`[DONE]`) |
//! | `ping`, `content_block_stop`, anything unknown | nothing (a ping is not a token: it never resets the idle timer) |
//! | `error` | the stream fails `upstream_error` with Anthropic's type and message |

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::{Chunk, Payload, UpstreamError};

/// The `anthropic-version` header sluice sends.
pub const VERSION: &str = "2023-06-01";
/// `max_tokens` when the request names none (Anthropic requires it).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

fn text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

/// The Messages request for an OpenAI chat request (`stream` on).
pub fn request(chat: &Map<String, Value>) -> Value {
    let mut system = Vec::new();
    let mut messages = Vec::new();
    let empty = Vec::new();
    for m in chat
        .get("messages")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
    {
        let content = m.get("content").unwrap_or(&Value::Null);
        match m.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => system.push(text(content)),
            Some("assistant") => {
                let mut blocks = Vec::new();
                let said = text(content);
                if !said.is_empty() {
                    blocks.push(json!({"type": "text", "text": said}));
                }
                for call in m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .unwrap_or(&empty)
                {
                    let arguments = call["function"]["arguments"].as_str().unwrap_or("{}");
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call["id"],
                        "name": call["function"]["name"],
                        "input": serde_json::from_str::<Value>(arguments).unwrap_or_else(|_| json!({})),
                    }));
                }
                messages.push(json!({"role": "assistant", "content": blocks}));
            }
            Some("tool") => messages.push(json!({"role": "user", "content": [{
                "type": "tool_result",
                "tool_use_id": m.get("tool_call_id").cloned().unwrap_or(Value::Null),
                "content": text(content),
            }]})),
            _ => messages.push(json!({"role": "user", "content": text(content)})),
        }
    }
    let mut out = Map::new();
    out.insert(
        "model".into(),
        chat.get("model").cloned().unwrap_or(Value::Null),
    );
    out.insert("messages".into(), Value::Array(messages));
    if !system.is_empty() {
        out.insert("system".into(), Value::String(system.join("\n\n")));
    }
    let max_tokens = chat
        .get("max_tokens")
        .or_else(|| chat.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".into(), json!(max_tokens));
    match chat.get("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(list)) => {
            out.insert("stop_sequences".into(), Value::Array(list.clone()));
        }
        _ => {}
    }
    for key in ["temperature", "top_p", "sim"] {
        if let Some(v) = chat.get(key).filter(|v| !v.is_null()) {
            out.insert(key.into(), v.clone());
        }
    }
    if let Some(Value::Array(tools)) = chat.get("tools") {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| {
                let f = &t["function"];
                json!({"name": f["name"], "description": f.get("description").cloned().unwrap_or(Value::Null),
                       "input_schema": f.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"}))})
            })
            .collect();
        out.insert("tools".into(), Value::Array(tools));
    }
    let choice = match chat.get("tool_choice") {
        Some(Value::String(c)) if c == "required" => Some(json!({"type": "any"})),
        Some(Value::String(c)) if c == "none" => Some(json!({"type": "none"})),
        Some(Value::String(c)) if c == "auto" => Some(json!({"type": "auto"})),
        Some(Value::Object(c)) => Some(
            json!({"type": "tool", "name": c.get("function").and_then(|f| f.get("name")).cloned().unwrap_or(Value::Null)}),
        ),
        _ => None,
    };
    if let Some(choice) = choice {
        out.insert("tool_choice".into(), choice);
    }
    out.insert("stream".into(), Value::Bool(true));
    Value::Object(out)
}

/// What one Anthropic event comes to.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// An OpenAI chunk for the relay.
    Chunk(Chunk),
    /// Nothing for the client.
    Nothing,
    /// The stream succeeded.
    Done,
}

/// Turns one stream's Anthropic events into OpenAI chunks.
#[derive(Debug, Default)]
pub struct Translator {
    id: String,
    model: String,
    input_tokens: u64,
    /// Content block index → tool call index, for the blocks that are tool calls.
    tools: HashMap<u64, u64>,
}

fn stop_reason(reason: &str) -> &'static str {
    match reason {
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        _ => "stop",
    }
}

impl Translator {
    fn chunk(
        &self,
        delta: Value,
        finish: Option<&str>,
        usage: Option<Value>,
    ) -> Result<Step, UpstreamError> {
        let mut data = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": 0,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        if let Some(u) = usage {
            data["usage"] = u;
        }
        match Payload::parse(&data.to_string())? {
            Payload::Chunk(c) => Ok(Step::Chunk(c)),
            Payload::Done => Ok(Step::Done),
        }
    }

    /// Interprets one event's data.
    pub fn event(&mut self, data: &str) -> Result<Step, UpstreamError> {
        let e: Value = serde_json::from_str(data)
            .map_err(|e| UpstreamError::Protocol(format!("an Anthropic event is not JSON: {e}")))?;
        match e["type"].as_str().unwrap_or("") {
            "message_start" => {
                let m = &e["message"];
                self.id = m["id"].as_str().unwrap_or("msg").to_string();
                self.model = m["model"].as_str().unwrap_or("").to_string();
                self.input_tokens = m["usage"]["input_tokens"].as_u64().unwrap_or(0);
                Ok(Step::Nothing)
            }
            "content_block_start" if e["content_block"]["type"] == "tool_use" => {
                let index = self.tools.len() as u64;
                self.tools.insert(e["index"].as_u64().unwrap_or(0), index);
                let block = &e["content_block"];
                self.chunk(
                    json!({"tool_calls": [{"index": index, "id": block["id"], "type": "function",
                                           "function": {"name": block["name"], "arguments": ""}}]}),
                    None,
                    None,
                )
            }
            "content_block_delta" => {
                let d = &e["delta"];
                match d["type"].as_str().unwrap_or("") {
                    "text_delta" => self.chunk(json!({"content": d["text"]}), None, None),
                    "input_json_delta" => {
                        let index = self
                            .tools
                            .get(&e["index"].as_u64().unwrap_or(0))
                            .copied()
                            .unwrap_or(0);
                        self.chunk(
                            json!({"tool_calls": [{"index": index, "function": {"arguments": d["partial_json"]}}]}),
                            None,
                            None,
                        )
                    }
                    _ => Ok(Step::Nothing),
                }
            }
            "message_delta" => {
                let output = e["usage"]["output_tokens"].as_u64().unwrap_or(0);
                let finish = stop_reason(e["delta"]["stop_reason"].as_str().unwrap_or("end_turn"));
                let usage = json!({"prompt_tokens": self.input_tokens, "completion_tokens": output,
                                   "total_tokens": self.input_tokens + output});
                self.chunk(json!({}), Some(finish), Some(usage))
            }
            "message_stop" => Ok(Step::Done),
            "error" => Err(UpstreamError::ErrorEvent {
                message: error_text(&e["error"]),
            }),
            _ => Ok(Step::Nothing),
        }
    }
}

/// An Anthropic error object (`{"type": "overloaded_error", "message": "Overloaded"}`) as one
/// line that keeps its type.
pub fn error_text(error: &Value) -> String {
    match (error["type"].as_str(), error["message"].as_str()) {
        (Some(kind), Some(message)) => format!("{kind}: {message}"),
        (None, Some(message)) => message.to_string(),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_requests_become_messages_requests() {
        let chat = json!({"model": "claude", "max_tokens": 50, "stop": "END", "temperature": 0.5,
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "t1", "type": "function",
                    "function": {"name": "lookup", "arguments": "{\"q\":1}"}}]},
                {"role": "tool", "tool_call_id": "t1", "content": "42"},
            ],
            "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
            "tool_choice": "required"});
        let r = request(chat.as_object().unwrap());
        assert_eq!(r["system"], "be brief");
        assert_eq!(r["max_tokens"], 50);
        assert_eq!(r["stop_sequences"], json!(["END"]));
        assert_eq!(r["messages"][0], json!({"role": "user", "content": "hi"}));
        assert_eq!(r["messages"][1]["content"][0]["type"], "tool_use");
        assert_eq!(r["messages"][1]["content"][0]["input"], json!({"q": 1}));
        assert_eq!(r["messages"][2]["content"][0]["tool_use_id"], "t1");
        assert_eq!(r["tools"][0]["input_schema"], json!({"type": "object"}));
        assert_eq!(r["tool_choice"], json!({"type": "any"}));
        assert_eq!(r["stream"], true);
        let plain = request(json!({"model": "m", "messages": []}).as_object().unwrap());
        assert_eq!(
            plain["max_tokens"], DEFAULT_MAX_TOKENS,
            "Anthropic requires it"
        );
    }

    #[test]
    fn anthropic_events_become_openai_chunks() {
        let mut t = Translator::default();
        let step = |t: &mut Translator, e: Value| t.event(&e.to_string());
        assert_eq!(
            step(
                &mut t,
                json!({"type": "message_start", "message": {"id": "msg_1", "model": "claude", "usage": {"input_tokens": 7}}})
            ),
            Ok(Step::Nothing)
        );
        assert_eq!(step(&mut t, json!({"type": "ping"})), Ok(Step::Nothing));
        let Ok(Step::Chunk(c)) = step(
            &mut t,
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
        ) else {
            panic!("a text chunk")
        };
        assert_eq!(c.content, "Hel");
        let Ok(Step::Chunk(c)) = step(
            &mut t,
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "tu_1", "name": "lookup"}}),
        ) else {
            panic!("a tool call chunk")
        };
        let data: Value = serde_json::from_str(&c.data).unwrap();
        assert_eq!(data["choices"][0]["delta"]["tool_calls"][0]["id"], "tu_1");
        let Ok(Step::Chunk(c)) = step(
            &mut t,
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"q\""}}),
        ) else {
            panic!("an arguments chunk")
        };
        let data: Value = serde_json::from_str(&c.data).unwrap();
        assert_eq!(
            data["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"],
            "{\"q\""
        );
        let Ok(Step::Chunk(c)) = step(
            &mut t,
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 3}}),
        ) else {
            panic!("the last chunk")
        };
        assert_eq!(c.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(
            c.usage,
            Some(json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}))
        );
        assert_eq!(
            step(&mut t, json!({"type": "message_stop"})),
            Ok(Step::Done)
        );
        assert_eq!(
            step(
                &mut t,
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
            ),
            Err(UpstreamError::ErrorEvent {
                message: "overloaded_error: Overloaded".into()
            })
        );
    }
}
