//! Upstreams: turn a model provider into a stream of chunks, and nothing else.
//!
//! One module per protocol: [`openai`] for any OpenAI-compatible server (OpenAI, vLLM, Ollama,
//! llama.cpp, LM Studio, sluice's own `mock-upstream`), [`sim`] for the built-in simulated model.
//! Either way the relay sees a [`ChunkStream`]: `Ok(Chunk)` as each chunk arrives, and then either
//! a clean end (only after the upstream's `[DONE]`) or exactly one `Err(UpstreamError)`. The
//! stream is lazy: nothing is sent upstream until it is first polled, so the relay's first-token
//! limit covers connecting too, and dropping the stream closes the upstream connection.

pub mod anthropic;
pub mod openai;
pub mod pool;
pub mod route;
pub mod sim;
pub mod sse;

use std::pin::Pin;

use futures_util::Stream;
use serde_json::{Map, Value};

use crate::stream::Reason;

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

/// The few fields of a chunk sluice reads, borrowed from the JSON where possible: a chunk is
/// parsed on the hot path, and a generic `Value` would allocate a map per object.
#[derive(serde::Deserialize)]
struct WireChunk<'a> {
    #[serde(default, borrow)]
    choices: FirstChoice<'a>,
    #[serde(default, borrow)]
    usage: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    error: Option<&'a serde_json::value::RawValue>,
}

#[derive(serde::Deserialize)]
struct WireChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<WireDelta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct WireDelta<'a> {
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
}

/// The first of `choices` (sluice relays the others as they are, and reads only the first):
/// the rest are skipped without a vector to hold them.
#[derive(Default)]
struct FirstChoice<'a>(Option<WireChoice<'a>>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for FirstChoice<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct First<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for First<'a> {
            type Value = FirstChoice<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of choices")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let first = seq.next_element::<WireChoice<'a>>()?;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(FirstChoice(first))
            }
        }
        d.deserialize_seq(First(std::marker::PhantomData))
    }
}

impl Payload {
    /// Interprets one event's data: `[DONE]`, a chunk, an error object, or garbage.
    pub fn parse(data: &str) -> Result<Self, UpstreamError> {
        Ok(match read(data)? {
            None => Payload::Done,
            Some(fields) => Payload::Chunk(fields.chunk(data.to_string())),
        })
    }

    /// [`parse`](Self::parse), keeping `data` as the chunk's JSON instead of copying it.
    pub fn parse_owned(data: String) -> Result<Self, UpstreamError> {
        Ok(match read(&data)? {
            None => Payload::Done,
            Some(fields) => Payload::Chunk(fields.chunk(data)),
        })
    }
}

/// What sluice reads from a chunk besides its JSON.
struct Fields {
    content: String,
    finish_reason: Option<String>,
    usage: Option<Value>,
}

impl Fields {
    fn chunk(self, data: String) -> Chunk {
        Chunk {
            data,
            content: self.content,
            finish_reason: self.finish_reason,
            usage: self.usage,
        }
    }
}

/// The fields of one event's data (`None`: `[DONE]`).
fn read(data: &str) -> Result<Option<Fields>, UpstreamError> {
    if data.trim() == "[DONE]" {
        return Ok(None);
    }
    let wire: WireChunk<'_> = serde_json::from_str(data).map_err(|e| {
        UpstreamError::Protocol(if data.trim_start().starts_with('{') {
            format!("a chunk is not JSON: {e}")
        } else {
            "a chunk is not a JSON object".to_string()
        })
    })?;
    let raw = |v: &serde_json::value::RawValue| {
        serde_json::from_str::<Value>(v.get()).unwrap_or(Value::Null)
    };
    if let Some(error) = wire.error {
        return Err(UpstreamError::ErrorEvent {
            message: error_message(&raw(error)),
        });
    }
    let (content, finish_reason) = match wire.choices.0 {
        Some(c) => (
            c.delta
                .and_then(|d| d.content)
                .map(|c| c.into_owned())
                .unwrap_or_default(),
            c.finish_reason.map(|f| f.into_owned()),
        ),
        None => (String::new(), None),
    };
    let usage = wire.usage.map(raw).filter(|u| !u.is_null());
    Ok(Some(Fields {
        content,
        finish_reason,
        usage,
    }))
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
        /// How long the upstream asked to be left alone (`Retry-After`, in seconds).
        retry_after: Option<std::time::Duration>,
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
    /// Every target of a route failed (each one's outcome is in the message and the transcript's
    /// attempts).
    #[error("every target of the route failed: {0}")]
    Exhausted(String),
}

impl UpstreamError {
    /// Whether trying the same upstream again may help: a connection failure, `429`, or a `5xx`.
    pub fn is_retryable(&self) -> bool {
        match self {
            UpstreamError::Transport(_) => true,
            UpstreamError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    /// The transcript reason for this failure.
    pub fn reason(&self) -> Reason {
        match self {
            UpstreamError::Protocol(_) => Reason::UpstreamProtocolError,
            _ => Reason::UpstreamError,
        }
    }
}

/// Bounds on what an upstream may make sluice hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamLimits {
    /// The largest event (its joined `data:` lines), in bytes; a larger one ends the stream
    /// `failed(upstream_protocol_error)` without being buffered past this.
    pub max_event_bytes: usize,
    /// How much of an error response's body is read and copied into the error message.
    pub max_error_body_bytes: usize,
}

impl Default for UpstreamLimits {
    fn default() -> Self {
        Self {
            max_event_bytes: sse::DEFAULT_MAX_EVENT,
            max_error_body_bytes: 4096,
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
    /// A route over several of the above (see [`route`]).
    Route(std::sync::Arc<route::Route>),
}

impl Upstream {
    /// Opens the stream (lazily: nothing happens until it is polled). A route notes each of its
    /// attempts in `attempts` (its own list, timed from now, if given none); the others leave it
    /// alone.
    pub fn open(
        &self,
        request: UpstreamRequest,
        attempts: Option<&route::Attempts>,
    ) -> ChunkStream {
        match self {
            Upstream::OpenAi(client) => client.open(request),
            Upstream::Sim(defaults) => sim::open(*defaults, request),
            Upstream::Route(r) => {
                let attempts = attempts
                    .cloned()
                    .unwrap_or_else(|| route::Attempts::since(tokio::time::Instant::now()));
                route::open(r.clone(), request, attempts)
            }
        }
    }

    /// Whether this is a route (which notes its attempts; see [`Upstream::open`]).
    pub fn is_route(&self) -> bool {
        matches!(self, Upstream::Route(_))
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
