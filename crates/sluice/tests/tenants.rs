//! Keys and tenants: authentication, isolation on every endpoint (404, never 403), per-key
//! limits (429 with Retry-After), and secure defaults without keys.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use sluice::auth::{config_lines, new_key};
use sluice::mock_upstream::MockOptions;

struct Tenants {
    g: Gateway,
    acme: String,
    globex: String,
}

/// A gateway with two tenants, `acme` (limited) and `globex`.
async fn two_tenants(acme_limits: &str) -> Tenants {
    let (acme, globex) = (new_key().unwrap(), new_key().unwrap());
    // With keys, the simulated model is served only when the config names it.
    let config = format!(
        "{}{acme_limits}\n{}\n[[models]]\nname = \"sim\"\nkind = \"sim\"\n",
        config_lines("acme", &acme),
        config_lines("globex", &globex)
    );
    Tenants {
        g: gateway(&config).await,
        acme,
        globex,
    }
}

async fn call(
    method: reqwest::Method,
    url: &str,
    key: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = client().request(method, url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn chat(tokens: u32, interval: u64) -> Value {
    chat_body(
        "sim",
        true,
        json!({"tokens": tokens, "token_interval_ms": interval}),
        json!(null),
    )
}

#[tokio::test(start_paused = true)]
async fn a_key_is_required_and_must_be_valid() {
    let t = two_tenants("").await;
    for key in [None, Some("sk-sluice-wrong")] {
        let r = Reader::open_as(&t.g.url, &chat(2, 1), key).await;
        assert_eq!(r.status, 401);
        let (status, _, body) = call(
            reqwest::Method::GET,
            &format!("{}/v1/streams", t.g.url),
            key,
        )
        .await;
        assert_eq!(status, 401);
        assert_eq!(body["error"]["code"], "invalid_api_key");
        let (status, _, _) =
            call(reqwest::Method::GET, &format!("{}/v1/models", t.g.url), key).await;
        assert_eq!(status, 401);
    }
    // Health and metrics carry no tenant data and stay open.
    let (status, _, _) = call(reqwest::Method::GET, &format!("{}/healthz", t.g.url), None).await;
    assert_eq!(status, 200);
    let mut ok = Reader::open_as(&t.g.url, &chat(2, 1), Some(&t.acme)).await;
    assert_eq!(ok.status, 200);
    ok.finish().await;
}

#[tokio::test(start_paused = true)]
async fn another_tenants_stream_does_not_exist_on_any_endpoint() {
    let t = two_tenants("").await;
    let mut mine = Reader::open_as(&t.g.url, &chat(1000, 50), Some(&t.acme)).await;
    mine.next().await.unwrap();
    let id = mine.stream_id.clone().unwrap();
    // Unguessable: a time-ordered (v7) UUID, a millisecond timestamp then 74 random bits.
    let uuid = uuid::Uuid::parse_str(&id).expect("a UUID");
    assert_eq!(uuid.get_version_num(), 7);

    let url = &t.g.url;
    let other = Some(t.globex.as_str());
    let (_, _, list) = call(reqwest::Method::GET, &format!("{url}/v1/streams"), other).await;
    assert_eq!(list["data"], json!([]), "not listed for another tenant");
    for (method, path) in [
        (reqwest::Method::GET, format!("/v1/streams/{id}")),
        (reqwest::Method::GET, format!("/v1/streams/{id}/events")),
        (reqwest::Method::POST, format!("/v1/streams/{id}/cancel")),
    ] {
        let (status, _, body) = call(method.clone(), &format!("{url}{path}"), other).await;
        assert_eq!(status, 404, "{method} {path} answers 404 to another tenant");
        let (status_missing, _, body_missing) = call(
            method.clone(),
            &format!(
                "{url}{}",
                path.replace(&id, "00000000-0000-4000-8000-000000000000")
            ),
            other,
        )
        .await;
        assert_eq!(status_missing, 404);
        assert_eq!(
            body["error"]["type"], body_missing["error"]["type"],
            "indistinguishable from a missing stream"
        );
    }
    // The owner still sees it, and the other tenant's cancel did nothing.
    let (status, _, list) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/streams"),
        Some(&t.acme),
    )
    .await;
    assert_eq!(
        (status, list["data"][0]["id"].as_str()),
        (200, Some(id.as_str()))
    );
    mine.next()
        .await
        .expect("still streaming after another tenant's cancel");
    let (status, _, body) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/streams/{id}/cancel"),
        Some(&t.acme),
    )
    .await;
    assert_eq!((status, body["reason"].as_str()), (200, Some("requested")));
    mine.finish().await;
}

#[tokio::test(start_paused = true)]
async fn concurrent_streams_are_limited_per_key() {
    let t = two_tenants("max_concurrent_streams = 2").await;
    let mut a = Reader::open_as(&t.g.url, &chat(1000, 50), Some(&t.acme)).await;
    let mut b = Reader::open_as(&t.g.url, &chat(1000, 50), Some(&t.acme)).await;
    a.next().await.unwrap();
    b.next().await.unwrap();
    let mut c = Reader::open_as(&t.g.url, &chat(2, 1), Some(&t.acme)).await;
    assert_eq!(c.status, 429);
    let body = c.error_body().await;
    assert_eq!(body["error"]["code"], "concurrency_limit_exceeded");
    // Another key is not affected.
    let mut other = Reader::open_as(&t.g.url, &chat(2, 1), Some(&t.globex)).await;
    assert_eq!(other.status, 200);
    other.finish().await;
    // When a stream ends, its place is free again.
    a.disconnect();
    final_transcript_as(&t.g.url, a.stream_id.as_deref().unwrap(), &t.acme).await;
    let mut d = Reader::open_as(&t.g.url, &chat(2, 1), Some(&t.acme)).await;
    assert_eq!(d.status, 200);
    d.finish().await;
    b.disconnect();
}

#[tokio::test(start_paused = true)]
async fn a_stream_refused_for_its_key_sends_nothing_upstream() {
    // A stream is recorded (its key's place taken) before the upstream is called: a refused
    // one must never reach the upstream (or its bill).
    let upstream = mock(MockOptions::default()).await;
    let acme = new_key().unwrap();
    let config = format!(
        "{}max_concurrent_streams = 1\n{}",
        config_lines("acme", &acme),
        openai_model(&upstream, "")
    );
    let g = gateway(&config).await;
    let body = chat_body(
        "up",
        true,
        json!({"tokens": 1000, "token_interval_ms": 50}),
        json!(null),
    );
    let mut running = Reader::open_as(&g.url, &body, Some(&acme)).await;
    assert_eq!(running.status, 200);
    running.next().await.unwrap();
    assert_eq!(upstream.stats().started(), 1);
    for _ in 0..3 {
        let mut refused = Reader::open_as(&g.url, &body, Some(&acme)).await;
        assert_eq!(refused.status, 429);
        assert_eq!(
            refused.error_body().await["error"]["code"],
            "concurrency_limit_exceeded"
        );
    }
    assert_eq!(
        upstream.stats().started(),
        1,
        "a refused stream is never sent upstream"
    );
    running.disconnect();
}

#[tokio::test(start_paused = true)]
async fn requests_per_minute_are_limited_per_key_with_retry_after() {
    let t = two_tenants("requests_per_minute = 2").await;
    for _ in 0..2 {
        let mut r = Reader::open_as(&t.g.url, &chat(1, 1), Some(&t.acme)).await;
        assert_eq!(r.status, 200);
        r.finish().await;
    }
    let response = client()
        .post(format!("{}/v1/chat/completions", t.g.url))
        .bearer_auth(&t.acme)
        .json(&chat(1, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (29..=30).contains(&retry_after),
        "one request every 30 s: retry after {retry_after}"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        (
            body["error"]["type"].as_str(),
            body["error"]["code"].as_str()
        ),
        (Some("rate_limit_error"), Some("rate_limit_exceeded"))
    );
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let mut r = Reader::open_as(&t.g.url, &chat(1, 1), Some(&t.acme)).await;
    assert_eq!(r.status, 200, "admitted again after Retry-After");
    r.finish().await;
}

#[tokio::test(start_paused = true)]
async fn without_keys_sluice_refuses_a_non_loopback_address() {
    let dir = tempfile::tempdir().unwrap();
    let overrides = sluice::Overrides {
        listen: Some("0.0.0.0:0".parse().unwrap()),
        data_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let config = sluice::Config::parse("", std::path::Path::new("t.toml"), &overrides).unwrap();
    let err = sluice::Server::bind(config).await.expect_err("must refuse");
    let text = err.to_string();
    assert!(
        text.contains("without API keys") && text.contains("sluice keys new"),
        "{text}"
    );

    // With a key it listens.
    let key = new_key().unwrap();
    let config = sluice::Config::parse(
        &config_lines("acme", &key),
        std::path::Path::new("t.toml"),
        &overrides,
    )
    .unwrap();
    let server = sluice::Server::bind(config)
        .await
        .expect("listens with keys");
    server.shutdown().await.unwrap();
}

/// The transcript as `key`'s tenant sees it, once final.
async fn final_transcript_as(url: &str, id: &str, key: &str) -> Value {
    for _ in 0..500 {
        let (_, _, t) = call(
            reqwest::Method::GET,
            &format!("{url}/v1/streams/{id}"),
            Some(key),
        )
        .await;
        if t["status"] != "streaming" {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never final");
}
