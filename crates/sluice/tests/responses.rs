//! The Responses API as a sluice stream: tenant isolation on every endpoint, a response listed
//! and replayed through the streams endpoints, cancelling a finished response, and a replay from
//! the store numbered exactly as the live stream was. (The official SDK's checks are in
//! tests/python/test_responses.py.)

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod common;

use common::*;
use serde_json::{json, Value};
use sluice::auth::{config_lines, new_key};
use sluice::upstream::sse::SseParser;

async fn post(url: &str, key: Option<&str>, body: Value) -> (u16, Value) {
    let mut r = client().post(url).json(&body);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let response = r.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn events(url: &str) -> Vec<(String, Value)> {
    let text = get_text(url).await;
    let mut parser = SseParser::new();
    let mut out = Vec::new();
    parser.push(text.as_bytes(), &mut out).unwrap();
    out.into_iter()
        .map(|e| {
            (
                e.id.unwrap_or_default(),
                serde_json::from_str(&e.data).unwrap(),
            )
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_response_is_a_stream_and_its_replay_matches_the_live_events() {
    let g = gateway("").await;
    let live = client()
        .post(format!("{}/v1/responses", g.url))
        .json(&json!({"model": "sim", "input": "hi", "stream": true, "sim": {"tokens": 6}}))
        .send()
        .await
        .unwrap();
    let id = live.headers()["x-sluice-stream-id"]
        .to_str()
        .unwrap()
        .to_string();
    let live_text = live.text().await.unwrap();
    let mut parser = SseParser::new();
    let mut live_events = Vec::new();
    parser.push(live_text.as_bytes(), &mut live_events).unwrap();
    let replay = events(&format!("{}/v1/responses/{id}?stream=true", g.url)).await;
    let strip = |v: &Value| {
        // The two carry the same numbers, types and text.
        (
            v["sequence_number"].clone(),
            v["type"].clone(),
            v["delta"].clone(),
            v["text"].clone(),
        )
    };
    let live_parsed: Vec<_> = live_events
        .iter()
        .map(|e| strip(&serde_json::from_str(&e.data).unwrap()))
        .collect();
    assert_eq!(
        live_parsed,
        replay.iter().map(|(_, v)| strip(v)).collect::<Vec<_>>()
    );
    assert_eq!(replay.last().unwrap().1["type"], "response.completed");
    // Listed, shown and replayed as a stream.
    assert_eq!(g.newest(1).await[0].id, id);
    let t = final_transcript(&g.url, &id).await;
    assert_eq!(t["status"], "completed");
    assert_eq!(t["request"]["input"], "hi");
    let after = events(&format!(
        "{}/v1/responses/{id}?stream=true&starting_after=6",
        g.url
    ))
    .await;
    assert!(
        after.iter().all(|(n, _)| n.parse::<u64>().unwrap() > 6),
        "{after:?}"
    );
    // A finished response cannot be cancelled.
    let (status, e) = post(
        &format!("{}/v1/responses/{id}/cancel", g.url),
        None,
        json!({}),
    )
    .await;
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    // A chat stream is not a response.
    let (_, chat) = run_stream(
        &g.url,
        &chat_body("sim", true, json!({"tokens": 1}), json!(null)),
    )
    .await;
    let chat_id = chat["id"].as_str().unwrap();
    let missing = client()
        .get(format!("{}/v1/responses/{chat_id}", g.url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test(start_paused = true)]
async fn another_tenants_response_does_not_exist_on_any_endpoint() {
    let (acme, globex) = (new_key().unwrap(), new_key().unwrap());
    let config = format!(
        "{}\n{}\n[[models]]\nname = \"sim\"\nkind = \"sim\"\n",
        config_lines("acme", &acme),
        config_lines("globex", &globex)
    );
    let g = gateway(&config).await;
    let (status, r) = post(
        &format!("{}/v1/responses", g.url),
        Some(&acme),
        json!({"model": "sim", "input": "mine", "background": true, "sim": {"tokens": 5000, "token_interval_ms": 20}}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let id = r["id"].as_str().unwrap();
    // A stream id like any other: a time-ordered (v7) UUID behind its prefix.
    let uuid = uuid::Uuid::parse_str(id.trim_start_matches("resp_")).expect("resp_ and a UUID");
    assert_eq!(uuid.get_version_num(), 7);
    let url = &g.url;
    for (method, path) in [
        (reqwest::Method::GET, format!("/v1/responses/{id}")),
        (
            reqwest::Method::GET,
            format!("/v1/responses/{id}?stream=true"),
        ),
        (
            reqwest::Method::GET,
            format!("/v1/responses/{id}/input_items"),
        ),
        (reqwest::Method::POST, format!("/v1/responses/{id}/cancel")),
        (reqwest::Method::DELETE, format!("/v1/responses/{id}")),
    ] {
        let response = client()
            .request(method.clone(), format!("{url}{path}"))
            .bearer_auth(&globex)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{method} {path}");
    }
    // As previous_response_id too.
    let (status, _) = post(
        &format!("{url}/v1/responses"),
        Some(&globex),
        json!({"model": "sim", "input": "theirs", "previous_response_id": id}),
    )
    .await;
    assert_eq!(status, 404);
    // Its owner cancels it: still running until then, in the background.
    let (status, c) = post(
        &format!("{url}/v1/responses/{id}/cancel"),
        Some(&acme),
        json!({}),
    )
    .await;
    assert_eq!(
        (status, c["status"].as_str()),
        (200, Some("cancelled")),
        "{c}"
    );
}

/// A response's events replay the same after the gateway restarts (they come from the store).
#[tokio::test(start_paused = true)]
async fn a_response_replays_the_same_after_a_restart() {
    let g = gateway("").await;
    let created: Value = post_body(
        &format!("{}/v1/responses", g.url),
        &json!({"model": "sim", "input": "hi", "sim": {"tokens": 5}}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_string();
    let before = events(&format!("{}/v1/responses/{id}?stream=true", g.url)).await;
    let data_dir = g.dir.path().join("data");
    g.server.shutdown().await.unwrap();
    let (server, url) = restart_on(data_dir).await;
    let after = events(&format!("{url}/v1/responses/{id}?stream=true")).await;
    let kinds = |e: &[(String, Value)]| {
        e.iter()
            .map(|(n, v)| (n.clone(), v["type"].clone(), v["delta"].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(kinds(&before), kinds(&after));
    let again = get_json(&format!("{url}/v1/responses/{id}")).await;
    assert_eq!(again["output"], created["output"]);
    assert_eq!(again["status"], "completed");
    server.shutdown().await.unwrap();
}
