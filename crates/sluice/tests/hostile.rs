//! Hostile input: requests, upstreams and web pages that try to make the gateway hold memory,
//! hang, leak a key or answer someone it should not. Each test is a regression test for a
//! defect an adversarial review found (issue 9), and fails without its fix.
//!
//! The misbehaving upstreams here are hand-made test peers over real TCP: they send exactly the
//! bytes a broken or malicious server would.
#![allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]
#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a raw upstream sends after reading a request: a response head, then body pieces until
/// `None`. It is given the request's head (to echo, like a server that repeats credentials).
type Script = Arc<dyn Fn(&str) -> (String, Box<dyn Iterator<Item = Vec<u8>> + Send>) + Send + Sync>;

/// A raw upstream on an ephemeral port; counts the body bytes it managed to write.
struct RawUpstream {
    base_url: String,
    sent: Arc<AtomicUsize>,
}

async fn raw_upstream(script: Script) -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (script, counter) = (script.clone(), counter.clone());
            tokio::spawn(serve_one(socket, script, counter));
        }
    });
    RawUpstream {
        base_url: format!("http://{addr}/v1"),
        sent,
    }
}

async fn serve_one(mut socket: TcpStream, script: Script, sent: Arc<AtomicUsize>) {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    // The head, then the body its content-length announces.
    let head_end = loop {
        let Ok(n) = socket.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        request.extend_from_slice(&buf[..n]);
        if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&request[..head_end]).to_string();
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
        })
        .unwrap_or(0);
    while request.len() < head_end + length {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let (response_head, body) = script(&head);
    if socket.write_all(response_head.as_bytes()).await.is_err() {
        return;
    }
    for piece in body {
        if socket.write_all(&piece).await.is_err() {
            return; // the gateway closed the connection
        }
        sent.fetch_add(piece.len(), Ordering::Relaxed);
    }
    let _ = socket.shutdown().await;
}

/// A `200` event-stream head (the body ends when the connection closes).
fn sse_head() -> String {
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n".into()
}

fn chunk_event(content: &str) -> Vec<u8> {
    let chunk =
        json!({"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]});
    format!("data: {chunk}\n\n").into_bytes()
}

fn up_model(up: &RawUpstream, extra: &str) -> String {
    format!(
        "[[models]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{}\"\n{extra}\n",
        up.base_url
    )
}

#[tokio::test]
async fn an_event_past_the_cap_fails_the_stream_without_being_buffered() {
    // 50 MB in one event, as 51,200 data lines of 1 KiB: no line is long, the event is.
    let up = raw_upstream(Arc::new(|_| {
        let first = std::iter::once(chunk_event("hello"));
        let line = format!("data: {}\n", "x".repeat(1018)).into_bytes();
        let event = std::iter::repeat_n(line, 51_200);
        (sse_head(), Box::new(first.chain(event)))
    }))
    .await;
    let g = gateway(&format!("max_event_bytes = 65536\n{}", up_model(&up, ""))).await;
    let (r, t) = run_stream(&g.url, &chat_body("up", true, json!(null), json!(null))).await;
    assert_eq!(
        chunk_events(&r.events).len(),
        1,
        "the chunk before it went through"
    );
    let e = error_event(&r.events).expect("an error event, not [DONE]");
    assert_eq!(e["code"], "upstream_protocol_error");
    assert_eq!(
        ending(&t),
        ("failed".into(), Some("upstream_protocol_error".into()))
    );
    let detail = t["detail"].as_str().unwrap();
    assert!(
        detail.contains("larger than the limit of 65536 bytes"),
        "{detail}"
    );
    // The gateway hung up at the cap; it did not read the 50 MB (socket buffers hold a few MB).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = up.sent.load(Ordering::Relaxed);
    assert!(sent < 10 << 20, "the upstream got {sent} bytes out");
}

#[tokio::test]
async fn a_success_that_is_not_an_event_stream_is_a_protocol_error() {
    for (content_type, body) in [
        (
            "text/html; charset=utf-8",
            "<html><body>login</body></html>",
        ),
        (
            "application/json",
            r#"{"choices":[{"message":{"content":"hi"}}]}"#,
        ),
    ] {
        let up = raw_upstream(Arc::new(move |_| {
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            (head, Box::new(std::iter::once(body.as_bytes().to_vec())))
        }))
        .await;
        let g = gateway(&up_model(&up, "")).await;
        let (mut r, t) = run_stream(&g.url, &chat_body("up", true, json!(null), json!(null))).await;
        assert_eq!(r.status, 502, "{content_type}");
        let e = r.error_body().await;
        assert_eq!(e["error"]["code"], "upstream_protocol_error", "{e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not an event stream"),
            "{e}"
        );
        assert_eq!(
            ending(&t),
            ("failed".into(), Some("upstream_protocol_error".into()))
        );
    }
}

/// A redirect is the upstream's answer: the request (with its key) is not sent on to wherever it
/// points.
#[tokio::test]
async fn an_upstream_redirect_is_an_error_and_is_not_followed() {
    let elsewhere = raw_upstream(Arc::new(|_| {
        (
            sse_head(),
            Box::new(vec![chunk_event("followed"), b"data: [DONE]\n\n".to_vec()].into_iter()),
        )
    }))
    .await;
    let target = format!("{}/chat/completions", elsewhere.base_url);
    let up = raw_upstream(Arc::new(move |_| {
        (
            format!("HTTP/1.1 307 Temporary Redirect\r\nlocation: {target}\r\ncontent-length: 0\r\n\r\n"),
            Box::new(std::iter::empty()),
        )
    }))
    .await;
    let g = gateway(&up_model(&up, "")).await;
    let (mut r, t) = run_stream(&g.url, &chat_body("up", true, json!(null), json!(null))).await;
    assert_eq!(r.status, 502);
    let e = r.error_body().await;
    assert_eq!(e["error"]["code"], "upstream_error", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("307"),
        "{e}"
    );
    assert_eq!(ending(&t), ("failed".into(), Some("upstream_error".into())));
    assert_eq!(
        elsewhere.sent.load(Ordering::Relaxed),
        0,
        "the redirect was followed"
    );
}

#[tokio::test]
async fn upstream_keys_echoed_back_never_reach_clients_or_transcripts() {
    let secret = "sk-hostile-test-0123456789abcdef";
    // An upstream that refuses the key and quotes it back, with 64 KiB of padding.
    let refusing = raw_upstream(Arc::new(|head| {
        let auth = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
            .unwrap_or("")
            .to_string();
        let message = format!("invalid key: {auth} {}", "pad ".repeat(16_384));
        let body = json!({"error": {"message": message}}).to_string();
        let head = format!(
            "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        (head, Box::new(std::iter::once(body.into_bytes())))
    }))
    .await;
    let g = gateway_with_env(
        &up_model(&refusing, "api_key_env = \"SLUICE_HOSTILE_KEY\""),
        &[("SLUICE_HOSTILE_KEY", secret)],
    )
    .await;
    let (mut r, t) = run_stream(&g.url, &chat_body("up", true, json!(null), json!(null))).await;
    assert_eq!(r.status, 502);
    let e = r.error_body().await.to_string();
    let detail = t["detail"].as_str().unwrap().to_string();
    for text in [&e, &detail] {
        assert!(!text.contains(secret), "the key leaked: {text:.200}");
        assert!(!text.contains("0123456789abcdef"), "part of the key leaked");
        assert!(text.contains("[redacted]"), "{text:.200}");
        assert!(
            text.len() < 5_000,
            "{} bytes of upstream error copied",
            text.len()
        );
    }

    // An upstream that streams the key back inside an answer.
    let echoing = raw_upstream(Arc::new(|head| {
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("authorization: Bearer "))
            .unwrap_or("")
            .to_string();
        let events = vec![
            chunk_event(&format!("your key is {key}")),
            b"data: [DONE]\n\n".to_vec(),
        ];
        (sse_head(), Box::new(events.into_iter()))
    }))
    .await;
    let g = gateway_with_env(
        &up_model(&echoing, "api_key_env = \"SLUICE_HOSTILE_KEY\""),
        &[("SLUICE_HOSTILE_KEY", secret)],
    )
    .await;
    let (r, t) = run_stream(&g.url, &chat_body("up", true, json!(null), json!(null))).await;
    assert_eq!(ending(&t).0, "completed");
    assert!(!r.raw.contains(secret), "{}", r.raw);
    assert!(r.raw.contains("your key is [redacted]"), "{}", r.raw);
    assert!(!t.to_string().contains(secret));
    assert_eq!(t["content"], "your key is [redacted]");
}

/// A raw client that sends `request`, then reads the response head and then nothing, through a
/// small receive buffer. Returns the stream id.
async fn stalled_client(addr: std::net::SocketAddr, request: String) -> (TcpStream, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 1024];
    let n = stream.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-sluice-stream-id: "))
        .expect("stream id header")
        .trim()
        .to_string();
    (stream, id)
}

fn post_request(body: &Value) -> String {
    let payload = body.to_string();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{payload}",
        payload.len()
    )
}

#[tokio::test]
async fn a_stalled_client_holds_at_most_buffer_bytes_of_large_chunks() {
    // 200 chunks of 100 KB as fast as the gateway takes them.
    let up = raw_upstream(Arc::new(|_| {
        let big = "y".repeat(100_000);
        let events = (0..200).map(move |_| chunk_event(&big));
        (sse_head(), Box::new(events))
    }))
    .await;
    let g = gateway(&format!(
        "buffer_chunks = 64\nbuffer_bytes = 262144\nslow_client_timeout_ms = 1000\nsend_buffer_bytes = 16384\n{}",
        up_model(&up, "")
    ))
    .await;
    let (_socket, id) = stalled_client(
        g.server.addr(),
        post_request(&chat_body("up", true, json!(null), json!(null))),
    )
    .await;
    let t = final_transcript(&g.url, &id).await;
    assert_eq!(ending(&t), ("cancelled".into(), Some("slow_client".into())));
    // "the client left N chunks (B bytes) unread for ...": bounded by bytes, not by 64 chunks.
    let detail = t["detail"].as_str().unwrap();
    let numbers: Vec<usize> = detail
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    let (chunks, bytes) = (numbers[0], numbers[1]);
    assert!(chunks <= 3, "{detail}");
    assert!(bytes <= 262_144, "{detail}");
}

#[tokio::test]
async fn a_body_that_never_finishes_is_cut_after_body_timeout() {
    let g = gateway("body_timeout_ms = 300").await;
    let mut stream = TcpStream::connect(g.server.addr()).await.unwrap();
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
        .await
        .unwrap();
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    response.extend_from_slice(&buf[..n]);
                    if response.windows(4).any(|w| w == b"}}\r\n" || w == b"\"}}") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the connection was held open past body_timeout"
    );
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"body_timeout\""), "{text}");
    // Nothing was recorded for a request that never arrived.
    let list = get_json(&format!("{}/v1/streams", g.url)).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
}

async fn status_and_json(response: reqwest::Response) -> (u16, reqwest::header::HeaderMap, Value) {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text:?}"));
    (status, headers, body)
}

#[tokio::test]
async fn web_pages_cannot_use_a_keyless_gateway() {
    let g = gateway("cors_origins = [\"https://app.example\"]").await;
    let c = client();
    let chat = chat_body("sim", false, json!({"tokens": 2}), json!(null));
    // DNS rebinding: a page on attacker.example whose name now resolves to 127.0.0.1.
    let (status, _, e) = status_and_json(
        c.get(format!("{}/v1/streams", g.url))
            .header("host", "attacker.example:8750")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (403, Some("host_not_allowed"))
    );
    // A cross-site "simple" POST (text/plain, no preflight) from any page.
    let (status, _, e) = status_and_json(
        c.post(format!("{}/v1/chat/completions", g.url))
            .header("content-type", "text/plain")
            .body(chat.to_string())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (415, Some("content-type"))
    );
    let (status, _, e) = status_and_json(
        c.post(format!("{}/v1/chat/completions", g.url))
            .header("origin", "https://evil.example")
            .json(&chat)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (403, Some("origin_not_allowed"))
    );
    // Nothing ran.
    let list = get_json(&format!("{}/v1/streams", g.url)).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);

    // An allowed origin gets CORS headers, and its preflight an answer.
    let (status, headers, _) = status_and_json(
        c.post(format!("{}/v1/chat/completions", g.url))
            .header("origin", "https://app.example")
            .json(&chat)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
    let preflight = c
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/chat/completions", g.url),
        )
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    assert!(preflight.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("content-type"));
    // The gateway's own page (same origin) works; so do clients that send no Origin.
    let own = format!("http://{}", g.server.addr());
    let r = c
        .get(format!("{}/v1/streams", g.url))
        .header("origin", &own)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn every_error_is_openai_json_and_echoes_are_capped() {
    let g = gateway("").await;
    let c = client();
    // Wrong method.
    let (status, _, e) = status_and_json(
        c.get(format!("{}/v1/chat/completions", g.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 405);
    assert_eq!(e["error"]["type"], "invalid_request_error");
    // A path that is not UTF-8 once decoded.
    let (status, _, e) = status_and_json(
        c.get(format!("{}/v1/streams/%FF", g.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("id")));
    // A 100 KB model name is not echoed whole.
    let name = "m".repeat(100_000);
    let (status, _, e) = status_and_json(
        c.post(format!("{}/v1/chat/completions", g.url))
            .json(&json!({"model": name, "messages": [{"role": "user", "content": "x"}]}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    assert!(e.to_string().len() < 400, "{} bytes", e.to_string().len());
    // The simulated model names the bad field, and caps tokens.
    for (sim, param) in [
        (json!({"tokens": "x"}), "sim.tokens"),
        (json!({"fail_after": -1}), "sim.fail_after"),
        (json!({"tokens": 1_000_000_000}), "sim.tokens"),
    ] {
        let (status, _, e) = status_and_json(
            c.post(format!("{}/v1/chat/completions", g.url))
                .json(&chat_body("sim", true, sim, json!(null)))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((status, e["error"]["param"].as_str()), (400, Some(param)));
    }
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let g = gateway("").await;
    let r = client()
        .get(format!("{}/healthz", g.url))
        .header("x-request-id", "trace-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-42");
    let r = client()
        .get(format!("{}/v1/nope", g.url))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32, "a fresh id replaces an odd one: {id}");
}

#[tokio::test]
async fn with_keys_the_simulated_model_must_be_named() {
    let key = sluice::auth::new_key().unwrap();
    let g = gateway(&sluice::auth::config_lines("acme", &key)).await;
    let r = client()
        .post(format!("{}/v1/chat/completions", g.url))
        .bearer_auth(&key)
        .json(&chat_body("sim", false, json!(null), json!(null)))
        .send()
        .await
        .unwrap();
    let (status, _, e) = status_and_json(r).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let models = get_json_as(&format!("{}/v1/models", g.url), &key).await;
    assert_eq!(models["data"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn a_transcript_streamed_in_pages_is_the_whole_transcript() {
    // 700 chunks: the transcript is read in three pages of at most 256.
    let g = gateway(
        "[[models]]\nname = \"fast\"\nkind = \"sim\"\nsim = { first_token_ms = 0, token_interval_ms = 0, max_tokens_per_second = 1000000 }\n",
    )
    .await;
    let (_, t) = run_stream(
        &g.url,
        &chat_body("fast", true, json!({"tokens": 700}), json!(null)),
    )
    .await;
    let id = t["id"].as_str().unwrap();
    let whole = g
        .server
        .store()
        .get(
            sluice::stream::Tenant("local"),
            sluice::stream::StreamId(id),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t, serde_json::to_value(&whole).unwrap());
    assert_eq!(t["chunks"].as_array().unwrap().len(), 701);
    let r = client()
        .get(format!("{}/v1/streams/{id}", g.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/json");
    assert!(
        r.headers().get("content-length").is_none(),
        "streamed out, not assembled"
    );
}
