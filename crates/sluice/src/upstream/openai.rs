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
use std::sync::Arc;
use std::time::Duration;

use async_stream::stream;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::connect::HttpConnector;

use super::anthropic::{self, Step, Translator};
use super::pool::{self, HttpVersion, Pool};
use super::sse::SseParser;
use super::{error_message, ChunkStream, Payload, UpstreamError, UpstreamLimits, UpstreamRequest};
use crate::redact::truncate;

/// A configured OpenAI-compatible upstream.
///
/// Its requests go over connections of its own [`Pool`]: HTTP/1 ones kept alive and reused, each
/// driven by the stream that uses it, or shared HTTP/2 ones where the upstream speaks it. Not reqwest: its layers (redirects, retries, its own URL
/// type) cost every request two parses of its URL and a redirect policy's pass even with both
/// turned off (about 20,000 instructions of a one-chunk stream's 310,000, `bash
/// bench/callgrind 100 300 1`), and sluice follows no redirect and retries nothing here (routes
/// decide). Not hyper-util's pooled client either: see [`super::pool`] for why.
#[derive(Clone)]
pub struct OpenAi {
    /// Shared by the upstream's clones.
    pool: Arc<Pool>,
    /// Parsed once, at start.
    uri: Uri,
    api_key: Option<String>,
    /// Sent with every request: the extra headers, `Host`, the content type, and the key (marked
    /// sensitive), built once.
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
            .field("uri", &self.uri)
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
        // What reqwest sent, kept so that no upstream sees a change (an extra header of the
        // config may say otherwise, as it could then).
        headers
            .entry(header::CONTENT_TYPE)
            .or_insert(HeaderValue::from_static("application/json"));
        headers
            .entry(header::ACCEPT)
            .or_insert(HeaderValue::from_static("*/*"));
        let url = format!("{}/chat/completions", base_url.trim_end_matches('/'));
        let uri: Uri = url
            .parse()
            .map_err(|_| OpenAiConfigError::Url(base_url.into()))?;
        let host = match (uri.scheme_str(), uri.host()) {
            (Some(scheme @ ("http" | "https")), Some(host)) => match uri.port_u16() {
                Some(port) if port != if scheme == "https" { 443 } else { 80 } => {
                    format!("{host}:{port}")
                }
                _ => host.to_string(),
            },
            _ => return Err(OpenAiConfigError::Url(base_url.into())),
        };
        let host =
            HeaderValue::from_str(&host).map_err(|_| OpenAiConfigError::Url(base_url.into()))?;
        headers.insert(header::HOST, host);
        let mut upstream = Self {
            pool: Pool::new(
                connector(HttpVersion::Auto)?,
                uri.clone(),
                HttpVersion::Auto,
                IDLE_MAX,
                IDLE_FOR,
            ),
            uri,
            api_key: None,
            headers,
            limits,
            dialect: Dialect::OpenAi,
        };
        upstream.set_key(api_key)?;
        Ok(upstream)
    }

    /// Keeps `key` and the header that carries it (a bearer token; Anthropic: `x-api-key`).
    fn set_key(&mut self, key: Option<String>) -> Result<(), OpenAiConfigError> {
        self.headers.remove(header::AUTHORIZATION);
        self.headers.remove("x-api-key");
        if let Some(key) = &key {
            let (name, value) = match self.dialect {
                Dialect::OpenAi => (header::AUTHORIZATION, format!("Bearer {key}")),
                Dialect::Anthropic => (HeaderName::from_static("x-api-key"), key.clone()),
            };
            let mut value = HeaderValue::from_str(&value)
                .map_err(|_| OpenAiConfigError::Header(name.to_string()))?;
            value.set_sensitive(true);
            self.headers.insert(name, value);
        }
        self.api_key = key;
        Ok(())
    }

    /// The same upstream, its connections speaking `version` (see [`HttpVersion`]).
    pub fn http_version(mut self, version: HttpVersion) -> Result<Self, OpenAiConfigError> {
        if version == self.pool.version() {
            return Ok(self);
        }
        self.pool = Pool::new(
            connector(version)?,
            self.uri.clone(),
            version,
            IDLE_MAX,
            IDLE_FOR,
        );
        Ok(self)
    }

    /// The HTTP versions its connections speak.
    pub fn version(&self) -> HttpVersion {
        self.pool.version()
    }

    /// The same upstream speaking Anthropic's Messages API at `{base_url}/messages`.
    pub fn anthropic(mut self) -> Self {
        if let Some(base) = self.uri.path().strip_suffix("/chat/completions") {
            let path = format!("{base}/messages");
            let mut parts = self.uri.clone().into_parts();
            // The path of a URI that parsed, with its last segment changed, is a path.
            if let Ok(p) = path.parse() {
                parts.path_and_query = Some(p);
                if let Ok(uri) = Uri::from_parts(parts) {
                    self.uri = uri;
                }
            }
        }
        self.headers.insert(
            "anthropic-version",
            HeaderValue::from_static(anthropic::VERSION),
        );
        self.dialect = Dialect::Anthropic;
        let key = self.api_key.take();
        // The key's header was built from the same key as a valid value already.
        if self.set_key(key.clone()).is_err() {
            self.api_key = key;
        }
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
        let body = match serde_json::to_vec(&body) {
            Ok(body) => body,
            Err(e) => {
                return error_stream(UpstreamError::Protocol(format!("request not encoded: {e}")))
            }
        };
        let mut post = Request::new(Full::new(Bytes::from(body)));
        *post.method_mut() = hyper::Method::POST;
        // In origin form (the path), as HTTP/1 sends it to a server that is not a proxy.
        *post.uri_mut() = origin_form(&self.uri);
        *post.headers_mut() = self.headers.clone();
        let sent = Box::pin(self.pool.clone().send(post));
        let limits = self.limits;
        Box::pin(stream! {
            let (response, mut lease): (Response<Incoming>, _) = match sent.await {
                Ok(r) => r,
                Err(e) => {
                    yield Err(UpstreamError::Transport(error_chain(&*e)));
                    return;
                }
            };
            let status = response.status();
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(std::time::Duration::from_secs);
            let max_error = limits.max_error_body_bytes;
            let not_events = not_an_event_stream(response.headers());
            let mut response = response.into_body();
            if !status.is_success() {
                let mut body = Vec::new();
                loop {
                    match lease.drive(response.frame()).await {
                        Some(Ok(frame)) => {
                            let Ok(bytes) = frame.into_data() else { continue };
                            let room = max_error.saturating_sub(body.len());
                            body.extend_from_slice(&bytes[..bytes.len().min(room)]);
                            if body.len() >= max_error {
                                break;
                            }
                        }
                        // Read whole: the connection can take the next request.
                        None => {
                            lease.release(&mut response);
                            break;
                        }
                        Some(Err(_)) => break,
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
            if let Some(other) = not_events {
                yield Err(UpstreamError::Protocol(format!(
                    "upstream answered {status} with content type {:?}, not an event stream",
                    truncate(&other, 100)
                )));
                return;
            }
            let mut parser = SseParser::with_max_event(limits.max_event_bytes);
            let mut events = Vec::new();
            let mut translator = Translator::default();
            loop {
                match lease.drive(response.frame()).await {
                    // Trailers carry nothing an event stream needs.
                    Some(Ok(frame)) => {
                        let Ok(bytes) = frame.into_data() else { continue };
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
                                Ok(Step::Done) => {
                                    lease.release(&mut response);
                                    return;
                                }
                                Err(e) => { yield Err(e); return; }
                            }
                        }
                    }
                    Some(Err(e)) => {
                        yield Err(UpstreamError::Transport(error_chain(&e)));
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
fn not_an_event_stream(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?;
    let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
    let essence = text.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("text/event-stream") {
        None
    } else {
        Some(text)
    }
}

/// How long an idle upstream connection is kept for the next request.
const IDLE_FOR: Duration = Duration::from_secs(30);

/// The most idle connections kept per upstream: after a burst of streams, at most this many
/// connections (about 20 KB each) wait for reuse.
const IDLE_MAX: usize = 1024;

/// `uri`'s path and query alone: a request's target in origin form.
fn origin_form(uri: &Uri) -> Uri {
    Uri::from(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    )
}

/// What opens the connections of an upstream that speaks `version`.
fn connector(
    version: HttpVersion,
) -> Result<hyper_rustls::HttpsConnector<HttpConnector>, OpenAiConfigError> {
    pool::connector(version).map_err(|e| OpenAiConfigError::Client(e.to_string()))
}

/// An error and its causes, as one line ("tcp connect error: Connection refused (os error
/// 111)"). hyper's errors carry no URL or header, so no key can be in it.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// A stream that fails at once with `error`.
fn error_stream(error: UpstreamError) -> ChunkStream {
    Box::pin(futures_util::stream::once(async move { Err(error) }))
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]
mod tests {
    use futures_util::StreamExt;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{mpsc, Notify};

    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::upstream::Chunk;

    /// Reads one request from `socket` (bytes read past it stay in `seen` for the next): its
    /// head, lowercased, and its body; `None` if the client closed the connection first.
    async fn read_request(socket: &mut TcpStream, seen: &mut Vec<u8>) -> Option<(String, String)> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map(|v| v.trim().parse::<usize>().unwrap())
                    .unwrap_or(0);
                if seen.len() >= end + 4 + length {
                    let body =
                        String::from_utf8_lossy(&seen[end + 4..end + 4 + length]).into_owned();
                    seen.drain(..end + 4 + length);
                    return Some((head, body));
                }
            }
            let n = socket.read(&mut buf).await.unwrap();
            if n == 0 {
                assert!(seen.is_empty(), "the request ended early");
                return None;
            }
            seen.extend_from_slice(&buf[..n]);
        }
    }

    /// An upstream's answer: one chunk and `[DONE]`, in a body of known length.
    fn answer() -> String {
        let events = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n";
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{events}",
            events.len()
        )
    }

    /// An upstream of one exchange on a real socket: returns what the request's head said
    /// (lowercased) and its body, answering with one chunk and `[DONE]`.
    async fn one_exchange(listener: TcpListener) -> (String, String) {
        let (mut socket, _) = listener.accept().await.unwrap();
        let request = read_request(&mut socket, &mut Vec::new()).await;
        socket.write_all(answer().as_bytes()).await.unwrap();
        request.expect("no request came")
    }

    /// What the upstream `make` builds sends, and what it makes of the answer.
    async fn exchange(
        make: impl FnOnce(&str) -> OpenAi,
    ) -> (String, String, Vec<Result<Chunk, UpstreamError>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/v1", listener.local_addr().unwrap());
        let upstream = make(&base);
        let mut body = serde_json::Map::new();
        body.insert("model".into(), json!("m"));
        body.insert("stream".into(), json!(true));
        body.insert(
            "messages".into(),
            json!([{"role": "user", "content": "hello"}]),
        );
        let ((head, sent), chunks) = tokio::join!(
            one_exchange(listener),
            upstream.open(UpstreamRequest { body }).collect::<Vec<_>>()
        );
        (head, sent, chunks)
    }

    #[tokio::test]
    async fn the_request_carries_its_key_as_a_bearer_token_with_the_extra_headers() {
        let (head, body, chunks) = exchange(|base| {
            OpenAi::new(
                base,
                Some("sk-test-key".into()),
                &[("x-extra".into(), "yes".into())],
                UpstreamLimits::default(),
            )
            .unwrap()
        })
        .await;
        assert!(
            head.starts_with("post /v1/chat/completions http/1.1\r\n"),
            "{head}"
        );
        for line in [
            "authorization: bearer sk-test-key",
            "content-type: application/json",
            "accept: */*",
            "x-extra: yes",
            "host: 127.0.0.1:",
        ] {
            assert!(head.contains(line), "no {line:?} in {head}");
        }
        assert!(!head.contains("x-api-key"), "{head}");
        let sent: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(sent["messages"][0]["content"], "hello");
        let chunks: Vec<Chunk> = chunks.into_iter().map(Result::unwrap).collect();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].content, "hi");
    }

    #[tokio::test]
    async fn an_anthropic_upstream_gets_its_key_as_x_api_key_at_messages() {
        // (The answer is OpenAI's, which this dialect refuses: only the request counts here.)
        let (head, _, _) = exchange(|base| {
            OpenAi::new(
                base,
                Some("sk-ant-key".into()),
                &[],
                UpstreamLimits::default(),
            )
            .unwrap()
            .anthropic()
        })
        .await;
        assert!(head.starts_with("post /v1/messages http/1.1\r\n"), "{head}");
        assert!(head.contains("x-api-key: sk-ant-key"), "{head}");
        assert!(head.contains("anthropic-version: "), "{head}");
        assert!(!head.contains("authorization"), "{head}");
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_transport_error_that_says_why() {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let upstream = OpenAi::new(
            &format!("http://127.0.0.1:{port}/v1"),
            Some("sk-secret".into()),
            &[],
            UpstreamLimits::default(),
        )
        .unwrap();
        let mut body = serde_json::Map::new();
        body.insert("stream".into(), json!(true));
        let first = upstream.open(UpstreamRequest { body }).next().await;
        match first {
            Some(Err(UpstreamError::Transport(message))) => {
                assert!(message.contains("connect"), "{message}");
                assert!(!message.contains("sk-secret"), "{message}");
            }
            other => panic!("expected a transport error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_https_upstream_is_spoken_to_in_tls() {
        // A listener that reads what the client sends first and then hangs up: over `https`
        // that must be a TLS handshake record (0x16, version 3.x), not an HTTP request line.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("https://{}/v1", listener.local_addr().unwrap());
        let upstream = OpenAi::new(&base, None, &[], UpstreamLimits::default()).unwrap();
        let first_bytes = async {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 3];
            socket.read_exact(&mut head).await.unwrap();
            head
        };
        let mut body = serde_json::Map::new();
        body.insert("stream".into(), json!(true));
        let (head, first) = tokio::join!(first_bytes, async {
            upstream.open(UpstreamRequest { body }).next().await
        });
        assert_eq!(
            head[..2],
            [0x16, 0x03],
            "not a TLS handshake record: {head:?}"
        );
        assert!(
            matches!(first, Some(Err(UpstreamError::Transport(_)))),
            "{first:?}"
        );
    }

    /// An upstream that answers every request on every connection it accepts (keep-alive: one
    /// chunk and `[DONE]` each); given `hang_up`, it closes a connection after one answer once
    /// that is notified. Returns how many connections it accepted, and a receiver told each time
    /// a connection ends.
    fn keep_alive_upstream(
        listener: TcpListener,
        hang_up: Option<Arc<Notify>>,
    ) -> (Arc<AtomicUsize>, mpsc::UnboundedReceiver<()>) {
        answering(listener, hang_up, |_| answer())
    }

    /// [`keep_alive_upstream`], answering the `n`th request of each connection (from 0) with
    /// `answer(n)`.
    fn answering(
        listener: TcpListener,
        hang_up: Option<Arc<Notify>>,
        answer: fn(usize) -> String,
    ) -> (Arc<AtomicUsize>, mpsc::UnboundedReceiver<()>) {
        let accepted = Arc::new(AtomicUsize::new(0));
        let (ended, ends) = mpsc::unbounded_channel();
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let (ended, hang_up) = (ended.clone(), hang_up.clone());
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut n = 0;
                    while read_request(&mut socket, &mut seen).await.is_some() {
                        socket.write_all(answer(n).as_bytes()).await.unwrap();
                        n += 1;
                        if let Some(hang_up) = &hang_up {
                            hang_up.notified().await;
                            break;
                        }
                    }
                    drop(socket);
                    let _ = ended.send(());
                });
            }
        });
        (accepted, ends)
    }

    fn request() -> UpstreamRequest {
        let mut body = serde_json::Map::new();
        body.insert("stream".into(), json!(true));
        UpstreamRequest { body }
    }

    /// The text of each chunk of one stream from `upstream`, which must succeed.
    async fn contents(upstream: &OpenAi) -> Vec<String> {
        let chunks: Vec<_> = upstream.open(request()).collect().await;
        chunks.into_iter().map(|c| c.unwrap().content).collect()
    }

    async fn listening() -> (TcpListener, OpenAi) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/v1", listener.local_addr().unwrap());
        let upstream = OpenAi::new(&base, None, &[], UpstreamLimits::default()).unwrap();
        (listener, upstream)
    }

    #[tokio::test]
    async fn streams_one_after_another_share_one_connection() {
        let (listener, upstream) = listening().await;
        let (accepted, _) = keep_alive_upstream(listener, None);
        for _ in 0..3 {
            assert_eq!(contents(&upstream).await, ["hi"]);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(upstream.pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn an_error_answer_read_whole_leaves_its_connection_for_the_next_stream() {
        let (listener, upstream) = listening().await;
        let (accepted, _) = answering(listener, None, |n| match n {
            0 => {
                let error = r#"{"error":{"message":"slow down"}}"#;
                format!(
                    "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{error}",
                    error.len()
                )
            }
            _ => answer(),
        });
        let first: Vec<_> = upstream.open(request()).collect().await;
        assert!(
            matches!(&first[..], [Err(UpstreamError::Status { status: 429, message, .. })] if message == "slow down"),
            "{first:?}"
        );
        assert_eq!(upstream.pool.idle_count(), 1);
        assert_eq!(contents(&upstream).await, ["hi"]);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_used_again() {
        let (listener, upstream) = listening().await;
        let hang_up = Arc::new(Notify::new());
        let (accepted, mut ends) = keep_alive_upstream(listener, Some(hang_up.clone()));
        for _ in 0..3 {
            assert_eq!(contents(&upstream).await, ["hi"]);
            // Kept (the answer did not say it would close), then closed by the upstream.
            assert_eq!(upstream.pool.idle_count(), 1);
            hang_up.notify_one();
            ends.recv().await.unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_stream_dropped_midway_closes_its_connection() {
        let (listener, upstream) = listening().await;
        let upstream_side = async {
            let (mut socket, _) = listener.accept().await.unwrap();
            read_request(&mut socket, &mut Vec::new()).await.unwrap();
            let event = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
            let chunk = format!("{head}{:x}\r\n{event}\r\n", event.len());
            socket.write_all(chunk.as_bytes()).await.unwrap();
            // The stream goes on as far as the upstream knows, until the gateway hangs up.
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut rest));
            read.await.expect("the connection was left open").unwrap();
            rest
        };
        let gateway_side = async {
            let mut stream = upstream.open(request());
            assert_eq!(stream.next().await.unwrap().unwrap().content, "hi");
        };
        let (rest, ()) = tokio::join!(upstream_side, gateway_side);
        assert!(rest.is_empty(), "{rest:?}");
        assert_eq!(upstream.pool.idle_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_at_its_age_limit() {
        let (listener, upstream) = listening().await;
        let (_, mut ends) = keep_alive_upstream(listener, None);
        assert_eq!(contents(&upstream).await, ["hi"]);
        assert_eq!(upstream.pool.idle_count(), 1);
        tokio::time::sleep(IDLE_FOR - Duration::from_secs(1)).await;
        assert_eq!(upstream.pool.idle_count(), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(upstream.pool.idle_count(), 0);
        ends.recv().await.unwrap();
    }

    #[tokio::test]
    async fn no_more_than_the_most_idle_connections_are_kept() {
        let (listener, mut upstream) = listening().await;
        upstream.pool = Pool::new(
            connector(HttpVersion::Auto).unwrap(),
            upstream.uri.clone(),
            HttpVersion::Auto,
            1,
            IDLE_FOR,
        );
        let (accepted, _) = keep_alive_upstream(listener, None);
        let (a, b) = tokio::join!(contents(&upstream), contents(&upstream));
        assert_eq!((a, b), (vec!["hi".to_string()], vec!["hi".to_string()]));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(upstream.pool.idle_count(), 1);
    }

    /// What the HTTP/2 (or TLS) upstream of these tests saw.
    #[derive(Debug, PartialEq)]
    enum Seen {
        /// A request: its HTTP version, method, URI, and `authorization` header.
        Request(hyper::Version, String, String, Option<String>),
        /// A stream's answer was dropped before its end (the stream was reset, or its
        /// connection closed).
        Dropped,
        /// A connection ended.
        Closed,
    }

    /// Sends `Seen::Dropped` when dropped.
    struct OnDrop(mpsc::UnboundedSender<Seen>);

    impl Drop for OnDrop {
        fn drop(&mut self) {
            let _ = self.0.send(Seen::Dropped);
        }
    }

    type AnswerBody = http_body_util::StreamBody<
        std::pin::Pin<
            Box<
                dyn futures_util::Stream<
                        Item = Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
                    > + Send,
            >,
        >,
    >;

    /// How many 1 KiB events the upstream of these tests has yielded to its HTTP/2 stack for
    /// answers that ask `"flood": true` (all tests' upstreams together: one test floods).
    static FLOODED: AtomicUsize = AtomicUsize::new(0);

    /// An answer: one chunk and `[DONE]`; if the request's body asks `"hang": true`, one chunk
    /// and then nothing (until the stream is dropped, which `seen` is told); if it asks
    /// `"flood": true`, 1 KiB events for as long as its HTTP/2 stream takes them, counted in
    /// [`FLOODED`].
    async fn answer_h(
        request: hyper::Request<Incoming>,
        seen: mpsc::UnboundedSender<Seen>,
    ) -> Result<hyper::Response<AnswerBody>, std::convert::Infallible> {
        let key = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_string());
        let _ = seen.send(Seen::Request(
            request.version(),
            request.method().to_string(),
            request.uri().to_string(),
            key,
        ));
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let asked = serde_json::from_slice::<serde_json::Value>(&body).unwrap();
        let (hang, flood) = (asked["hang"] == true, asked["flood"] == true);
        let frames: std::pin::Pin<Box<dyn futures_util::Stream<Item = _> + Send>> = Box::pin(
            async_stream::stream! {
                let _guard = OnDrop(seen);
                let chunk = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
                yield Ok(hyper::body::Frame::data(Bytes::from(chunk)));
                if flood {
                    let text = "x".repeat(1024 - chunk.len());
                    let event = format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n");
                    loop {
                        FLOODED.fetch_add(1, Ordering::SeqCst);
                        yield Ok(hyper::body::Frame::data(Bytes::from(event.clone())));
                    }
                }
                if hang {
                    std::future::pending::<()>().await;
                }
                yield Ok(hyper::body::Frame::data(Bytes::from("data: [DONE]\n\n")));
            },
        );
        let mut response = hyper::Response::new(http_body_util::StreamBody::new(frames));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        Ok(response)
    }

    /// Serves `io` as HTTP/2 (or HTTP/1.1 if `http1`) with [`answer_h`] until it ends.
    async fn serve_h<I>(io: I, http1: bool, seen: mpsc::UnboundedSender<Seen>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let io = hyper_util::rt::TokioIo::new(io);
        let on_request = seen.clone();
        let service =
            hyper::service::service_fn(move |request| answer_h(request, on_request.clone()));
        if http1 {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        } else {
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .max_concurrent_streams(1000)
                .serve_connection(io, service)
                .await;
        }
        let _ = seen.send(Seen::Closed);
    }

    /// An h2c upstream (HTTP/2 over TCP with prior knowledge) on `listener`: how many
    /// connections it accepted, and what it saw.
    fn h2c_upstream(listener: TcpListener) -> (Arc<AtomicUsize>, mpsc::UnboundedReceiver<Seen>) {
        let accepted = Arc::new(AtomicUsize::new(0));
        let (seen, events) = mpsc::unbounded_channel();
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_h(socket, false, seen.clone()));
            }
        });
        (accepted, events)
    }

    async fn h2c_listening() -> (TcpListener, OpenAi) {
        let (listener, upstream) = listening().await;
        let upstream = upstream.http_version(HttpVersion::Http2).unwrap();
        (listener, upstream)
    }

    fn hanging() -> UpstreamRequest {
        let mut request = request();
        request.body.insert("hang".into(), json!(true));
        request
    }

    #[tokio::test]
    async fn h2c_streams_share_one_connection_and_carry_their_request() {
        let (listener, upstream) = h2c_listening().await;
        let (accepted, mut seen) = h2c_upstream(listener);
        let upstream = upstream;
        let key_upstream = OpenAi::new(
            &format!("http://{}/v1", upstream.uri.authority().unwrap()),
            Some("sk-h2".into()),
            // HTTP/1's, which HTTP/2 forbids: left out (by hyper), not a failed request.
            &[
                ("connection".into(), "keep-alive".into()),
                ("keep-alive".into(), "timeout=5".into()),
            ],
            UpstreamLimits::default(),
        )
        .unwrap()
        .http_version(HttpVersion::Http2)
        .unwrap();
        // One with a key, to see what it sends, then five at once and three one after another.
        assert_eq!(contents(&key_upstream).await, ["hi"]);
        let Some(Seen::Request(version, method, uri, key)) = seen.recv().await else {
            panic!("no request");
        };
        assert_eq!(version, hyper::Version::HTTP_2);
        assert_eq!(method, "POST");
        assert_eq!(
            uri,
            format!(
                "http://{}/v1/chat/completions",
                upstream.uri.authority().unwrap()
            )
        );
        assert_eq!(key.as_deref(), Some("Bearer sk-h2"));
        let five = futures_util::future::join_all((0..5).map(|_| contents(&upstream))).await;
        assert!(five.iter().all(|c| c == &["hi"]), "{five:?}");
        for _ in 0..3 {
            assert_eq!(contents(&upstream).await, ["hi"]);
        }
        // The keyed upstream is another pool: its own connection, the rest one.
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(upstream.pool.http2_count(), 1);
        assert_eq!(upstream.pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn an_h2c_stream_dropped_midway_resets_only_itself() {
        let (listener, upstream) = h2c_listening().await;
        let (accepted, mut seen) = h2c_upstream(listener);
        let mut left = upstream.open(hanging());
        let mut stays = upstream.open(hanging());
        assert_eq!(left.next().await.unwrap().unwrap().content, "hi");
        assert_eq!(stays.next().await.unwrap().unwrap().content, "hi");
        drop(left);
        // The upstream sees that one answer go, and its connection stay.
        let mut events = Vec::new();
        while events
            .iter()
            .filter(|e| matches!(e, Seen::Request(..)))
            .count()
            < 2
            || !events.contains(&Seen::Dropped)
        {
            events.push(seen.recv().await.unwrap());
        }
        assert!(!events.contains(&Seen::Closed), "{events:?}");
        assert_eq!(
            events.iter().filter(|e| **e == Seen::Dropped).count(),
            1,
            "{events:?}"
        );
        // The other stream and a new one still have the connection.
        assert_eq!(contents(&upstream).await, ["hi"]);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        drop(stays);
        assert_eq!(
            seen.recv().await.unwrap(),
            Seen::Request(
                hyper::Version::HTTP_2,
                "POST".into(),
                format!(
                    "http://{}/v1/chat/completions",
                    upstream.uri.authority().unwrap()
                ),
                None,
            )
        );
    }

    #[tokio::test]
    async fn more_h2c_streams_than_one_connection_carries_open_another() {
        let (listener, upstream) = h2c_listening().await;
        let (accepted, _seen) = h2c_upstream(listener);
        let mut streams = Vec::new();
        for _ in 0..=pool::H2_STREAMS {
            let mut stream = upstream.open(hanging());
            assert_eq!(stream.next().await.unwrap().unwrap().content, "hi");
            streams.push(stream);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(upstream.pool.http2_count(), 2);
        // A place given back is taken again before a third connection is opened.
        streams.truncate(pool::H2_STREAMS - 1);
        for _ in 0..2 {
            let mut stream = upstream.open(hanging());
            assert_eq!(stream.next().await.unwrap().unwrap().content, "hi");
            streams.push(stream);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_h2c_stream_read_slowly_holds_at_most_its_window() {
        let (listener, upstream) = h2c_listening().await;
        let (_, _seen) = h2c_upstream(listener);
        let mut request = request();
        request.body.insert("flood".into(), json!(true));
        let mut stream = upstream.open(request);
        assert_eq!(stream.next().await.unwrap().unwrap().content, "hi");
        // Nobody reads for a while: the upstream may send what the window lets it, no more.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let window = pool::H2_STREAM_WINDOW as usize / 1024;
        let sent = FLOODED.load(Ordering::SeqCst);
        assert!(
            (window / 2..=window + 2).contains(&sent),
            "{sent} KiB sent to a stream nobody read (window {window} KiB)"
        );
        // Reading on lets it send on.
        for _ in 0..2 * window {
            let text = stream.next().await.unwrap().unwrap().content;
            assert!(
                !text.is_empty() && text.bytes().all(|b| b == b'x'),
                "{text}"
            );
        }
        assert!(FLOODED.load(Ordering::SeqCst) > window + 2);
    }

    #[tokio::test]
    async fn an_h2c_upstream_that_says_goaway_gets_the_next_stream_on_a_new_connection() {
        // An upstream that, on each connection, answers one request and says GOAWAY at once
        // (a server going down gracefully, or rotating its connections).
        let (listener, upstream) = h2c_listening().await;
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let (ended, mut ends) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let ended = ended.clone();
                tokio::spawn(async move {
                    let asked = Arc::new(Notify::new());
                    let (seen, _events) = mpsc::unbounded_channel();
                    let on_request = asked.clone();
                    let service = hyper::service::service_fn(move |request| {
                        on_request.notify_one();
                        answer_h(request, seen.clone())
                    });
                    let connection = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(socket), service);
                    let mut connection = std::pin::pin!(connection);
                    tokio::select! {
                        _ = connection.as_mut() => {}
                        () = asked.notified() => {
                            connection.as_mut().graceful_shutdown();
                            let _ = connection.await;
                        }
                    }
                    let _ = ended.send(());
                });
            }
        });
        // One after another: a stream sent while the GOAWAY is on its way is either taken by
        // the old connection (HTTP/2's graceful shutdown lets the streams it has not yet
        // refused in) or sent on a new one; none fails.
        for _ in 0..5 {
            assert_eq!(contents(&upstream).await, ["hi"]);
        }
        assert!(accepted.load(Ordering::SeqCst) >= 2);
        // Once every connection has been closed by the upstream, the next stream opens a new
        // one.
        let mut closed = 0;
        while closed < accepted.load(Ordering::SeqCst) {
            ends.recv().await.unwrap();
            closed += 1;
        }
        let before = accepted.load(Ordering::SeqCst);
        assert_eq!(contents(&upstream).await, ["hi"]);
        assert_eq!(accepted.load(Ordering::SeqCst), before + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_h2c_upstream_that_stops_answering_fails_its_stream_after_the_ping_timeout() {
        // The upstream behind a relay that, once told, forwards nothing more either way and
        // holds both sockets open: a peer gone silent, with no reset or close to notice.
        let (front, upstream) = h2c_listening().await;
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_at = backend.local_addr().unwrap();
        let (_, _seen) = h2c_upstream(backend);
        let (freeze, frozen) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let (mut client, _) = front.accept().await.unwrap();
            let mut server = TcpStream::connect(backend_at).await.unwrap();
            let mut frozen = frozen;
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = frozen.wait_for(|f| *f) => {}
            }
            std::future::pending::<()>().await;
            drop((client, server));
        });
        let mut stream = upstream.open(hanging());
        assert_eq!(stream.next().await.unwrap().unwrap().content, "hi");
        freeze.send(true).unwrap();
        let silent = tokio::time::Instant::now();
        let next = tokio::time::timeout(Duration::from_secs(120), stream.next())
            .await
            .expect("a silent upstream was waited for without end");
        let waited = silent.elapsed();
        assert!(
            matches!(next, Some(Err(UpstreamError::Transport(_)))),
            "{next:?}"
        );
        // A ping at most an interval after the silence began, then its timeout.
        assert!(
            waited >= pool::H2_PING_TIMEOUT
                && waited
                    <= pool::H2_PING_INTERVAL + pool::H2_PING_TIMEOUT + Duration::from_secs(1),
            "failed after {waited:?}"
        );
        // The dead connection is not offered to the next stream.
        assert_eq!(upstream.pool.http2_count(), 0);
    }

    #[tokio::test]
    async fn a_burst_of_first_h2c_streams_opens_one_connection() {
        let (listener, upstream) = h2c_listening().await;
        let (accepted, _seen) = h2c_upstream(listener);
        let all = futures_util::future::join_all((0..20).map(|_| contents(&upstream))).await;
        assert!(all.iter().all(|c| c == &["hi"]), "{all:?}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_h2c_connection_without_streams_is_closed_at_its_age_limit() {
        let (listener, upstream) = h2c_listening().await;
        let (_, mut seen) = h2c_upstream(listener);
        assert_eq!(contents(&upstream).await, ["hi"]);
        tokio::time::sleep(IDLE_FOR - Duration::from_secs(1)).await;
        assert_eq!(upstream.pool.http2_count(), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(upstream.pool.http2_count(), 0);
        loop {
            if seen.recv().await.unwrap() == Seen::Closed {
                break;
            }
        }
    }

    #[tokio::test]
    async fn http2_asked_of_an_http1_upstream_fails_as_a_transport_error() {
        let (listener, upstream) = h2c_listening().await;
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let (seen, _events) = mpsc::unbounded_channel();
            serve_h(socket, true, seen).await;
        });
        let first: Vec<_> = upstream.open(request()).collect().await;
        assert!(
            matches!(&first[..], [Err(UpstreamError::Transport(_))]),
            "{first:?}"
        );
    }

    /// An `https` upstream on `listener` for `localhost`, offering `alpn` (e.g. `["h2",
    /// "http/1.1"]`): what it saw; and a connector that trusts its certificate.
    fn tls_upstream(
        listener: TcpListener,
        alpn: &[&str],
        version: HttpVersion,
    ) -> (
        mpsc::UnboundedReceiver<Seen>,
        hyper_rustls::HttpsConnector<HttpConnector>,
    ) {
        tls_upstream_holding(listener, alpn, version, 0)
    }

    /// [`tls_upstream`], which does not finish the TLS handshake of any connection but the
    /// first until it has accepted `hold_until` connections (0: none held).
    fn tls_upstream_holding(
        listener: TcpListener,
        alpn: &[&str],
        version: HttpVersion,
        hold_until: usize,
    ) -> (
        mpsc::UnboundedReceiver<Seen>,
        hyper_rustls::HttpsConnector<HttpConnector>,
    ) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = certified.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der())
            .unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (seen, events) = mpsc::unbounded_channel();
        let (count, counted) = tokio::sync::watch::channel(0usize);
        tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                count.send_modify(|n| *n += 1);
                let first = *count.borrow() == 1;
                let (acceptor, seen, mut counted) =
                    (acceptor.clone(), seen.clone(), counted.clone());
                tokio::spawn(async move {
                    if !first {
                        let _ = counted.wait_for(|n| *n >= hold_until).await;
                    }
                    let Ok(tls) = acceptor.accept(socket).await else {
                        let _ = seen.send(Seen::Closed);
                        return;
                    };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    serve_h(tls, !h2, seen).await;
                });
            }
        });
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        (events, pool::connector_trusting(roots, version))
    }

    /// An upstream at `https://localhost:{port}/v1` speaking `version`, over `connector`.
    fn over_tls(
        port: u16,
        version: HttpVersion,
        connector: hyper_rustls::HttpsConnector<HttpConnector>,
    ) -> OpenAi {
        let mut upstream = OpenAi::new(
            &format!("https://localhost:{port}/v1"),
            None,
            &[],
            UpstreamLimits::default(),
        )
        .unwrap();
        upstream.pool = Pool::new(connector, upstream.uri.clone(), version, IDLE_MAX, IDLE_FOR);
        upstream
    }

    /// The HTTP version of the first request an upstream saw.
    async fn version_seen(seen: &mut mpsc::UnboundedReceiver<Seen>) -> hyper::Version {
        match seen.recv().await {
            Some(Seen::Request(version, ..)) => version,
            other => panic!("no request: {other:?}"),
        }
    }

    #[tokio::test]
    async fn auto_over_tls_speaks_http2_where_offered_and_http1_where_not() {
        for (alpn, spoken) in [
            (&["h2", "http/1.1"][..], hyper::Version::HTTP_2),
            (&["http/1.1"][..], hyper::Version::HTTP_11),
            // A server that takes no ALPN at all: HTTP/1.1.
            (&[][..], hyper::Version::HTTP_11),
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let (mut seen, connector) = tls_upstream(listener, alpn, HttpVersion::Auto);
            let upstream = over_tls(port, HttpVersion::Auto, connector);
            assert_eq!(contents(&upstream).await, ["hi"], "{alpn:?}");
            assert_eq!(version_seen(&mut seen).await, spoken, "{alpn:?}");
            let http2 = spoken == hyper::Version::HTTP_2;
            assert_eq!(upstream.pool.http2_count(), usize::from(http2), "{alpn:?}");
            // A burst after an HTTP/1.1 answer does not wait for one connection at a time.
            assert_eq!(upstream.pool.may_share(), http2, "{alpn:?}");
        }
    }

    #[tokio::test]
    async fn a_burst_to_a_tls_upstream_that_answers_http1_does_not_connect_one_at_a_time() {
        // An upstream that finishes the TLS handshake of any connection after its first only
        // once it has three: if the burst's streams still waited for each other's connection
        // after the first had shown HTTP/1.1, the second would wait for a third that never
        // comes.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (_seen, connector) =
            tls_upstream_holding(listener, &["http/1.1"], HttpVersion::Auto, 3);
        let upstream = over_tls(port, HttpVersion::Auto, connector);
        let burst = futures_util::future::join_all((0..3).map(|_| contents(&upstream)));
        let all = tokio::time::timeout(Duration::from_secs(20), burst)
            .await
            .expect("the burst's connections were opened one at a time");
        assert!(all.iter().all(|c| c == &["hi"]), "{all:?}");
    }

    #[tokio::test]
    async fn http2_over_tls_requires_the_upstream_to_offer_it() {
        for (alpn, why) in [
            // The server refuses a client that offers none of its protocols (TLS's alert).
            (&["http/1.1"][..], "NoApplicationProtocol"),
            // A server that takes no ALPN at all: sluice says why it will not go on.
            (&[][..], "did not offer HTTP/2"),
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let (_seen, connector) = tls_upstream(listener, alpn, HttpVersion::Http2);
            let upstream = over_tls(port, HttpVersion::Http2, connector);
            let first: Vec<_> = upstream.open(request()).collect().await;
            match &first[..] {
                [Err(UpstreamError::Transport(message))] => {
                    assert!(message.contains(why), "{message}")
                }
                other => panic!("{alpn:?}: {other:?}"),
            }
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (mut seen, connector) = tls_upstream(listener, &["h2"], HttpVersion::Http2);
        let upstream = over_tls(port, HttpVersion::Http2, connector);
        assert_eq!(contents(&upstream).await, ["hi"]);
        assert_eq!(version_seen(&mut seen).await, hyper::Version::HTTP_2);
    }

    #[test]
    fn a_base_url_that_is_not_http_is_refused_at_start() {
        for bad in [
            "127.0.0.1:9000/v1",
            "ftp://host/v1",
            "not a url",
            "http:///v1",
        ] {
            assert!(
                matches!(
                    OpenAi::new(bad, None, &[], UpstreamLimits::default()),
                    Err(OpenAiConfigError::Url(_))
                ),
                "{bad} was accepted"
            );
        }
    }
}
