//! `sluice mock-upstream`: the simulated model served over real HTTP as an OpenAI-compatible
//! server, the upstream peer for tests and benchmarks.
//!
//! It speaks the same `"sim"` request field as the built-in model (the gateway forwards it
//! untouched to `openai` upstreams), so every fault can be staged end to end over real sockets.
//! `GET /stats` reports `requests_started`, `requests_completed` and `requests_disconnected`
//! (the client went away before the end).

mod anthropic;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_stream::stream;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::upstream::sim::{self, SimDefaults, SimStep};

/// Counters of what the mock upstream has seen.
#[derive(Debug, Default)]
pub struct MockStats {
    started: AtomicU64,
    completed: AtomicU64,
    disconnected: AtomicU64,
    disconnect: Notify,
}

impl MockStats {
    /// Requests received.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }
    /// Requests answered to the end.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::SeqCst)
    }
    /// Requests whose client went away before the end.
    pub fn disconnected(&self) -> u64 {
        self.disconnected.load(Ordering::SeqCst)
    }
    /// Waits until `disconnected()` reaches `n`.
    pub async fn wait_disconnected(&self, n: u64) {
        loop {
            let notified = self.disconnect.notified();
            if self.disconnected() >= n {
                return;
            }
            notified.await;
        }
    }
    fn json(&self) -> Value {
        json!({
            "requests_started": self.started(),
            "requests_completed": self.completed(),
            "requests_disconnected": self.disconnected(),
        })
    }
}

/// How the mock upstream answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct MockOptions {
    /// Defaults for the sim fields.
    pub defaults: SimDefaults,
    /// Write each event in pieces of this many bytes (0: whole), to split events, lines and
    /// UTF-8 characters across reads.
    pub split_bytes: usize,
    /// Stamp each token chunk with `"x_sent_ns"`: [`clock_ns`] when it was written, for
    /// measuring per-chunk latency from the same process.
    pub stamp: bool,
    /// One answer in this many, drawn at random, waits [`slow_first_token_ms`](Self::slow_first_token_ms)
    /// for its first token (0: never): a replica with a slow tail, for hedging to cut.
    pub slow_one_in: u32,
    /// The first-token delay of a slow answer.
    pub slow_first_token_ms: u64,
}

/// Whether this answer is one of the slow ones (one in `one_in`, at random).
fn slow_this_time(one_in: u32) -> bool {
    let mut b = [0u8; 4];
    one_in > 0 && getrandom::fill(&mut b).is_ok() && u32::from_le_bytes(b) % one_in == 0
}

/// Nanoseconds on this process's monotonic clock (since its first use).
pub fn clock_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

#[derive(Clone)]
struct Mock {
    options: MockOptions,
    stats: Arc<MockStats>,
}

/// A running mock upstream.
#[derive(Debug)]
pub struct MockUpstream {
    addr: SocketAddr,
    stats: Arc<MockStats>,
    task: tokio::task::JoinHandle<()>,
}

impl MockUpstream {
    /// Starts serving on `listener`.
    pub fn start(listener: TcpListener, options: MockOptions) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let stats = Arc::new(MockStats::default());
        let app = router(Mock {
            options,
            stats: stats.clone(),
        });
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        #[allow(
            clippy::disallowed_methods,
            reason = "a test peer's server: `wait` joins it, or it ends with the runtime"
        )]
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "mock upstream stopped");
            }
        });
        Ok(Self { addr, stats, task })
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its OpenAI base URL (`http://ADDR/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Its counters.
    pub fn stats(&self) -> &Arc<MockStats> {
        &self.stats
    }

    /// Serves until the process ends.
    pub async fn wait(self) {
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "mock upstream task failed");
        }
    }
}

fn router(mock: Mock) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/models", get(|| async { Json(json!({"object": "list", "data": [{"id": "sim", "object": "model", "created": 0, "owned_by": "sluice-mock"}]})) }))
        .route("/stats", get(|State(m): State<Mock>| async move { Json(m.stats.json()) }))
        .with_state(mock)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": {"message": message, "type": "mock_error", "param": null, "code": null}}))).into_response()
}

/// Counts a request as disconnected if its body is dropped before it finishes.
struct Watch {
    stats: Arc<MockStats>,
    done: bool,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.done {
            self.stats.completed.fetch_add(1, Ordering::SeqCst);
        } else {
            self.stats.disconnected.fetch_add(1, Ordering::SeqCst);
            self.stats.disconnect.notify_waiters();
        }
    }
}

async fn chat(State(mock): State<Mock>, body: Bytes) -> Response {
    mock.stats.started.fetch_add(1, Ordering::SeqCst);
    let body: Map<String, Value> = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            mock.stats.completed.fetch_add(1, Ordering::SeqCst);
            return error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}"));
        }
    };
    let params = match sim::params(&body) {
        Ok(p) => mock.options.defaults.faults_into(p),
        Err(e) => {
            mock.stats.completed.fetch_add(1, Ordering::SeqCst);
            return error(StatusCode::BAD_REQUEST, &format!("invalid sim field: {e}"));
        }
    };
    if let Some(status) = params.http_status {
        mock.stats.completed.fetch_add(1, Ordering::SeqCst);
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error(status, &format!("simulated HTTP {}", status.as_u16()));
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("sim")
        .to_string();
    let id = format!("chatcmpl-mock-{}", uuid::Uuid::new_v4().simple());
    let streaming = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let mut params = params;
    if slow_this_time(mock.options.slow_one_in) {
        params.first_token_ms = Some(mock.options.slow_first_token_ms);
    }
    let steps = sim::steps(mock.options.defaults, params, sim::continued_from(&body));
    if !streaming {
        return complete(mock, body, steps, id, model).await;
    }
    let split = mock.options.split_bytes;
    let stamp = mock.options.stamp;
    let events = stream! {
        let mut watch = Watch { stats: mock.stats.clone(), done: false };
        let mut count = 0;
        futures_util::pin_mut!(steps);
        while let Some(step) = steps.next().await {
            let (event, last): (Vec<u8>, bool) = match step {
                SimStep::Token(text) => {
                    count += 1;
                    let mut chunk = sim::chunk_json(&id, &model, Some(&text), None);
                    if stamp {
                        // Append a field to the object: `{...}` becomes `{...,"x_sent_ns":N}`.
                        chunk.pop();
                        chunk.push_str(&format!(",\"x_sent_ns\":{}}}", clock_ns()));
                    }
                    (format!("data: {chunk}\n\n").into_bytes(), false)
                }
                SimStep::Fail => (format!("data: {}\n\n", json!({"error": {"message": sim::FAIL_MESSAGE, "type": "server_error"}})).into_bytes(), true),
                SimStep::Garbage => (b"data: {\"choices\": [\xff\xfe not json\n\n".to_vec(), true),
                SimStep::Drop => {
                    watch.done = true;
                    // Let hyper flush what was sent so far; then cut the connection mid-body.
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    yield Err(std::io::Error::other("simulated connection drop (drop_after)"));
                    return;
                }
                SimStep::Finish => (format!(
                    "data: {}\n\ndata: [DONE]\n\n",
                    sim::chunk_json(&id, &model, None, Some(sim::usage(&body, count)))
                ).into_bytes(), true),
            };
            if split == 0 {
                yield Ok(Bytes::from(event));
            } else {
                for piece in event.chunks(split) {
                    yield Ok(Bytes::copy_from_slice(piece));
                }
            }
            if last {
                watch.done = true;
                return;
            }
        }
    };
    event_stream(events)
}

/// An event-stream response with `events` as its body.
fn event_stream(
    events: impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
) -> Response {
    let mut response = Body::from_stream(events).into_response();
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/event-stream"),
    );
    response
}

async fn complete(
    mock: Mock,
    body: Map<String, Value>,
    steps: impl futures_util::Stream<Item = SimStep>,
    id: String,
    model: String,
) -> Response {
    let mut watch = Watch {
        stats: mock.stats.clone(),
        done: false,
    };
    let mut content = String::new();
    let mut count = 0;
    futures_util::pin_mut!(steps);
    while let Some(step) = steps.next().await {
        match step {
            SimStep::Token(text) => {
                count += 1;
                content.push_str(&text);
            }
            SimStep::Finish => break,
            _ => {
                watch.done = true;
                return error(StatusCode::INTERNAL_SERVER_ERROR, sim::FAIL_MESSAGE);
            }
        }
    }
    watch.done = true;
    Json(json!({
        "id": id, "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": sim::usage(&body, count),
    }))
    .into_response()
}
