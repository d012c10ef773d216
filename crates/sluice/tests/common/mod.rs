//! The integration tests' harness: a real gateway on a real socket with a real SQLite file in a
//! temporary directory, a real mock upstream, and a client that reads SSE as it arrives.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)] // each test file uses a part

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use sluice::mock_upstream::{MockOptions, MockUpstream};
use sluice::upstream::sse::{SseEvent, SseParser};
use sluice::{Config, Overrides, Server};

/// A gateway in this process, on 127.0.0.1 with an ephemeral port.
pub struct Gateway {
    pub server: Server,
    pub url: String,
    pub dir: tempfile::TempDir,
}

/// Starts a gateway with `toml` as its config file.
pub async fn gateway(toml: &str) -> Gateway {
    gateway_with_env(toml, &[]).await
}

/// A gateway whose config sees only the environment variables `env` (for `api_key_env`).
pub async fn gateway_with_env(toml: &str, env: &[(&str, &str)]) -> Gateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        data_dir: Some(dir.path().join("data")),
        env: Some(
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    };
    let config = Config::parse(toml, Path::new("test.toml"), &overrides).expect("config");
    let server = Server::bind(config).await.expect("server");
    let url = format!("http://{}", server.addr());
    Gateway { server, url, dir }
}

/// Waits for `what` to happen, for at most a minute: a regression fails instead of hanging.
/// (On the paused clock, a wait that can never end fails at once.)
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match sluice_flow::timeout(std::time::Duration::from_secs(60), fut).await {
        sluice_flow::Timed::Completed(v) => v,
        sluice_flow::Timed::Expired(_) => panic!("{what} did not happen within 60 s"),
    }
}

impl Gateway {
    /// The newest `n` streams of the keyless tenant, newest first, from the store.
    pub async fn newest(&self, n: usize) -> Vec<sluice::store::StreamSummary> {
        let (list, _) = self
            .server
            .store()
            .list(sluice::stream::Tenant(sluice::auth::LOCAL_TENANT), n, None)
            .await
            .expect("the store lists streams");
        list
    }
}

/// `POST url` with no body; the JSON answer.
pub async fn post_json(url: &str) -> Value {
    json_answer(client().post(url)).await
}

/// Sends `request`; its JSON answer.
async fn json_answer(request: reqwest::RequestBuilder) -> Value {
    request
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("a JSON answer")
}

/// `POST url` with the JSON `body`; the JSON answer.
pub async fn post_body(url: &str, body: &Value) -> Value {
    json_answer(client().post(url).json(body)).await
}

/// A gateway started again on `data_dir` (a restart), with an empty config.
pub async fn restart_on(data_dir: std::path::PathBuf) -> (Server, String) {
    let config = Config::parse(
        "",
        Path::new("t"),
        &Overrides {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            data_dir: Some(data_dir),
            ..Default::default()
        },
    )
    .expect("config");
    let server = Server::bind(config).await.expect("server");
    let url = format!("http://{}", server.addr());
    (server, url)
}

/// Polls `url` until it answers 200, for up to 10 s; whether it did.
pub async fn answers(url: &str) -> bool {
    for _ in 0..200 {
        if client()
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// The PostgreSQL the tests use: the machine's server on 127.0.0.1:5432, database `test`, trust
/// auth (`scripts/ensure-postgres` starts it), or `SLUICE_TEST_POSTGRES`.
pub fn postgres_url() -> String {
    std::env::var("SLUICE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Runs `sql` at `url` with `psql`, behind sluice's back; whether it worked.
pub fn psql(url: &str, sql: &str) -> bool {
    std::process::Command::new("psql")
        .env("PGOPTIONS", "-c client_min_messages=warning")
        .args(["-q", url, "-c", sql])
        .status()
        .is_ok_and(|s| s.success())
}

/// A fresh schema of the tests' PostgreSQL, dropped when this is.
pub struct Schema(String);

impl Schema {
    /// Creates it.
    pub fn new() -> Schema {
        let name = format!("sluice_test_{}", uuid::Uuid::new_v4().simple());
        assert!(
            psql(&postgres_url(), &format!("CREATE SCHEMA {name}")),
            "cannot create a schema (scripts/ensure-postgres starts PostgreSQL)"
        );
        Schema(name)
    }

    /// A URL whose connections use it.
    pub fn url(&self) -> String {
        format!("{}?options=-csearch_path%3D{}", postgres_url(), self.0)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        // Best effort, and no panic: this also runs while a failed test unwinds.
        let _ = psql(
            &postgres_url(),
            &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0),
        );
    }
}

/// A port that was free a moment ago, for a process to listen on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a mock upstream on an ephemeral port.
pub async fn mock(options: MockOptions) -> MockUpstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    MockUpstream::start(listener, options).expect("mock")
}

/// A config with one `openai` model called `up` pointing at `mock`.
pub fn openai_model(mock: &MockUpstream, extra: &str) -> String {
    format!(
        "[[models]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{}\"\n{extra}\n",
        mock.base_url()
    )
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().build().unwrap()
}

/// A chat request body for `model` with the given `sim` and `sluice` fields.
pub fn chat_body(model: &str, stream: bool, sim: Value, sluice: Value) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "say something"}],
        "stream": stream,
        "sim": sim,
        "sluice": sluice,
    })
}

/// A streamed response, read as it arrives.
pub struct Reader {
    pub status: u16,
    pub stream_id: Option<String>,
    response: Option<reqwest::Response>,
    parser: SseParser,
    pending: std::collections::VecDeque<SseEvent>,
    pub raw: String,
    pub events: Vec<SseEvent>,
}

impl Reader {
    /// Opens a streaming chat.
    pub async fn open(url: &str, body: &Value) -> Reader {
        Reader::open_as(url, body, None).await
    }

    /// Opens a streaming chat with an API key.
    pub async fn open_as(url: &str, body: &Value, key: Option<&str>) -> Reader {
        let mut request = client()
            .post(format!("{url}/v1/chat/completions"))
            .json(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        Reader::from_response(request.send().await.expect("request"))
    }

    /// Opens an SSE `GET` (the resume endpoint), with `Last-Event-ID` and one more header.
    pub async fn get(
        url: &str,
        last_event_id: Option<u64>,
        header: Option<(&str, &str)>,
    ) -> Reader {
        let mut request = client().get(url);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        Reader::from_response(request.send().await.expect("request"))
    }

    fn from_response(response: reqwest::Response) -> Reader {
        let status = response.status().as_u16();
        let stream_id = response
            .headers()
            .get("x-sluice-stream-id")
            .map(|v| v.to_str().unwrap().to_string());
        Reader {
            status,
            stream_id,
            response: Some(response),
            parser: SseParser::new(),
            pending: Default::default(),
            raw: String::new(),
            events: Vec::new(),
        }
    }

    /// The next event, or `None` at the end of the body.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                self.events.push(e.clone());
                return Some(e);
            }
            let response = self.response.as_mut()?;
            match response.chunk().await {
                Ok(Some(bytes)) => {
                    self.raw.push_str(&String::from_utf8_lossy(&bytes));
                    let mut out = Vec::new();
                    self.parser
                        .push(&bytes, &mut out)
                        .expect("valid SSE from sluice");
                    self.pending.extend(out);
                }
                _ => {
                    self.response = None;
                    return None;
                }
            }
        }
    }

    /// Reads to the end.
    pub async fn finish(&mut self) -> &[SseEvent] {
        while self.next().await.is_some() {}
        &self.events
    }

    /// Closes the connection: the client goes away.
    pub fn disconnect(&mut self) {
        self.response = None;
    }

    /// The JSON body of an error response (non-200).
    pub async fn error_body(&mut self) -> Value {
        let text = self
            .response
            .take()
            .expect("a response")
            .text()
            .await
            .expect("body");
        serde_json::from_str(&text).expect("JSON error")
    }

    /// The content of the chunks received.
    pub fn content(&self) -> String {
        chunk_events(&self.events)
            .iter()
            .filter_map(|(_, v)| {
                v.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .collect()
    }
}

/// The chunk events (not `[DONE]`, not an error) as (id, JSON).
pub fn chunk_events(events: &[SseEvent]) -> Vec<(u64, Value)> {
    events
        .iter()
        .filter(|e| e.data != "[DONE]")
        .map(|e| {
            (
                e.id.as_deref().unwrap().parse().unwrap(),
                serde_json::from_str::<Value>(&e.data).unwrap(),
            )
        })
        .filter(|(_, v)| v.get("error").is_none())
        .collect()
}

/// The error object of the last event, if it is an error event.
pub fn error_event(events: &[SseEvent]) -> Option<Value> {
    let last = events.last()?;
    serde_json::from_str::<Value>(&last.data)
        .ok()?
        .get("error")
        .cloned()
}

/// The transcript of stream `id`, once its status is final.
pub async fn final_transcript(url: &str, id: &str) -> Value {
    for _ in 0..500 {
        let t: Value = get_json(&format!("{url}/v1/streams/{id}")).await;
        if t["status"] != "streaming" {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("stream {id} never reached a final status");
}

/// The invariants checked after every scenario: every chunk the client received is in the
/// transcript, in order (a prefix of it, ids included), the terminal event's id follows the last
/// stored chunk, the status/reason pair is one of the table's, and
/// `[DONE]` was seen exactly when the stream completed.
pub fn assert_invariants(events: &[SseEvent], transcript: &Value) {
    let received = chunk_events(events);
    let stored: Vec<(u64, Value)> = transcript["chunks"]
        .as_array()
        .expect("chunks")
        .iter()
        .map(|c| (c["seq"].as_u64().unwrap(), c["data"].clone()))
        .collect();
    assert!(
        stored.len() >= received.len() && stored[..received.len()] == received[..],
        "the client's chunks are not a prefix of the transcript:\nreceived {received:?}\nstored {stored:?}"
    );
    // Ids only grow; the terminal event (error or [DONE]) comes right after the last stored
    // chunk, even if the client never got every stored chunk (a cut slow client, a shutdown).
    let ids: Vec<u64> = events
        .iter()
        .map(|e| e.id.as_deref().unwrap().parse::<u64>().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "event ids must increase: {ids:?}"
    );
    let terminal = events.last().filter(|e| {
        e.data == "[DONE]"
            || serde_json::from_str::<Value>(&e.data).is_ok_and(|v| v.get("error").is_some())
    });
    if let Some(t) = terminal {
        assert_eq!(
            t.id.as_deref().unwrap().parse::<u64>().unwrap(),
            stored.len() as u64 + 1,
            "terminal event id"
        );
    }
    let status = transcript["status"].as_str().unwrap();
    let reason = transcript["reason"].as_str();
    let allowed: &[&str] = match status {
        "completed" => &[],
        "cancelled" => &["client_disconnected", "slow_client", "requested"],
        "timed_out" => &["first_token", "idle", "total"],
        "failed" => &["upstream_error", "upstream_protocol_error"],
        "interrupted" => &["shutdown", "crash"],
        other => panic!("status {other} is not in the table"),
    };
    match reason {
        None => assert_eq!(status, "completed"),
        Some(r) => assert!(allowed.contains(&r), "{status}({r}) is not in the table"),
    }
    let done = events.iter().any(|e| e.data == "[DONE]");
    if done {
        assert_eq!(
            status, "completed",
            "[DONE] was sent for a stream that did not complete"
        );
        assert_eq!(events.last().unwrap().data, "[DONE]");
    }
}

/// Reads a whole stream from the start and returns it with its final transcript, checked.
pub async fn run_stream(url: &str, body: &Value) -> (Reader, Value) {
    let mut r = Reader::open(url, body).await;
    let id = r.stream_id.clone().expect("x-sluice-stream-id");
    if r.status == 200 {
        r.finish().await;
    }
    let t = final_transcript(url, &id).await;
    assert_invariants(&r.events, &t);
    (r, t)
}

/// Runs a four-token stream of model `up` (an upstream in front of the mock) and checks that it
/// arrived whole and completed; returns it with its transcript.
pub async fn four_tokens_through_up(url: &str) -> (Reader, Value) {
    let (r, t) = run_stream(
        url,
        &chat_body("up", true, json!({"tokens": 4}), json!(null)),
    )
    .await;
    assert_eq!(r.content(), "Hello from sluice's");
    assert_eq!(ending(&t), ("completed".into(), None));
    (r, t)
}

/// Checks that the gateway at `url` has opened exactly one HTTP/2 upstream connection
/// (`sluice_upstream_connections_opened_total`). The metrics are the process's, shared by the
/// tests of one binary: this holds where one test alone speaks HTTP/2.
pub async fn one_http2_upstream_connection(url: &str) {
    let metrics = get_text(&format!("{url}/metrics")).await;
    assert!(
        metrics.contains("sluice_upstream_connections_opened_total{version=\"2\"} 1\n"),
        "{metrics}"
    );
}

/// `(status, reason)` of a transcript.
pub fn ending(t: &Value) -> (String, Option<String>) {
    (
        t["status"].as_str().unwrap().to_string(),
        t["reason"].as_str().map(str::to_string),
    )
}

/// `GET url` as JSON.
pub async fn get_json(url: &str) -> Value {
    let response = client().get(url).send().await.unwrap();
    response.json().await.unwrap()
}

/// `GET url` as JSON, with an API key.
pub async fn get_json_as(url: &str, key: &str) -> Value {
    let response = client().get(url).bearer_auth(key).send().await.unwrap();
    response.json().await.unwrap()
}

pub async fn get_text(url: &str) -> String {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Installs a log subscriber for debugging a test (`SLUICE_TEST_LOG=debug`).
pub fn logs() {
    if let Ok(filter) = std::env::var("SLUICE_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// nginx (Debian's, `scripts/ensure-nginx` installs it) in the foreground with `servers` (one or
/// more `server`/`upstream` blocks) in its `http` block and its files in `dir`. Killed when
/// dropped.
pub fn spawn_nginx(dir: &Path, servers: &str) -> tokio::process::Child {
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\naccess_log off;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n{servers}\n}}\n"
        ),
    )
    .unwrap();
    tokio::process::Command::new("/usr/sbin/nginx")
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("nginx (scripts/ensure-nginx installs it)")
}
