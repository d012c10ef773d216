//! Upstreams: turn a model provider into a stream of chunks, and nothing else.
//!
//! One module per protocol: [`openai`] for any OpenAI-compatible server (OpenAI, vLLM, Ollama,
//! llama.cpp, LM Studio, sluice's own `mock-upstream`), [`sim`] for the built-in simulated model.
//! Either way the relay sees a [`ChunkStream`]: `Ok(Chunk)` as each chunk arrives, and then either
//! a clean end (only after the upstream's `[DONE]`) or exactly one `Err(UpstreamError)`. The
//! stream is lazy: nothing is sent upstream until it is first polled, so the relay's first-token
//! limit covers connecting too, and dropping the stream closes the upstream connection.

pub mod openai;
pub mod sim;
pub mod sse;

use std::pin::Pin;

use futures_util::Stream;
use serde_json::{Map, Value};

use crate::status::Reason;

/// A stream of chunks from an upstream; see the module docs for how it ends.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, UpstreamError>> + Send>>;

/// One chunk of an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// The chunk as OpenAI `chat.completion.chunk` JSON, as the upstream sent it.
    pub data: String,
    /// The text this chunk adds to the answer.
    pub content: String,
    /// The finish reason, on the last chunk.
    pub finish_reason: Option<String>,
    /// Token usage, if the upstream reported it.
    pub usage: Option<Value>,
}

/// What one `data:` payload of an OpenAI-compatible stream is.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A chunk.
    Chunk(Chunk),
    /// `[DONE]`: the stream succeeded.
    Done,
}

impl Payload {
    /// Interprets one event's data: `[DONE]`, a chunk, an error object, or garbage.
    pub fn parse(data: &str) -> Result<Self, UpstreamError> {
        if data.trim() == "[DONE]" {
            return Ok(Payload::Done);
        }
        let value: Value = serde_json::from_str(data)
            .map_err(|e| UpstreamError::Protocol(format!("a chunk is not JSON: {e}")))?;
        let Value::Object(object) = &value else {
            return Err(UpstreamError::Protocol(
                "a chunk is not a JSON object".into(),
            ));
        };
        if let Some(error) = object.get("error") {
            return Err(UpstreamError::ErrorEvent {
                message: error_message(error),
            });
        }
        let choice = object
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first());
        let content = choice
            .and_then(|c| c.pointer("/delta/content"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let finish_reason = choice
            .and_then(|c| c.get("finish_reason"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let usage = object.get("usage").filter(|u| !u.is_null()).cloned();
        Ok(Payload::Chunk(Chunk {
            data: data.to_string(),
            content,
            finish_reason,
            usage,
        }))
    }
}

/// The message of an OpenAI-style error object (`{"message": ...}`) or of any other JSON.
pub fn error_message(error: &Value) -> String {
    match error {
        Value::String(s) => s.clone(),
        other => other
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| other.to_string()),
    }
}

/// How an upstream failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// It answered with an HTTP error status.
    #[error("upstream answered HTTP {status}: {message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The upstream's error message.
        message: String,
    },
    /// It sent an error event in the stream.
    #[error("upstream sent an error: {message}")]
    ErrorEvent {
        /// The upstream's error message.
        message: String,
    },
    /// The connection failed or broke.
    #[error("upstream connection failed: {0}")]
    Transport(String),
    /// The stream ended without `[DONE]`.
    #[error("upstream closed the stream before [DONE]")]
    Truncated,
    /// It sent something that is not a valid OpenAI event stream.
    #[error("upstream sent an invalid stream: {0}")]
    Protocol(String),
}

impl UpstreamError {
    /// The transcript reason for this failure.
    pub fn reason(&self) -> Reason {
        match self {
            UpstreamError::Protocol(_) => Reason::UpstreamProtocolError,
            _ => Reason::UpstreamError,
        }
    }
}

/// A request as it goes upstream: the client's body without sluice's own options.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    /// The body, `stream` forced on; for `openai` upstreams `model` is the upstream's name.
    pub body: Map<String, Value>,
}

/// A configured upstream.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// An OpenAI-compatible HTTP server.
    OpenAi(openai::OpenAi),
    /// The built-in simulated model.
    Sim(sim::SimDefaults),
}

impl Upstream {
    /// Opens the stream (lazily: nothing happens until it is polled).
    pub fn open(&self, request: UpstreamRequest) -> ChunkStream {
        match self {
            Upstream::OpenAi(client) => client.open(request),
            Upstream::Sim(defaults) => sim::open(*defaults, request),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads() {
        assert_eq!(Payload::parse("[DONE]"), Ok(Payload::Done));
        let chunk = r#"{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#;
        match Payload::parse(chunk) {
            Ok(Payload::Chunk(c)) => {
                assert_eq!(c.content, "hi");
                assert_eq!(c.finish_reason, None);
                assert_eq!(c.data, chunk);
            }
            other => panic!("{other:?}"),
        }
        let last =
            r#"{"choices":[{"delta":{},"finish_reason":"stop"}],"usage":{"total_tokens":3}}"#;
        match Payload::parse(last) {
            Ok(Payload::Chunk(c)) => {
                assert_eq!(c.finish_reason.as_deref(), Some("stop"));
                assert_eq!(c.usage, Some(serde_json::json!({"total_tokens": 3})));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Payload::parse(r#"{"error":{"message":"overloaded"}}"#),
            Err(UpstreamError::ErrorEvent {
                message: "overloaded".into()
            })
        );
        assert!(matches!(
            Payload::parse("{nope"),
            Err(UpstreamError::Protocol(_))
        ));
        assert!(matches!(
            Payload::parse("[1]"),
            Err(UpstreamError::Protocol(_))
        ));
        assert_eq!(
            UpstreamError::Protocol("x".into()).reason(),
            Reason::UpstreamProtocolError
        );
        assert_eq!(UpstreamError::Truncated.reason(), Reason::UpstreamError);
    }
}
