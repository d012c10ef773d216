//! The relay over real HTTP with the built-in `sim` model: every timer before and after the first
//! token, keep-alives, client disconnects, a slow client, shutdown. Timing runs on tokio's paused
//! clock; the transcript invariants are checked after every scenario.
#![allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]
#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const SIM: &str = "";

#[tokio::test(start_paused = true)]
async fn a_stream_completes_with_done_ids_and_a_transcript() {
    let g = gateway(SIM).await;
    let body = chat_body(
        "sim",
        true,
        json!({"tokens": 5, "first_token_ms": 100, "token_interval_ms": 10}),
        json!(null),
    );
    let (r, t) = run_stream(&g.url, &body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.events.last().unwrap().data, "[DONE]");
    assert_eq!(r.events.len(), 7, "5 tokens, the finish chunk, [DONE]");
    assert_eq!(r.content(), "Hello from sluice's simulated");
    assert_eq!(ending(&t), ("completed".into(), None));
    assert_eq!(t["content"], "Hello from sluice's simulated");
    assert_eq!(t["usage"]["completion_tokens"], 5);
    assert_eq!(
        t["timings"]["time_to_first_token_ms"]
            .as_f64()
            .map(f64::round),
        Some(100.0)
    );
    assert_eq!(
        t["timings"]["total_ms"].as_f64().map(f64::round),
        Some(140.0)
    );
    assert_eq!(t["request"]["messages"][0]["content"], "say something");
    assert!(
        t["request"].get("sluice").is_none(),
        "gateway options are not part of the request"
    );
}

#[tokio::test(start_paused = true)]
async fn a_non_streaming_request_gets_the_assembled_completion() {
    let g = gateway(SIM).await;
    let body = chat_body("sim", false, json!({"tokens": 3}), json!(null));
    let response = client()
        .post(format!("{}/v1/chat/completions", g.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-sluice-stream-id"]
        .to_str()
        .unwrap()
        .to_string();
    let v: Value = response.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from sluice");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let t = final_transcript(&g.url, &id).await;
    assert_eq!(ending(&t), ("completed".into(), None));
}

#[tokio::test(start_paused = true)]
async fn first_token_timeout_before_any_byte_is_a_504() {
    let g = gateway(SIM).await;
    let body = chat_body(
        "sim",
        true,
        json!({"first_token_ms": 5000}),
        json!({"first_token_timeout_ms": 1000}),
    );
    let started = tokio::time::Instant::now();
    let mut r = Reader::open(&g.url, &body).await;
    assert_eq!(r.status, 504);
    assert_eq!(started.elapsed(), Duration::from_millis(1000));
    let e = r.error_body().await;
    assert_eq!(e["error"]["code"], "first_token");
    assert_eq!(e["error"]["type"], "timed_out");
    let t = final_transcript(&g.url, r.stream_id.as_deref().unwrap()).await;
    assert_eq!(ending(&t), ("timed_out".into(), Some("first_token".into())));
    assert_invariants(&[], &t);
}

#[tokio::test(start_paused = true)]
async fn the_first_token_timer_stops_mattering_after_the_first_token() {
    let g = gateway(SIM).await;
    // Tokens 800 ms apart: past the first-token limit, inside the idle limit.
    let body = chat_body(
        "sim",
        true,
        json!({"tokens": 4, "first_token_ms": 500, "token_interval_ms": 800}),
        json!({"first_token_timeout_ms": 600, "idle_timeout_ms": 1000}),
    );
    let (_, t) = run_stream(&g.url, &body).await;
    assert_eq!(ending(&t), ("completed".into(), None));
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_after_the_first_token_is_an_error_event_not_done() {
    let g = gateway(SIM).await;
    let body = chat_body(
        "sim",
        true,
        json!({"stall_after": 2, "first_token_ms": 10, "token_interval_ms": 10}),
        json!({"idle_timeout_ms": 300}),
    );
    let (r, t) = run_stream(&g.url, &body).await;
    assert_eq!(r.status, 200);
    assert_eq!(chunk_events(&r.events).len(), 2);
    let e = error_event(&r.events).expect("an error event ends the stream");
    assert_eq!(e["code"], "idle");
    assert!(!r.raw.contains("[DONE]"));
    assert_eq!(ending(&t), ("timed_out".into(), Some("idle".into())));
    assert_eq!(
        t["timings"]["total_ms"].as_f64().map(f64::round),
        Some(320.0)
    );
}

#[tokio::test(start_paused = true)]
async fn before_the_first_token_only_the_first_token_timer_runs() {
    let g = gateway(SIM).await;
    // Idle is shorter than the wait for the first token, but idle only counts between tokens.
    let body = chat_body(
        "sim",
        true,
        json!({"tokens": 2, "first_token_ms": 900}),
        json!({"first_token_timeout_ms": 1000, "idle_timeout_ms": 200}),
    );
    let (_, t) = run_stream(&g.url, &body).await;
    assert_eq!(ending(&t), ("completed".into(), None));
}

#[tokio::test(start_paused = true)]
async fn total_timeout_after_the_first_token() {
    let g = gateway(SIM).await;
    let body = chat_body(
        "sim",
        true,
        json!({"tokens": 100, "first_token_ms": 10, "token_interval_ms": 100}),
        json!({"total_timeout_ms": 1000}),
    );
    let (r, t) = run_stream(&g.url, &body).await;
    assert_eq!(
        error_event(&r.events).expect("error event")["code"],
        "total"
    );
    assert_eq!(ending(&t), ("timed_out".into(), Some("total".into())));
    assert_eq!(
        chunk_events(&r.events).len(),
        10,
        "tokens at 10, 110, ..., 910 ms"
    );
}

#[tokio::test(start_paused = true)]
async fn total_timeout_before_the_first_token_is_a_504() {
    let g = gateway(SIM).await;
    let body = chat_body(
        "sim",
        true,
        json!({"first_token_ms": 3000}),
        json!({"first_token_timeout_ms": 5000, "total_timeout_ms": 2000}),
    );
    let mut r = Reader::open(&g.url, &body).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.error_body().await["error"]["code"], "total");
}

#[tokio::test(start_paused = true)]
async fn keep_alives_flow_while_the_upstream_is_silent_and_never_reset_idle() {
    let g = gateway("keep_alive_ms = 100").await;
    let body = chat_body(
        "sim",
        true,
        json!({"stall_after": 1, "first_token_ms": 250}),
        json!({"idle_timeout_ms": 350}),
    );
    let (r, t) = run_stream(&g.url, &body).await;
    // Before the first token at 250 ms: keep-alives at 100 and 200 (the first one commits the
    // 200). After it: keep-alives at 350, 450, 550; idle fires at 600 all the same.
    assert_eq!(r.status, 200);
    assert_eq!(r.raw.matches(": keep-alive").count(), 5, "{}", r.raw);
    assert_eq!(error_event(&r.events).expect("error event")["code"], "idle");
    assert_eq!(
        t["timings"]["total_ms"].as_f64().map(f64::round),
        Some(600.0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_keep_alive_before_the_first_token_commits_to_200_then_errors_in_band() {
    let g = gateway("keep_alive_ms = 100").await;
    let body = chat_body(
        "sim",
        true,
        json!({"first_token_ms": 5000}),
        json!({"first_token_timeout_ms": 450}),
    );
    let (r, t) = run_stream(&g.url, &body).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        error_event(&r.events).expect("error event")["code"],
        "first_token"
    );
    assert_eq!(ending(&t), ("timed_out".into(), Some("first_token".into())));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_mid_stream_cancels_it() {
    let g = gateway(SIM).await;
    let body = chat_body(
        "sim",
        true,
        json!({"tokens": 1000, "token_interval_ms": 50}),
        json!(null),
    );
    let mut r = Reader::open(&g.url, &body).await;
    for _ in 0..3 {
        r.next().await.expect("a chunk");
    }
    r.disconnect();
    let t = final_transcript(&g.url, r.stream_id.as_deref().unwrap()).await;
    assert_eq!(
        ending(&t),
        ("cancelled".into(), Some("client_disconnected".into()))
    );
    assert_invariants(&r.events, &t);
    assert!(
        t["chunks"].as_array().unwrap().len() < 10,
        "the relay stopped soon after the client left"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_before_the_first_token_cancels_it() {
    let g = gateway(SIM).await;
    let body = chat_body("sim", true, json!({"first_token_ms": 10_000}), json!(null));
    let url = g.url.clone();
    // The client gives up while the response headers are still pending.
    let request = tokio::spawn(async move { Reader::open(&url, &body).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    request.abort();
    let _ = request.await;
    let list = g.newest(1).await;
    let id = list[0].id.clone();
    let t = final_transcript(&g.url, &id).await;
    assert_eq!(
        ending(&t),
        ("cancelled".into(), Some("client_disconnected".into()))
    );
    assert_eq!(
        t["timings"]["total_ms"].as_f64().map(f64::round),
        Some(500.0),
        "cancelled when the client left, not later"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_cut_as_slow_and_the_upstream_is_not_drained() {
    let g = gateway("slow_client_timeout_ms = 1000\nbuffer_chunks = 4\nsend_buffer_bytes = 16384")
        .await;
    let tokens = 5_000;
    let body = chat_body(
        "sim",
        true,
        json!({"tokens": tokens, "first_token_ms": 1, "token_interval_ms": 0}),
        json!(null),
    );
    // A raw client with a tiny receive buffer that reads the headers and then nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(g.server.addr()).await.unwrap();
    let payload = body.to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{payload}",
        payload.len()
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 512];
    let n = stream.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-sluice-stream-id: "))
        .expect("stream id header")
        .trim()
        .to_string();
    let t = final_transcript(&g.url, &id).await;
    assert_eq!(ending(&t), ("cancelled".into(), Some("slow_client".into())));
    let stored = t["chunks"].as_array().unwrap().len();
    assert!(
        stored < 500,
        "backpressure: only {stored} of {tokens} chunks were read from the upstream"
    );
    drop(stream);
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_running_streams_as_interrupted_after_the_grace() {
    let g = gateway("shutdown_grace_ms = 500").await;
    let quick = chat_body(
        "sim",
        true,
        json!({"tokens": 3, "token_interval_ms": 100}),
        json!(null),
    );
    let long = chat_body(
        "sim",
        true,
        json!({"tokens": 1000, "token_interval_ms": 100}),
        json!(null),
    );
    let mut a = Reader::open(&g.url, &quick).await;
    let mut b = Reader::open(&g.url, &long).await;
    a.next().await.expect("a chunk");
    b.next().await.expect("a chunk");
    let url = g.url.clone();
    let stop = tokio::spawn(async move { g.server.shutdown().await });
    a.finish().await;
    b.finish().await;
    let report = stop.await.unwrap().expect("clean shutdown");
    assert_eq!(report.drained, sluice_flow::Drained::Complete);
    // The quick stream finished inside the grace period; the long one was interrupted.
    assert_eq!(a.events.last().unwrap().data, "[DONE]");
    let e = error_event(&b.events).expect("an error event");
    assert_eq!(e["code"], "shutdown");
    assert!(!b.raw.contains("[DONE]"));
    // The server is gone: read the transcripts straight from its database file.
    drop(url);
    let (store, _) = sluice::store::Store::open(&g.dir.path().join("data")).unwrap();
    for (reader, expected) in [
        (&a, ("completed", None)),
        (&b, ("interrupted", Some("shutdown"))),
    ] {
        let t = store
            .get(
                sluice::stream::Tenant("local"),
                sluice::stream::StreamId(reader.stream_id.as_deref().unwrap()),
            )
            .await
            .unwrap()
            .unwrap();
        let t = serde_json::to_value(t).unwrap();
        assert_eq!(
            ending(&t),
            (expected.0.to_string(), expected.1.map(str::to_string))
        );
        assert_invariants(&reader.events, &t);
    }
}

#[tokio::test(start_paused = true)]
async fn bad_requests_get_openai_errors_and_leave_no_stream() {
    let g = gateway("max_body_bytes = 2048").await;
    let post = |body: String| {
        let url = g.url.clone();
        async move {
            let r = client()
                .post(format!("{url}/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, e) = post("{nope".into()).await;
    assert_eq!(status, 400);
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let (status, e) =
        post(json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).to_string())
            .await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let (status, e) = post(
        json!({"model": "sim", "messages": [{"role": "user", "content": "x".repeat(4000)}]})
            .to_string(),
    )
    .await;
    assert_eq!(status, 413, "{e}");
    let (status, e) = post(json!({"model": "sim", "messages": [{"role": "user", "content": "x"}], "sim": {"tokenz": 1}}).to_string()).await;
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("sim.tokenz"))
    );
    let (status, e) = post(json!({"model": "sim", "messages": [{"role": "user", "content": "x"}], "sluice": {"idle_timeout_ms": -1}}).to_string()).await;
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("sluice.idle_timeout_ms"))
    );
    let list = g.newest(10).await;
    assert!(
        list.is_empty(),
        "no stream was recorded for a rejected request"
    );
}

/// The list shows a running stream moving (its committed chunks, its first chunk's time) and a
/// finished one with its timings.
#[tokio::test(start_paused = true)]
async fn the_list_shows_running_streams_progress_and_finished_ones_timings() {
    let g = gateway(SIM).await;
    let body = chat_body(
        "sim",
        true,
        json!({"tokens": 50, "first_token_ms": 40, "token_interval_ms": 20}),
        json!(null),
    );
    let mut r = Reader::open(&g.url, &body).await;
    for _ in 0..6 {
        r.next().await.expect("a chunk");
    }
    let list: Value = get_json(&format!("{}/v1/streams?limit=1", g.url)).await;
    let s = &list["data"][0];
    assert_eq!(s["status"], "streaming", "{s}");
    assert!(s["chunk_count"].as_u64().unwrap_or(0) >= 6, "{s}");
    let ttft = s["timings"]["time_to_first_token_ms"]
        .as_f64()
        .expect("first chunk's time");
    assert!(ttft >= 40.0, "{s}");
    assert!(s["timings"]["total_ms"].is_null(), "{s}");
    r.finish().await;
    let list: Value = get_json(&format!("{}/v1/streams?limit=1", g.url)).await;
    let s = &list["data"][0];
    assert_eq!(
        (s["status"].as_str(), s["chunk_count"].as_u64()),
        (Some("completed"), Some(51)),
        "{s}"
    );
    assert!(
        s["timings"]["total_ms"].as_f64().expect("total") >= 40.0 + 49.0 * 20.0,
        "{s}"
    );
}

#[tokio::test(start_paused = true)]
async fn models_health_streams_and_metrics() {
    let g = gateway(SIM).await;
    let models: Value = get_json(&format!("{}/v1/models", g.url)).await;
    assert_eq!(models["data"][0]["id"], "sim");
    assert_eq!(
        get_text(&format!("{}/healthz", g.url)).await,
        r#"{"status":"ok"}"#
    );
    let (_, t) = run_stream(
        &g.url,
        &chat_body("sim", true, json!({"tokens": 2}), json!(null)),
    )
    .await;
    let list: Value = get_json(&format!("{}/v1/streams?limit=1", g.url)).await;
    assert_eq!(list["data"][0]["id"], t["id"]);
    let missing = client()
        .get(format!("{}/v1/streams/nope", g.url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let metrics = get_text(&format!("{}/metrics", g.url)).await;
    for name in [
        "sluice_requests_total",
        "sluice_chunks_relayed_total",
        "sluice_streams_finished_total",
        "sluice_time_to_first_token_seconds_bucket",
        "sluice_inter_chunk_seconds_bucket",
        "sluice_stream_buffer_depth_bucket",
        "sluice_store_write_seconds_bucket",
        "sluice_gateway_overhead_seconds_bucket",
        "sluice_active_streams",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

#[tokio::test(start_paused = true)]
async fn the_transcript_keeps_the_request_as_the_client_sent_it() {
    let g = gateway("").await;
    // Fields sluice does not read, escapes, non-ASCII text and nesting: all kept, nothing added
    // (no `sluice` options here: the gateway stores the body it received).
    let mut body = chat_body("sim", true, json!({"tokens": 2}), json!(null));
    body["temperature"] = json!(0.25);
    body["tools"] = json!([{"type": "function", "function": {"name": "fé", "parameters": {}}}]);
    body["messages"][0]["content"] = json!("café \"quoted\" \n line ☕");
    body.as_object_mut().unwrap().remove("sluice");
    let (r, t) = run_stream(&g.url, &body).await;
    assert_eq!(r.status, 200);
    assert_eq!(t["request"], body);
}

#[tokio::test(start_paused = true)]
async fn with_record_chunks_off_only_the_request_and_ending_are_kept() {
    let g = gateway("record_chunks = false").await;
    let mut r = Reader::open(
        &g.url,
        &chat_body("sim", true, json!({"tokens": 4}), json!(null)),
    )
    .await;
    r.finish().await;
    assert_eq!(r.content(), "Hello from sluice's");
    let t = final_transcript(&g.url, r.stream_id.as_deref().unwrap()).await;
    assert_eq!(ending(&t), ("completed".into(), None));
    assert_eq!(t["chunks"], json!([]));
    assert_eq!(t["request"]["model"], "sim");
}

/// A store that cannot record a stream (its journal is on a full disk: a stream's record is
/// made durable there) refuses it before it starts, with a clear error, and counts the failed
/// write. (A chunk the store cannot keep midway is the relay's test
/// `a_chunk_the_store_cannot_keep_ends_the_stream_failed_and_is_never_stored`.)
#[tokio::test(start_paused = true)]
async fn a_stream_the_store_cannot_record_is_refused_before_it_starts() {
    // A disk that is full for the journal: its first segment is /dev/full, where every write
    // fails with ENOSPC (the journal opens that segment in place at start).
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = dir.path().join("data").join("journal");
    std::fs::create_dir_all(&journal).unwrap();
    std::os::unix::fs::symlink("/dev/full", journal.join(format!("{:020}.journal", 0))).unwrap();
    let (server, url) = restart_on(dir.path().join("data")).await;
    let g = Gateway { server, url, dir };
    let r = client()
        .post(format!("{}/v1/chat/completions", g.url))
        .json(&chat_body("sim", true, json!({"tokens": 3}), json!(null)))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.expect("an error body");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    let metrics = get_text(&format!("{}/metrics", g.url)).await;
    let failed: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_store_write_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(failed >= 1.0, "no failed write counted:\n{metrics}");
    // Nothing half-recorded: the store lists no stream.
    let list: Value = client()
        .get(format!("{}/v1/streams", g.url))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("a list");
    assert_eq!(list["data"], json!([]), "{list}");
}
