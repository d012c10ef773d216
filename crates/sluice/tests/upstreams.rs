//! `openai` upstreams over real HTTP, with `sluice mock-upstream` as the peer: completion, every
//! fault the simulated model can stage, bytes split anywhere, and the upstream connection closed
//! as soon as the client leaves or a deadline fires. Paused clock; invariants after each.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use sluice::mock_upstream::{MockOptions, MockUpstream};
use sluice::upstream::sim::{self, SimDefaults};

#[tokio::test(start_paused = true)]
async fn a_stream_relays_through_an_openai_upstream() {
    let m = mock(MockOptions::default()).await;
    let g = gateway(&openai_model(&m, "upstream_model = \"the-real-name\"")).await;
    let (r, t) = four_tokens_through_up(&g.url).await;
    assert_eq!(t["usage"]["completion_tokens"], 4);
    // The upstream was asked for its own model name.
    assert_eq!(chunk_events(&r.events)[0].1["model"], "the-real-name");
    assert_eq!((m.stats().started(), m.stats().completed()), (1, 1));
    let metrics = get_text(&format!("{}/metrics", g.url)).await;
    assert!(
        metrics.contains("sluice_upstream_connections_opened_total{version=\"1.1\"} "),
        "{metrics}"
    );
}

#[tokio::test(start_paused = true)]
async fn events_and_utf8_split_at_every_byte_arrive_intact() {
    let m = mock(MockOptions {
        defaults: SimDefaults::default(),
        split_bytes: 1,
        ..MockOptions::default()
    })
    .await;
    let g = gateway(&openai_model(&m, "")).await;
    let (r, t) = run_stream(
        &g.url,
        &chat_body("up", true, json!({"tokens": 16}), json!(null)),
    )
    .await;
    let expected: String = (0..16).map(sim::token_text).collect();
    assert!(expected.contains("世界") && expected.contains('🙂'));
    assert_eq!(r.content(), expected);
    assert_eq!(t["content"], expected);
    assert_eq!(ending(&t), ("completed".into(), None));
}

#[tokio::test(start_paused = true)]
async fn a_cut_connection_is_a_failure_never_done() {
    let m = mock(MockOptions::default()).await;
    let g = gateway(&openai_model(&m, "")).await;
    let (r, t) = run_stream(
        &g.url,
        &chat_body("up", true, json!({"drop_after": 3}), json!(null)),
    )
    .await;
    assert_eq!(chunk_events(&r.events).len(), 3);
    assert_eq!(
        error_event(&r.events).expect("error event")["code"],
        "upstream_error"
    );
    assert!(!r.raw.contains("[DONE]"));
    assert_eq!(ending(&t), ("failed".into(), Some("upstream_error".into())));
}

#[tokio::test(start_paused = true)]
async fn garbage_is_a_protocol_error() {
    let m = mock(MockOptions::default()).await;
    let g = gateway(&openai_model(&m, "")).await;
    let (r, t) = run_stream(
        &g.url,
        &chat_body("up", true, json!({"garbage_after": 2}), json!(null)),
    )
    .await;
    assert_eq!(chunk_events(&r.events).len(), 2);
    assert_eq!(
        error_event(&r.events).expect("error event")["code"],
        "upstream_protocol_error"
    );
    assert_eq!(
        ending(&t),
        ("failed".into(), Some("upstream_protocol_error".into()))
    );
}

#[tokio::test(start_paused = true)]
async fn an_upstream_error_event_is_relayed_with_its_message() {
    let m = mock(MockOptions::default()).await;
    let g = gateway(&openai_model(&m, "")).await;
    let (r, t) = run_stream(
        &g.url,
        &chat_body("up", true, json!({"fail_after": 2}), json!(null)),
    )
    .await;
    let e = error_event(&r.events).expect("error event");
    assert_eq!(e["code"], "upstream_error");
    assert!(e["message"].as_str().unwrap().contains(sim::FAIL_MESSAGE));
    assert_eq!(ending(&t), ("failed".into(), Some("upstream_error".into())));
    assert!(t["detail"].as_str().unwrap().contains(sim::FAIL_MESSAGE));
}

#[tokio::test(start_paused = true)]
async fn upstream_http_errors_are_502_with_the_upstream_status_recorded() {
    let m = mock(MockOptions::default()).await;
    let g = gateway(&openai_model(&m, "")).await;
    for status in [429, 500] {
        let (mut r, t) = run_stream(
            &g.url,
            &chat_body("up", true, json!({"http_status": status}), json!(null)),
        )
        .await;
        assert_eq!(r.status, 502);
        let e = r.error_body().await;
        assert_eq!(e["error"]["code"], "upstream_error");
        assert_eq!(ending(&t), ("failed".into(), Some("upstream_error".into())));
        let detail = t["detail"].as_str().unwrap();
        assert!(
            detail.contains(&format!("HTTP {status}"))
                && detail.contains(&format!("simulated HTTP {status}")),
            "{detail}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_upstream_is_a_502() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let g = gateway(&format!(
        "[[models]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\n"
    ))
    .await;
    let (r, t) = run_stream(&g.url, &chat_body("up", true, json!(null), json!(null))).await;
    assert_eq!(r.status, 502);
    assert_eq!(ending(&t), ("failed".into(), Some("upstream_error".into())));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_closes_the_upstream_connection_at_once() {
    let m = mock(MockOptions::default()).await;
    let g = gateway(&openai_model(&m, "")).await;
    leave_mid_stream(&m, &g).await;
    assert_eq!(m.stats().completed(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_h2c_upstream_relays_and_a_client_that_leaves_resets_its_stream_at_once() {
    // `sluice mock-upstream` speaks HTTP/1.1 and HTTP/2 with prior knowledge (h2c).
    let m = mock(MockOptions::default()).await;
    let g = gateway(&openai_model(&m, "http_version = \"2\"")).await;
    four_tokens_through_up(&g.url).await;
    leave_mid_stream(&m, &g).await;
    assert_eq!((m.stats().started(), m.stats().completed()), (2, 1));
    // The next stream goes through as before, on the same connection: one HTTP/2 connection
    // for the three (the only test here that speaks HTTP/2).
    let (r, _) = run_stream(
        &g.url,
        &chat_body("up", true, json!({"tokens": 2}), json!(null)),
    )
    .await;
    assert_eq!(r.content(), "Hello from");
    one_http2_upstream_connection(&g.url).await;
}

/// A client that leaves after two chunks of a slow stream: the upstream sees its request go (its
/// connection closed, or its HTTP/2 stream reset) at once, and the transcript says why.
async fn leave_mid_stream(m: &MockUpstream, g: &Gateway) {
    // Tokens a whole second apart: if closing the upstream waited for anything timed (the next
    // token, a poll interval), the paused clock would show it.
    let body = chat_body(
        "up",
        true,
        json!({"tokens": 100, "first_token_ms": 10, "token_interval_ms": 1000}),
        json!(null),
    );
    let gone_before = m.stats().disconnected();
    let mut r = Reader::open(&g.url, &body).await;
    r.next().await.expect("a chunk");
    r.next().await.expect("a chunk");
    let closed = tokio::time::Instant::now();
    r.disconnect();
    within(
        "the upstream request going",
        m.stats().wait_disconnected(gone_before + 1),
    )
    .await;
    let delay = closed.elapsed();
    assert!(
        delay < Duration::from_millis(50),
        "the upstream saw its request go {delay:?} after the client"
    );
    let t = final_transcript(&g.url, r.stream_id.as_deref().unwrap()).await;
    assert_eq!(
        ending(&t),
        ("cancelled".into(), Some("client_disconnected".into()))
    );
    assert_invariants(&r.events, &t);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_closes_the_upstream_connection() {
    let m = mock(MockOptions::default()).await;
    let g = gateway(&openai_model(&m, "")).await;
    let (r, t) = run_stream(
        &g.url,
        &chat_body(
            "up",
            true,
            json!({"stall_after": 2}),
            json!({"idle_timeout_ms": 500}),
        ),
    )
    .await;
    assert_eq!(error_event(&r.events).expect("error event")["code"], "idle");
    assert_eq!(ending(&t), ("timed_out".into(), Some("idle".into())));
    within(
        "the upstream connection closing",
        m.stats().wait_disconnected(1),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn the_upstream_key_never_reaches_transcripts_errors_or_metrics() {
    let secret = "sk-sluice-test-SECRET-4f9a";
    let m = mock(MockOptions::default()).await;
    let g = gateway_with_env(
        &openai_model(&m, "api_key_env = \"SLUICE_TEST_UPSTREAM_KEY\""),
        &[("SLUICE_TEST_UPSTREAM_KEY", secret)],
    )
    .await;
    let (_, ok) = run_stream(
        &g.url,
        &chat_body("up", true, json!({"tokens": 2}), json!(null)),
    )
    .await;
    let (mut r, failed) = run_stream(
        &g.url,
        &chat_body("up", true, json!({"http_status": 401}), json!(null)),
    )
    .await;
    let error = r.error_body().await;
    let list = get_text(&format!("{}/v1/streams", g.url)).await;
    let metrics = get_text(&format!("{}/metrics", g.url)).await;
    for (what, text) in [
        ("transcript", ok.to_string()),
        ("failed transcript", failed.to_string()),
        ("error", error.to_string()),
        ("list", list),
        ("metrics", metrics),
    ] {
        assert!(
            !text.contains(secret),
            "the upstream key leaked into the {what}"
        );
    }
    assert_eq!(ending(&ok).0, "completed");
}

#[tokio::test(start_paused = true)]
async fn mock_upstream_reports_its_counters() {
    let m = mock(MockOptions::default()).await;
    let stats: Value = get_json(&format!("http://{}/stats", m.addr())).await;
    assert_eq!(
        stats,
        json!({"requests_started": 0, "requests_completed": 0, "requests_disconnected": 0})
    );
    let direct = post_body(
        &format!("{}/chat/completions", m.base_url()),
        &json!({"model": "sim", "messages": [{"role": "user", "content": "hi"}], "sim": {"tokens": 2}}),
    )
    .await;
    assert_eq!(direct["choices"][0]["message"]["content"], "Hello from");
    let stats: Value = get_json(&format!("http://{}/stats", m.addr())).await;
    assert_eq!(stats["requests_completed"], 1);
}
