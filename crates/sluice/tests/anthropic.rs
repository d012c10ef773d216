//! Anthropic's Messages API as an upstream (`kind = "anthropic"`), against the mock upstream's
//! Anthropic dialect (a real HTTP peer speaking the documented event stream): text, usage, tool
//! use, an `error` event mid-stream, `overloaded_error` before the first byte, the key sent as
//! `x-api-key` and never shown.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod common;

use common::*;
use serde_json::{json, Value};
use sluice::mock_upstream::MockOptions;
use sluice::upstream::sim::token_text;

const KEY: &str = "sk-ant-secret-key-1234567890";

/// Streams from `claude` with these `sim` and `sluice` fields; the answer and its transcript.
async fn ask(g: &Gateway, sim: Value, sluice: Value) -> (Reader, Value) {
    run_stream(&g.url, &chat_body("claude", true, sim, sluice)).await
}

async fn claude() -> (Gateway, sluice::mock_upstream::MockUpstream) {
    let m = mock(MockOptions::default()).await;
    let config = format!(
        "[[models]]\nname = \"claude\"\nkind = \"anthropic\"\nbase_url = \"{}\"\napi_key_env = \"ANTHROPIC_KEY\"\nupstream_model = \"claude-sim\"\n",
        m.base_url()
    );
    (
        gateway_with_env(&config, &[("ANTHROPIC_KEY", KEY)]).await,
        m,
    )
}

#[tokio::test]
async fn an_anthropic_stream_is_relayed_as_openai_chunks() {
    let (g, _m) = claude().await;
    let (r, t) = ask(&g, json!({"tokens": 6}), json!(null)).await;
    assert_eq!(ending(&t), ("completed".into(), None));
    assert_eq!(r.content(), (0..6).map(token_text).collect::<String>());
    let chunks = chunk_events(&r.events);
    let last = &chunks.last().unwrap().1;
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["usage"]["completion_tokens"], 6);
    assert_eq!(last["model"], "claude-sim");
}

#[tokio::test]
async fn an_error_event_mid_stream_fails_with_its_type_and_message() {
    let (g, _m) = claude().await;
    let (r, t) = ask(&g, json!({"tokens": 6, "fail_after": 3}), json!(null)).await;
    assert_eq!(ending(&t), ("failed".into(), Some("upstream_error".into())));
    assert!(
        t["detail"]
            .as_str()
            .unwrap()
            .contains("overloaded_error: Overloaded"),
        "{}",
        t["detail"]
    );
    assert_eq!(r.content(), (0..3).map(token_text).collect::<String>());
    assert!(
        error_event(&r.events).is_some(),
        "an error event, never [DONE]"
    );
}

#[tokio::test]
async fn overloaded_before_the_first_byte_is_an_upstream_error_naming_it() {
    let (g, _m) = claude().await;
    let response = client()
        .post(format!("{}/v1/chat/completions", g.url))
        .json(&chat_body(
            "claude",
            true,
            json!({"http_status": 529}),
            json!(null),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let e: Value = response.json().await.unwrap();
    let message = e["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("529") && message.contains("overloaded_error"),
        "{message}"
    );
    assert!(!message.contains(KEY));
}

#[tokio::test]
async fn tool_use_becomes_openai_tool_calls() {
    let (g, _m) = claude().await;
    let mut body = chat_body(
        "claude",
        true,
        json!({"tokens": 2, "tool_call": true}),
        json!(null),
    );
    body["tools"] = json!([{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]);
    let (r, t) = run_stream(&g.url, &body).await;
    assert_eq!(ending(&t), ("completed".into(), None));
    let chunks = chunk_events(&r.events);
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|(_, c)| c["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert_eq!(calls[0]["function"]["name"], "lookup");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("toolu_"));
    let arguments: String = calls
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .collect();
    assert_eq!(arguments, "{\"query\":\"sluice\"}");
    assert_eq!(
        chunks.last().unwrap().1["choices"][0]["finish_reason"],
        "tool_calls"
    );
}

/// Pings keep coming while the upstream stalls; they are not tokens, so the idle timer fires.
#[tokio::test]
async fn pings_never_reset_the_idle_timer() {
    let (g, _m) = claude().await;
    let (r, t) = ask(
        &g,
        json!({"tokens": 6, "stall_after": 2}),
        // A regression (pings taken for tokens) ends at the total deadline instead.
        json!({"idle_timeout_ms": 400, "total_timeout_ms": 3000}),
    )
    .await;
    assert_eq!(ending(&t), ("timed_out".into(), Some("idle".into())));
    assert_eq!(r.content(), (0..2).map(token_text).collect::<String>());
}
