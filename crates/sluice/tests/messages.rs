//! `POST /v1/messages`, the Anthropic-compatible front door: `x-api-key` or `Authorization:
//! Bearer` both work with sluice keys, errors are Anthropic's error JSON, and a message is a
//! stream like any other (listed, replayed in Anthropic's shape). (The official `anthropic`
//! SDK's checks are in tests/python/test_anthropic.py.)

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod common;

use common::*;
use serde_json::{json, Value};
use sluice::auth::{config_lines, new_key};

fn message(model: &str, stream: bool) -> Value {
    json!({"model": model, "max_tokens": 64, "stream": stream,
           "messages": [{"role": "user", "content": "hi"}], "sim": {"tokens": 3}})
}

#[tokio::test(start_paused = true)]
async fn keys_errors_and_replay_in_anthropic_shape() {
    let key = new_key().unwrap();
    let config = format!(
        "{}\n[[models]]\nname = \"sim\"\nkind = \"sim\"\n",
        config_lines("acme", &key)
    );
    let g = gateway(&config).await;
    let url = format!("{}/v1/messages", g.url);
    // No key, a wrong key: Anthropic's 401.
    for k in [None, Some("sk-wrong")] {
        let mut r = client().post(&url).json(&message("sim", false));
        if let Some(k) = k {
            r = r.header("x-api-key", k);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 401);
        let e: Value = r.json().await.unwrap();
        assert_eq!(
            (e["type"].as_str(), e["error"]["type"].as_str()),
            (Some("error"), Some("authentication_error")),
            "{e}"
        );
    }
    // x-api-key and Bearer both work.
    let by_header: Value = client()
        .post(&url)
        .header("x-api-key", &key)
        .json(&message("sim", false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(by_header["content"][0]["text"], "Hello from sluice");
    let r = client()
        .post(&url)
        .bearer_auth(&key)
        .json(&message("nope", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "not_found_error", "{e}");
    let r = client()
        .post(&url)
        .bearer_auth(&key)
        .json(&json!({"model": "sim", "max_tokens": 5,
        "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");

    // Streamed, then replayed through the streams endpoint in the same shape.
    let r = client()
        .post(&url)
        .header("x-api-key", &key)
        .json(&message("sim", true))
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-sluice-stream-id"]
        .to_str()
        .unwrap()
        .to_string();
    let live = r.text().await.unwrap();
    let kinds = |text: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(kinds(&live)[0], "message_start");
    assert_eq!(
        kinds(&live).last().map(String::as_str),
        Some("message_stop")
    );
    let replay = client()
        .get(format!("{}/v1/streams/{id}/events", g.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        kinds(&replay),
        kinds(&live),
        "replayed in the shape it was asked in"
    );
}
