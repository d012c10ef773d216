//! An HTTP/2 upstream that is not hyper: Debian's nginx (`scripts/ensure-nginx` installs it)
//! serving h2c in front of `sluice mock-upstream`, and the gateway in front of it with
//! `http_version = "2"`. Streams relay and complete on one connection, and a client that leaves
//! reaches the model server through nginx (the gateway resets its stream; nginx closes its
//! request to the mock). A real process, so the real clock.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use sluice::mock_upstream::MockOptions;
use tokio::process::Child;

/// nginx listening for h2c (HTTP/2 with prior knowledge) on a free port, passing every request
/// to `upstream` over HTTP/1.1 without buffering; its process and port.
async fn nginx_h2c(dir: &Path, upstream: std::net::SocketAddr) -> (Child, u16) {
    let listen = free_port();
    let child = spawn_nginx(
        dir,
        &format!(
            "server {{\nlisten 127.0.0.1:{listen} http2;\nlocation / {{\nproxy_pass http://{upstream};\n\
             proxy_http_version 1.1;\nproxy_buffering off;\n}}\n}}\n"
        ),
    );
    // It speaks only HTTP/2 there, so it is ready when it accepts a connection.
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", listen))
            .await
            .is_ok()
        {
            return (child, listen);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "nginx did not listen: {}",
        std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
    );
}

#[tokio::test]
async fn streams_relay_and_a_client_that_leaves_is_seen_through_an_nginx_http2_upstream() {
    let m = mock(MockOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (_nginx, port) = nginx_h2c(dir.path(), m.addr()).await;
    let g = gateway(&format!(
        "[[models]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\nhttp_version = \"2\"\n"
    ))
    .await;
    for _ in 0..3 {
        four_tokens_through_up(&g.url).await;
    }
    let body = chat_body(
        "up",
        true,
        json!({"tokens": 100, "first_token_ms": 10, "token_interval_ms": 200}),
        json!(null),
    );
    let mut r = Reader::open(&g.url, &body).await;
    r.next().await.expect("a chunk");
    let left = Instant::now();
    r.disconnect();
    within(
        "the mock seeing its request go",
        m.stats().wait_disconnected(1),
    )
    .await;
    assert!(
        left.elapsed() < Duration::from_secs(2),
        "the model server saw the client leave {:?} later",
        left.elapsed()
    );
    let t = final_transcript(&g.url, r.stream_id.as_deref().unwrap()).await;
    assert_eq!(
        ending(&t),
        ("cancelled".into(), Some("client_disconnected".into()))
    );
    // Four streams, one HTTP/2 connection to nginx.
    one_http2_upstream_connection(&g.url).await;
}
