//! Upstreams over HTTP: OpenAI-compatible servers (OpenAI, vLLM, Ollama, llama.cpp, LM Studio,
//! ...) and, in the Anthropic dialect, Anthropic's Messages API.
//!
//! Posts the request to `{base_url}/chat/completions` (Anthropic: `{base_url}/messages`, the
//! request translated by [`super::anthropic`]) with `stream: true` and reads the answer as
//! server-sent events with [`SseParser`]. The API key is sent as a bearer token (Anthropic:
//! `x-api-key`, with `anthropic-version`) and is never printed: this type's `Debug` leaves it out and error messages never carry
//! request headers (what the upstream itself echoes is redacted by the relay).
//!
//! What the upstream sends is bounded: an error body is read up to
//! [`UpstreamLimits::max_error_body_bytes`], one event up to
//! [`UpstreamLimits::max_event_bytes`], and a success that is not an event stream (an HTML
//! page, a JSON body) is a protocol error, not a stream that ended early.

use std::fmt;
use std::time::Duration;

use async_stream::stream;
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::anthropic::{self, Step, Translator};
use super::sse::SseParser;
use super::{error_message, ChunkStream, Payload, UpstreamError, UpstreamLimits, UpstreamRequest};
use crate::redact::truncate;

/// A configured OpenAI-compatible upstream.
#[derive(Clone)]
pub struct OpenAi {
    client: reqwest::Client,
    /// Parsed once: reqwest would parse a string on every request.
    url: reqwest::Url,
    api_key: Option<String>,
    headers: HeaderMap,
    limits: UpstreamLimits,
    dialect: Dialect,
}

/// Which API an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI's chat completions.
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
}

impl fmt::Debug for OpenAi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAi")
            .field("url", &self.url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("dialect", &self.dialect)
            .finish()
    }
}

/// A bad upstream setting.
#[derive(Debug, thiserror::Error)]
pub enum OpenAiConfigError {
    /// A header name or value is not valid HTTP.
    #[error("header {0:?} is not a valid HTTP header")]
    Header(String),
    /// The HTTP client could not be built.
    #[error("the HTTP client could not be built: {0}")]
    Client(String),
    /// The base URL is not a URL.
    #[error("{0:?} is not a valid URL")]
    Url(String),
}

impl OpenAi {
    /// An upstream at `base_url` (e.g. `http://127.0.0.1:9000/v1`), with an optional key and
    /// extra headers.
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        extra_headers: &[(String, String)],
        limits: UpstreamLimits,
    ) -> Result<Self, OpenAiConfigError> {
        let mut headers = HeaderMap::new();
        for (name, value) in extra_headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| OpenAiConfigError::Header(name.clone()))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| OpenAiConfigError::Header(name.to_string()))?;
            headers.insert(name, value);
        }
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30))
            // A redirect is the upstream's answer, not an address to follow with the request
            // (and its key) somewhere else. Retries are sluice's to decide (routes), and with
            // none here the client does not copy every request in case it retries.
            .redirect(reqwest::redirect::Policy::none())
            .retry(reqwest::retry::never().max_retries_per_request(0))
            .build()
            .map_err(|e| OpenAiConfigError::Client(e.to_string()))?;
        let url = format!("{}/chat/completions", base_url.trim_end_matches('/'));
        Ok(Self {
            client,
            url: reqwest::Url::parse(&url).map_err(|_| OpenAiConfigError::Url(base_url.into()))?,
            api_key,
            headers,
            limits,
            dialect: Dialect::OpenAi,
        })
    }

    /// The same upstream speaking Anthropic's Messages API at `{base_url}/messages`.
    pub fn anthropic(mut self) -> Self {
        if let Some(base) = self.url.path().strip_suffix("/chat/completions") {
            let path = format!("{base}/messages");
            self.url.set_path(&path);
        }
        self.headers.insert(
            "anthropic-version",
            HeaderValue::from_static(anthropic::VERSION),
        );
        self.dialect = Dialect::Anthropic;
        self
    }

    /// The API key, for the redactor (see [`crate::redact`]).
    pub fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }

    /// Opens the stream; see [`Upstream::open`](super::Upstream::open).
    pub fn open(&self, request: UpstreamRequest) -> ChunkStream {
        // The request is built here and its sending boxed: the generator below then keeps
        // neither a copy of this upstream's settings nor room for the send's state while the
        // stream runs (nothing is sent until the stream is first polled).
        let anthropic = self.dialect == Dialect::Anthropic;
        let body = if anthropic {
            anthropic::request(&request.body)
        } else {
            serde_json::Value::Object(request.body)
        };
        let mut post = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .json(&body);
        drop(body);
        match (&self.api_key, anthropic) {
            (Some(key), false) => post = post.bearer_auth(key),
            (Some(key), true) => post = post.header("x-api-key", key),
            (None, _) => {}
        }
        let sent = Box::pin(post.send());
        let limits = self.limits;
        Box::pin(stream! {
            let mut response = match sent.await {
                Ok(r) => r,
                Err(e) => {
                    yield Err(UpstreamError::Transport(e.without_url().to_string()));
                    return;
                }
            };
            let status = response.status();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(std::time::Duration::from_secs);
            let max_error = limits.max_error_body_bytes;
            if !status.is_success() {
                let mut body = Vec::new();
                while let Ok(Some(bytes)) = response.chunk().await {
                    let room = max_error.saturating_sub(body.len());
                    body.extend_from_slice(&bytes[..bytes.len().min(room)]);
                    if body.len() >= max_error {
                        break;
                    }
                }
                let text = String::from_utf8_lossy(&body).to_string();
                let message = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| {
                        v.get("error").map(|e| if anthropic { anthropic::error_text(e) } else { error_message(e) })
                    })
                    .unwrap_or(text);
                let message = truncate(&message, max_error).into_owned();
                yield Err(UpstreamError::Status { status: status.as_u16(), message, retry_after });
                return;
            }
            if let Some(other) = not_an_event_stream(response.headers()) {
                yield Err(UpstreamError::Protocol(format!(
                    "upstream answered {status} with content type {:?}, not an event stream",
                    truncate(&other, 100)
                )));
                return;
            }
            let mut parser = SseParser::with_max_event(limits.max_event_bytes);
            let mut events = Vec::new();
            let mut translator = Translator::default();
            let mut body = response.bytes_stream();
            loop {
                match body.next().await {
                    Some(Ok(bytes)) => {
                        if let Err(e) = parser.push(&bytes, &mut events) {
                            yield Err(UpstreamError::Protocol(e.to_string()));
                            return;
                        }
                        for event in events.drain(..) {
                            let step = if anthropic {
                                translator.event(&event.data)
                            } else {
                                Payload::parse_owned(event.data).map(|p| match p {
                                    Payload::Chunk(chunk) => Step::Chunk(chunk),
                                    Payload::Done => Step::Done,
                                })
                            };
                            match step {
                                Ok(Step::Chunk(chunk)) => yield Ok(chunk),
                                Ok(Step::Nothing) => {}
                                Ok(Step::Done) => return,
                                Err(e) => { yield Err(e); return; }
                            }
                        }
                    }
                    Some(Err(e)) => {
                        yield Err(UpstreamError::Transport(e.without_url().to_string()));
                        return;
                    }
                    None => {
                        yield Err(UpstreamError::Truncated);
                        return;
                    }
                }
            }
        })
    }
}

/// The response's content type, if it says it is something other than `text/event-stream`.
/// A missing content type is accepted: some servers leave it out of event streams.
fn not_an_event_stream(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let value = headers.get(reqwest::header::CONTENT_TYPE)?;
    let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
    let essence = text.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("text/event-stream") {
        None
    } else {
        Some(text)
    }
}
