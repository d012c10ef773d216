//! The edge: what every request passes before it reaches a handler, and what every response
//! carries out.
//!
//! - **Host check** (keyless gateways only). Without keys anyone who can reach sluice can use it,
//!   which is why it then listens on loopback only. A web page can still reach a loopback
//!   server through DNS rebinding (`attacker.example` re-resolved to 127.0.0.1), but its requests
//!   then say `Host: attacker.example`. So a keyless gateway answers only requests whose `Host`
//!   is in `allowed_hosts` (loopback names by default); others get `403 host_not_allowed`.
//! - **Origin check** (always). A browser names the page that makes a request in `Origin`. A
//!   request whose origin is neither the gateway itself nor in `cors_origins` gets
//!   `403 origin_not_allowed`, so a page the user happens to visit cannot spend the operator's
//!   upstream quota or read a transcript. Requests without `Origin` (curl, SDKs) pass. Allowed
//!   cross-origin requests get CORS headers, and their preflights an answer.
//! - **Request id and access log.** Every response carries `x-request-id` (the client's, if it
//!   sent a sane one, else a new one), and every request gets one access log line when its
//!   response body ends: method, path, status, request id, stream id, tenant and duration. Never
//!   a key, a query string or a prompt.
//! - **Body pieces.** A response body reaches hyper in pieces of at most [`WRITE_PIECE`] bytes,
//!   which bounds what each connection's write buffer keeps (see `server.rs`).

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, STREAM_ID_HEADER};

/// The response header that carries the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The longest client-sent request id kept; longer (or odd) ones are replaced.
const MAX_REQUEST_ID: usize = 64;

/// What the edge checks, from the configuration.
#[derive(Debug, Clone)]
pub struct EdgePolicy {
    /// `Some(hosts)`: only these host names (lowercase, without port) are answered. `None`: any.
    pub allowed_hosts: Option<Arc<[String]>>,
    /// Origins allowed to call from a browser (lowercase, no trailing slash); `*` allows all.
    pub cors_origins: Arc<[String]>,
}

/// The tenant a request was made for, put in the response's extensions by authentication so
/// the access log can name it.
#[derive(Debug, Clone)]
pub struct TenantName(pub Arc<str>);

/// The host name of a `Host` header value, lowercase and without its port.
fn host_name(host: &str) -> String {
    let host = host.trim();
    let name = if host.starts_with('[') {
        // [::1]:8750
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.to_ascii_lowercase()
}

/// The `host[:port]` of an origin (`https://app.example:8443` → `app.example:8443`).
fn origin_authority(origin: &str) -> Option<&str> {
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
}

/// Why the edge refuses a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The `Host` is not an allowed name.
    Host,
    /// The `Origin` is neither this gateway nor allowed.
    Origin,
}

impl EdgePolicy {
    /// Whether a request with these headers may go on; `Ok(Some(origin))` when it is an
    /// allowed cross-origin request that gets CORS headers.
    pub fn check(&self, headers: &HeaderMap) -> Result<Option<String>, Refusal> {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if let Some(allowed) = &self.allowed_hosts {
            // A request with no Host at all (HTTP/1.0) does not come from a browser.
            if !host.is_empty() {
                let name = host_name(host);
                if !allowed.iter().any(|a| a == "*" || *a == name) {
                    return Err(Refusal::Host);
                }
            }
        }
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(None);
        };
        let origin = origin
            .to_str()
            .map_err(|_| Refusal::Origin)?
            .trim_end_matches('/')
            .to_ascii_lowercase();
        // Same origin: the gateway's own page.
        if origin_authority(&origin).is_some_and(|a| a.eq_ignore_ascii_case(host)) {
            return Ok(None);
        }
        if self.cors_origins.iter().any(|o| o == "*" || *o == origin) {
            return Ok(Some(origin));
        }
        Err(Refusal::Origin)
    }
}

fn refused(why: Refusal) -> Response {
    let (code, message) = match why {
        Refusal::Host => (
            "host_not_allowed",
            "this gateway does not answer to that Host name; add it to allowed_hosts",
        ),
        Refusal::Origin => (
            "origin_not_allowed",
            "requests from this web origin are not allowed; add it to cors_origins",
        ),
    };
    ApiError::new(StatusCode::FORBIDDEN, "permission_error", message)
        .with_code(code)
        .into_response()
}

fn cors_headers(response: &mut Response, origin: &str) {
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.append(header::VARY, HeaderValue::from_static("origin"));
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("x-sluice-stream-id, x-request-id"),
    );
}

/// A client's request id if it is short and plain, else a new one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= MAX_REQUEST_ID
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

/// Writes the access log line when dropped: when the response body has ended (or the client
/// left), so the duration covers the whole stream.
///
/// It lives as long as its response, idle streams' included, so its text (path, request id,
/// stream id) is one allocation rather than three.
struct AccessLog {
    method: Method,
    /// The path, then the request id, then the stream id (empty when none).
    text: Box<str>,
    path_end: u32,
    id_end: u32,
    status: u16,
    tenant: Option<Arc<str>>,
    started: Instant,
}

impl AccessLog {
    fn new(
        method: Method,
        path: &str,
        status: u16,
        request_id: &str,
        stream: Option<&str>,
        tenant: Option<Arc<str>>,
        started: Instant,
    ) -> Self {
        let stream = stream.unwrap_or("");
        let mut text = String::with_capacity(path.len() + request_id.len() + stream.len());
        text.push_str(path);
        let path_end = u32::try_from(text.len()).unwrap_or(0);
        text.push_str(request_id);
        let id_end = u32::try_from(text.len()).unwrap_or(0);
        text.push_str(stream);
        Self {
            method,
            text: text.into_boxed_str(),
            path_end,
            id_end,
            status,
            tenant,
            started,
        }
    }

    /// Part `from..to` of the text (`None`: to its end); empty if the bounds are not its own.
    fn part(&self, from: u32, to: Option<u32>) -> &str {
        let from = from as usize;
        let got = match to {
            Some(to) => self.text.get(from..to as usize),
            None => self.text.get(from..),
        };
        got.unwrap_or("")
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let stream = self.part(self.id_end, None);
        tracing::info!(
            target: "sluice::access",
            method = %self.method,
            path = %self.part(0, Some(self.path_end)),
            status = self.status,
            request_id = %self.part(self.path_end, Some(self.id_end)),
            stream = if stream.is_empty() { "-" } else { stream },
            tenant = self.tenant.as_deref().unwrap_or("-"),
            duration_ms = (self.started.elapsed().as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
            "request"
        );
    }
}

/// The edge middleware (see the module docs); the router's outermost layer.
pub async fn edge(State(policy): State<EdgePolicy>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(request.headers());
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let checked = policy.check(request.headers());
    let preflight = method == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = match &checked {
        Err(why) => refused(*why),
        Ok(Some(_)) if preflight => {
            let mut r = StatusCode::NO_CONTENT.into_response();
            let h = r.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(
                    "authorization, content-type, last-event-id, x-request-id",
                ),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
            r
        }
        Ok(_) => next.run(request).await,
    };
    if let Ok(Some(origin)) = &checked {
        cors_headers(&mut response, origin);
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    let log = AccessLog::new(
        method,
        &path,
        response.status().as_u16(),
        &id,
        response
            .headers()
            .get(STREAM_ID_HEADER)
            .and_then(|v| v.to_str().ok()),
        response
            .extensions()
            .get::<TenantName>()
            .map(|t| t.0.clone()),
        started,
    );
    let (parts, body) = response.into_parts();
    Response::from_parts(
        parts,
        Body::new(Outgoing {
            inner: body,
            rest: None,
            _log: log,
        }),
    )
}

/// The most bytes of a response body handed to hyper at once.
///
/// hyper copies each piece of a body into the connection's write buffer (`server.rs` says
/// why), and that buffer keeps the largest size it has been for the connection's life: cut to
/// this, no body grows it past twice its 8 KB, where one transcript page (~256 KB) or one
/// coalesced write of a stream (64 KB) would.
pub const WRITE_PIECE: usize = 8 * 1024;

/// A response body as hyper is given it: data in pieces of at most [`WRITE_PIECE`] bytes (a
/// larger frame is cut without copying), and the request's access log line, written when the
/// body is dropped (when the response has ended, or the client has left).
struct Outgoing {
    inner: Body,
    /// What is left of the frame being cut (boxed: rare, and the body lives as long as its
    /// stream).
    rest: Option<Box<Bytes>>,
    _log: AccessLog,
}

impl http_body::Body for Outgoing {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        let this = self.get_mut();
        if let Some(rest) = &mut this.rest {
            let piece = next_piece(rest);
            if rest.is_empty() {
                this.rest = None;
            }
            return Poll::Ready(Some(Ok(http_body::Frame::data(piece))));
        }
        let frame = match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        Poll::Ready(Some(Ok(match frame.into_data() {
            Ok(mut data) => {
                let piece = next_piece(&mut data);
                if !data.is_empty() {
                    this.rest = Some(Box::new(data));
                }
                http_body::Frame::data(piece)
            }
            Err(frame) => frame,
        })))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.as_ref().map_or(0, |r| r.len() as u64);
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

/// The first [`WRITE_PIECE`] bytes of `data`, which keeps the rest (no copy).
fn next_piece(data: &mut Bytes) -> Bytes {
    if data.len() > WRITE_PIECE {
        data.split_to(WRITE_PIECE)
    } else {
        std::mem::take(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(hosts: Option<&[&str]>, origins: &[&str]) -> EdgePolicy {
        EdgePolicy {
            allowed_hosts: hosts.map(|h| h.iter().map(|s| s.to_string()).collect()),
            cors_origins: origins.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn host_names_lose_their_port_and_case() {
        assert_eq!(host_name("LocalHost:8750"), "localhost");
        assert_eq!(host_name("127.0.0.1"), "127.0.0.1");
        assert_eq!(host_name("[::1]:8750"), "[::1]");
        assert_eq!(host_name("evil.example:80"), "evil.example");
    }

    #[test]
    fn hosts_and_origins() {
        let p = policy(Some(&["localhost", "127.0.0.1"]), &["https://app.example"]);
        assert_eq!(p.check(&headers(&[("host", "localhost:8750")])), Ok(None));
        assert_eq!(p.check(&headers(&[])), Ok(None));
        assert_eq!(
            p.check(&headers(&[("host", "attacker.example:8750")])),
            Err(Refusal::Host)
        );
        // The gateway's own page.
        assert_eq!(
            p.check(&headers(&[
                ("host", "127.0.0.1:8750"),
                ("origin", "http://127.0.0.1:8750")
            ])),
            Ok(None)
        );
        // A page elsewhere, even on loopback.
        for origin in ["http://127.0.0.1:9999", "https://evil.example", "null"] {
            assert_eq!(
                p.check(&headers(&[("host", "localhost:8750"), ("origin", origin)])),
                Err(Refusal::Origin),
                "{origin}"
            );
        }
        assert_eq!(
            p.check(&headers(&[
                ("host", "localhost:8750"),
                ("origin", "https://APP.example/")
            ])),
            Ok(Some("https://app.example".into()))
        );
        // With keys there is no host list.
        let open = policy(None, &[]);
        assert_eq!(open.check(&headers(&[("host", "gw.example")])), Ok(None));
    }

    #[test]
    fn request_ids_are_kept_only_when_plain() {
        assert_eq!(request_id(&headers(&[("x-request-id", "abc-1")])), "abc-1");
        let long = "a".repeat(65);
        assert_ne!(request_id(&headers(&[("x-request-id", &long)])), long);
        assert_ne!(request_id(&headers(&[("x-request-id", "a b")])), "a b");
        assert_eq!(request_id(&headers(&[])).len(), 32);
    }

    fn quiet_log() -> AccessLog {
        AccessLog::new(Method::GET, "/", 200, "r", None, None, Instant::now())
    }

    #[test]
    fn an_access_log_keeps_its_parts_in_one_text() {
        let log = AccessLog::new(
            Method::POST,
            "/v1/chat/completions",
            200,
            "req-1",
            Some("0193-abc"),
            None,
            Instant::now(),
        );
        assert_eq!(log.part(0, Some(log.path_end)), "/v1/chat/completions");
        assert_eq!(log.part(log.path_end, Some(log.id_end)), "req-1");
        assert_eq!(log.part(log.id_end, None), "0193-abc");
        let none = AccessLog::new(Method::GET, "/", 404, "r", None, None, Instant::now());
        assert_eq!(none.part(none.id_end, None), "", "no stream");
    }

    #[tokio::test]
    async fn a_body_goes_to_hyper_in_pieces_of_at_most_a_write_piece() {
        use http_body::Body as _;
        use http_body_util::BodyExt;
        let big: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let frames = futures_util::stream::iter([
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(big.clone()))),
            Ok(http_body::Frame::data(Bytes::from_static(b"tail"))),
        ]);
        let inner = Body::new(http_body_util::StreamBody::new(frames));
        let mut body = Outgoing {
            inner,
            rest: None,
            _log: quiet_log(),
        };
        let mut pieces = Vec::new();
        while let Some(frame) = body.frame().await {
            pieces.push(frame.expect("a frame").into_data().expect("data"));
        }
        let sizes: Vec<usize> = pieces.iter().map(Bytes::len).collect();
        assert_eq!(sizes, [8192, 8192, 20_000 - 2 * 8192, 4], "cut, in order");
        let whole: Vec<u8> = pieces.concat();
        assert_eq!(&whole[..20_000], &big[..], "nothing lost or reordered");
        assert_eq!(&whole[20_000..], b"tail");

        // A body of known length keeps it (hyper sends it as Content-Length), part cut or not.
        let mut sized = Outgoing {
            inner: Body::from(Bytes::from(big)),
            rest: None,
            _log: quiet_log(),
        };
        assert_eq!(sized.size_hint().exact(), Some(20_000));
        let first = sized.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().map(|d| d.len()).ok(), Some(8192));
        assert_eq!(sized.size_hint().exact(), Some(20_000 - 8192));
    }
}
