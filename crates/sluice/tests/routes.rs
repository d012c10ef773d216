//! Routes: fallback (with retries, the first-token timer, and failover that continues a
//! half-finished answer), race, hedge and gather under one deadline, the circuit breaker, and
//! every attempt in the transcript. Targets are the in-process simulated model (timings on the
//! paused clock) and real `mock-upstream` servers over HTTP (to see losers' connections closed).

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use sluice::mock_upstream::MockOptions;
use sluice::upstream::sim::{token_text, SimDefaults};

/// The text of a healthy simulated answer of `n` tokens.
fn healthy(n: u32) -> String {
    (0..n).map(token_text).collect()
}

const SIMS: &str = r#"
[[models]]
name = "ok"
kind = "sim"
sim = { first_token_ms = 20, token_interval_ms = 10 }
[[models]]
name = "broken"
kind = "sim"
sim = { http_status = 503 }
[[models]]
name = "flaky"
kind = "sim"
sim = { first_token_ms = 20, token_interval_ms = 10, fail_after = 5 }
[[models]]
name = "slow"
kind = "sim"
first_token_timeout_ms = 200
sim = { first_token_ms = 2000, token_interval_ms = 10 }
"#;

fn route(name: &str, strategy: &str, targets: &[&str], extra: &str) -> String {
    let targets: Vec<String> = targets.iter().map(|t| format!("{t:?}")).collect();
    format!(
        "[[routes]]\nname = {name:?}\nstrategy = {strategy:?}\ntargets = [{}]\n{extra}\n",
        targets.join(", ")
    )
}

/// A `mock-upstream` server whose answers have these defaults.
async fn mock_with(defaults: SimDefaults) -> sluice::mock_upstream::MockUpstream {
    mock(MockOptions {
        defaults,
        ..MockOptions::default()
    })
    .await
}

/// A mock whose first token takes `first_token_ms`.
async fn mock_after(first_token_ms: u64) -> sluice::mock_upstream::MockUpstream {
    mock_with(SimDefaults {
        first_token_ms,
        token_interval_ms: 5,
        ..SimDefaults::default()
    })
    .await
}

/// `[[models]]` of kind `openai`, each at its mock, with `extra` lines.
fn openai_models(models: &[(&str, &sluice::mock_upstream::MockUpstream, &str)]) -> String {
    models
        .iter()
        .map(|(name, m, extra)| {
            format!(
                "[[models]]\nname = {name:?}\nkind = \"openai\"\nbase_url = \"{}\"\n{extra}\n",
                m.base_url()
            )
        })
        .collect()
}

/// Streams an answer of `tokens` simulated tokens from `model`; returns it and its transcript.
async fn ask(g: &Gateway, model: &str, tokens: u32) -> (Reader, Value) {
    run_stream(
        &g.url,
        &chat_body(model, true, json!({ "tokens": tokens }), json!(null)),
    )
    .await
}

/// Asks `model` for a streamed answer of three tokens; the response as it comes.
async fn three_tokens_from(g: &Gateway, model: &str) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", g.url))
        .json(&chat_body(model, true, json!({"tokens": 3}), json!(null)))
        .send()
        .await
        .unwrap()
}

fn attempts(t: &Value) -> Vec<(String, String)> {
    t["attempts"]
        .as_array()
        .expect("attempts in the transcript")
        .iter()
        .map(|a| {
            (
                a["target"].as_str().unwrap().to_string(),
                a["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn fallback_retries_then_moves_on_and_the_client_sees_one_clean_answer() {
    let config = format!(
        "{SIMS}{}",
        route("r", "fallback", &["broken", "slow", "ok"], "retries = 2")
    );
    let g = gateway(&config).await;
    let (r, t) = ask(&g, "r", 12).await;
    assert_eq!(ending(&t), ("completed".into(), None));
    assert_eq!(
        r.content(),
        healthy(12),
        "nothing of a failed attempt reached the client"
    );
    assert_eq!(
        attempts(&t),
        pairs(&[
            ("broken", "failed"),
            ("broken", "failed"),
            ("broken", "failed"),
            ("slow", "timed_out"),
            ("ok", "completed"),
        ]),
        "{}",
        t["attempts"]
    );
    // The retries waited (backoff with jitter), and the slow target had its 200 ms.
    let a = t["attempts"].as_array().unwrap();
    assert!(a[1]["started_ms"].as_f64().unwrap() >= 50.0, "{}", a[1]);
    let slow = &a[3];
    let waited = slow["ended_ms"].as_f64().unwrap() - slow["started_ms"].as_f64().unwrap();
    assert!((199.0..260.0).contains(&waited), "{slow}");
}

/// Retries stop at the route's deadline: however many are allowed, none starts after it, and
/// the stream fails at the deadline saying what each attempt did.
#[tokio::test(start_paused = true)]
async fn retries_stay_inside_the_deadline() {
    let config = format!(
        "{SIMS}{}",
        route(
            "r",
            "fallback",
            &["broken"],
            "retries = 50\nretry_backoff_ms = 100\ntotal_timeout_ms = 1000"
        )
    );
    let g = gateway(&config).await;
    let started = tokio::time::Instant::now();
    let response = three_tokens_from(&g, "r").await;
    let status = response.status();
    let body = response.text().await.unwrap();
    let elapsed = started.elapsed();
    let id = g.newest(1).await[0].id.clone();
    let t = final_transcript(&g.url, &id).await;
    assert_eq!(status, 502, "after {elapsed:?}: {body} {t}");
    assert!(elapsed <= Duration::from_millis(1000), "{elapsed:?}");
    let tried = t["attempts"].as_array().unwrap();
    // Backoffs of 50-100, 100-200, 200-400, 400-800 ms: at most five tries fit in a second.
    assert!((3..=5).contains(&tried.len()), "{}", t["attempts"]);
    assert!(tried
        .iter()
        .all(|a| a["started_ms"].as_f64().unwrap() < 1000.0 && a["outcome"] == "failed"));
    assert_eq!(ending(&t), ("failed".into(), Some("upstream_error".into())));
}

#[tokio::test(start_paused = true)]
async fn an_attempt_still_waiting_at_the_deadline_is_a_timeout() {
    let config = format!(
        "{SIMS}{}",
        route(
            "r",
            "fallback",
            &["broken", "slow"],
            "retries = 0\ntotal_timeout_ms = 150"
        )
    );
    let g = gateway(&config).await;
    let response = three_tokens_from(&g, "r").await;
    assert_eq!(response.status(), 504);
    let id = g.newest(1).await[0].id.clone();
    let t = final_transcript(&g.url, &id).await;
    assert_eq!(t["status"], "timed_out");
    assert_eq!(
        attempts(&t),
        pairs(&[("broken", "failed"), ("slow", "cancelled")]),
        "the attempt still waiting was stopped with the stream"
    );
    assert_eq!(t["attempts"][1]["ended_ms"].as_f64(), Some(150.0));
}

#[tokio::test(start_paused = true)]
async fn a_target_that_fails_mid_answer_is_continued_by_the_next() {
    let config = format!("{SIMS}{}", route("r", "fallback", &["flaky", "ok"], ""));
    let g = gateway(&config).await;
    let (r, t) = ask(&g, "r", 20).await;
    assert_eq!(ending(&t), ("completed".into(), None));
    assert_eq!(
        r.content(),
        healthy(20),
        "one uninterrupted answer, as one healthy target would have given"
    );
    assert_eq!(t["content"], healthy(20));
    assert_eq!(
        attempts(&t),
        pairs(&[("flaky", "failed"), ("ok", "completed")])
    );
    let took_over = &t["attempts"][1];
    assert_eq!(
        took_over["continued_from_chars"].as_u64(),
        Some(healthy(5).len() as u64),
        "the second took over after the first's five tokens"
    );
}

#[tokio::test(start_paused = true)]
async fn without_a_target_that_can_continue_a_failure_mid_answer_is_an_error() {
    let up = mock_with(SimDefaults {
        fail_after: Some(3),
        ..SimDefaults::default()
    })
    .await;
    let other = mock(MockOptions::default()).await;
    let config = format!(
        "{}{}",
        openai_models(&[("a", &up, ""), ("b", &other, "")]),
        route("r", "fallback", &["a", "b"], "")
    );
    let g = gateway(&config).await;
    let (r, t) = ask(&g, "r", 10).await;
    assert_eq!(ending(&t).0, "failed");
    assert!(
        error_event(&r.events).is_some(),
        "an error event, never [DONE]"
    );
    assert_eq!(
        attempts(&t),
        pairs(&[("a", "failed"), ("b", "skipped")]),
        "b cannot continue (no continue_partial)"
    );
    assert_eq!(other.stats().started(), 0);

    // With `continue_partial`, an OpenAI-kind target is asked to continue (vLLM's flags) and
    // the client gets one answer.
    let config = format!(
        "{}{}",
        openai_models(&[("a", &up, ""), ("b", &other, "continue_partial = true")]),
        route("r", "fallback", &["a", "b"], "")
    );
    let g = gateway(&config).await;
    let (r, t) = ask(&g, "r", 10).await;
    assert_eq!(ending(&t), ("completed".into(), None));
    assert_eq!(r.content(), healthy(10));
    assert_eq!(attempts(&t), pairs(&[("a", "failed"), ("b", "completed")]));
}

#[tokio::test]
async fn race_streams_the_first_and_closes_the_others() {
    let slow = mock_after(3000).await;
    let fast = mock_after(20).await;
    let config = format!(
        "{}{}",
        openai_models(&[("slow", &slow, ""), ("fast", &fast, "")]),
        route("r", "race", &["slow", "fast"], "")
    );
    let g = gateway(&config).await;
    let (r, t) = within(
        "the race",
        run_stream(
            &g.url,
            &chat_body("r", true, json!({"tokens": 8}), json!(null)),
        ),
    )
    .await;
    assert_eq!(ending(&t), ("completed".into(), None));
    assert_eq!(r.content(), healthy(8));
    assert_eq!(
        attempts(&t),
        pairs(&[("slow", "lost"), ("fast", "completed")])
    );
    within(
        "the loser's connection closed",
        slow.stats().wait_disconnected(1),
    )
    .await;
    // As the mock itself reports it over HTTP.
    let stats = get_json(&format!(
        "{}/stats",
        slow.base_url().trim_end_matches("/v1")
    ))
    .await;
    assert_eq!(stats["requests_disconnected"], 1, "{stats}");
}

#[tokio::test]
async fn hedge_starts_the_next_target_when_the_first_is_slow_to_start() {
    let slow = mock_after(3000).await;
    let fast = mock_after(10).await;
    let models = openai_models(&[("slow", &slow, ""), ("fast", &fast, "")]);
    let config = format!(
        "{models}{}{}",
        route("h", "hedge", &["slow", "fast"], "hedge_after_ms = 200"),
        route("h2", "hedge", &["fast", "slow"], "hedge_after_ms = 200")
    );
    let g = gateway(&config).await;
    let (r, t) = within(
        "the hedge",
        run_stream(
            &g.url,
            &chat_body("h", true, json!({"tokens": 8}), json!(null)),
        ),
    )
    .await;
    assert_eq!(r.content(), healthy(8));
    assert_eq!(
        attempts(&t),
        pairs(&[("slow", "lost"), ("fast", "completed")])
    );
    let hedged_at = t["attempts"][1]["started_ms"].as_f64().unwrap();
    assert!(
        hedged_at >= 195.0,
        "the hedge waited hedge_after_ms: {hedged_at}"
    );
    within(
        "the slow one's connection closed",
        slow.stats().wait_disconnected(1),
    )
    .await;

    // A first target that starts in time is the only one asked.
    let (_, t) = ask(&g, "h2", 4).await;
    assert_eq!(attempts(&t), pairs(&[("fast", "completed")]));
    assert_eq!(slow.stats().started(), 1);
}

/// The lesson's exercise: two targets answering in 0.5 s and 2 s, gathered under a 1 s
/// deadline. One completed, one timed out, and the answer comes back at the deadline.
#[tokio::test(start_paused = true)]
async fn gather_under_one_deadline_says_who_timed_out() {
    let config = r#"
[[models]]
name = "half"
kind = "sim"
sim = { first_token_ms = 500, token_interval_ms = 0, tokens = 3 }
[[models]]
name = "two"
kind = "sim"
sim = { first_token_ms = 2000, token_interval_ms = 0, tokens = 3 }
[[routes]]
name = "pair"
strategy = "gather"
targets = ["half", "two"]
total_timeout_ms = 1000
"#;
    let g = gateway(config).await;
    let started = tokio::time::Instant::now();
    let response = client()
        .post(format!("{}/v1/chat/completions", g.url))
        .json(&chat_body("pair", false, json!(null), json!(null)))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(1100),
        "back at the deadline: {took:?}"
    );
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2, "{body}");
    assert_eq!(
        (
            choices[0]["sluice_target"].as_str(),
            choices[0]["finish_reason"].as_str()
        ),
        (Some("half"), Some("stop"))
    );
    assert_eq!(choices[0]["message"]["content"], healthy(3));
    assert_eq!(
        (
            choices[1]["sluice_target"].as_str(),
            choices[1]["finish_reason"].as_str()
        ),
        (Some("two"), Some("timed_out"))
    );
    let outcomes: Vec<_> = body["sluice_gather"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["target"].as_str().unwrap(), o["status"].as_str().unwrap()))
        .collect();
    assert_eq!(outcomes, [("half", "completed"), ("two", "timed_out")]);
    let id = g.newest(1).await[0].id.clone();
    let t = final_transcript(&g.url, &id).await;
    assert_eq!(ending(&t), ("completed".into(), None));
    assert_eq!(
        attempts(&t),
        pairs(&[("half", "completed"), ("two", "timed_out")])
    );
}

#[tokio::test]
async fn a_gathered_target_cut_at_the_deadline_has_its_connection_closed() {
    let slow = mock_after(2000).await;
    let fast = mock_with(SimDefaults {
        first_token_ms: 50,
        token_interval_ms: 5,
        tokens: 4,
        ..SimDefaults::default()
    })
    .await;
    let config = format!(
        "{}{}",
        openai_models(&[("slow", &slow, ""), ("fast", &fast, "")]),
        route(
            "pair",
            "gather",
            &["fast", "slow"],
            "total_timeout_ms = 500"
        )
    );
    let g = gateway(&config).await;
    let (r, t) = within(
        "the gather",
        run_stream(&g.url, &chat_body("pair", true, json!(null), json!(null))),
    )
    .await;
    assert_eq!(ending(&t), ("completed".into(), None));
    // Streaming: each target's chunks as its own choice, tagged, then every outcome.
    let chunks = chunk_events(&r.events);
    assert!(chunks
        .iter()
        .filter(|(_, c)| c["choices"].as_array().is_some_and(|a| !a.is_empty()))
        .all(|(_, c)| c["sluice_target"] == "fast" && c["choices"][0]["index"] == 0));
    let last = &chunks.last().unwrap().1;
    assert_eq!(last["sluice_gather"][1]["status"], "timed_out", "{last}");
    assert_eq!(last["sluice_gather"][0]["content"], healthy(4));
    within(
        "the slow target's connection closed",
        slow.stats().wait_disconnected(1),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_target_that_keeps_failing_is_skipped_for_a_while() {
    let config = r#"
[[models]]
name = "broken"
kind = "sim"
breaker_failures = 2
breaker_open_ms = 60000
sim = { http_status = 500 }
[[models]]
name = "ok"
kind = "sim"
sim = { first_token_ms = 5, token_interval_ms = 1 }
[[routes]]
name = "r"
strategy = "fallback"
targets = ["broken", "ok"]
retries = 0
"#;
    let g = gateway(config).await;
    let body = chat_body("r", true, json!({"tokens": 2}), json!(null));
    for _ in 0..2 {
        let (_, t) = run_stream(&g.url, &body).await;
        assert_eq!(
            attempts(&t),
            pairs(&[("broken", "failed"), ("ok", "completed")])
        );
    }
    let (_, t) = run_stream(&g.url, &body).await;
    assert_eq!(
        attempts(&t),
        pairs(&[("broken", "skipped"), ("ok", "completed")]),
        "the breaker opened after two failures in a row"
    );
    let metrics = get_text(&format!("{}/metrics", g.url)).await;
    assert!(
        metrics.contains("sluice_route_breaker_open{target=\"broken\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains(
        "sluice_route_attempts_total{route=\"r\",target=\"broken\",outcome=\"failed\"} 2"
    ));
    // After the breaker's time, the target is tried again.
    tokio::time::advance(Duration::from_secs(61)).await;
    let (_, t) = run_stream(&g.url, &body).await;
    assert_eq!(
        attempts(&t),
        pairs(&[("broken", "failed"), ("ok", "completed")])
    );
}

#[tokio::test(start_paused = true)]
async fn routed_streams_cancel_and_resume_like_any_other() {
    let config = format!(
        "{SIMS}{}",
        route("r", "fallback", &["broken", "ok"], "retries = 0")
    );
    let g = gateway(&config).await;
    let body = chat_body("r", true, json!({"tokens": 5000}), json!(null));
    let mut reader = Reader::open(&g.url, &body).await;
    for _ in 0..3 {
        reader.next().await.expect("a chunk");
    }
    let id = reader.stream_id.clone().unwrap();
    let events_url = format!("{}/v1/streams/{id}/events?after=1", g.url);
    let replay = get_text(&events_url);
    let answer = post_json(&format!("{}/v1/streams/{id}/cancel", g.url)).await;
    assert_eq!(answer["reason"], "requested", "{answer}");
    reader.finish().await;
    assert_eq!(error_event(&reader.events).unwrap()["code"], "requested");
    let replay = replay.await;
    assert!(
        !replay.contains("id: 1\n") && replay.contains("id: 2\n"),
        "{replay}"
    );
    let t = final_transcript(&g.url, &id).await;
    assert_eq!(ending(&t), ("cancelled".into(), Some("requested".into())));
    assert_eq!(
        attempts(&t),
        pairs(&[("broken", "failed"), ("ok", "cancelled")])
    );
}

#[tokio::test]
async fn routes_are_checked_when_the_config_is_read() {
    for (bad, key) in [
        (
            route("r", "fallback", &["nope"], ""),
            "routes[0].targets[0]",
        ),
        (route("r", "fallback", &[], ""), "routes[0].targets"),
        (route("ok", "race", &["ok"], ""), "routes[0].name"),
        (
            route("r", "race", &["ok"], "hedge_after_ms = 5"),
            "routes[0].hedge_after_ms",
        ),
        (route("r", "shuffle", &["ok"], ""), "routes[0].strategy"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, format!("{SIMS}{bad}")).unwrap();
        let err = sluice::config::Config::load(Some(&path), &Default::default())
            .expect_err(&bad)
            .to_string();
        assert!(err.contains(key), "{err} should name {key}");
    }
}
