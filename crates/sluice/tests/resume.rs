//! Streams you can come back to: resume at every seam, many readers and random resume points
//! under concurrency, cancel (racing resumers), the disconnect policies, and a restart.
//! Paused clock; real HTTP and SQLite.
#![allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]
#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use sluice::upstream::sse::SseEvent;

/// Opens `GET /v1/streams/{id}/events` after `after` (as `Last-Event-ID`).
async fn resume(url: &str, id: &str, after: Option<u64>) -> Reader {
    Reader::get(&format!("{url}/v1/streams/{id}/events"), after, None).await
}

/// The events as (id, data) pairs, for comparing two readers.
fn pairs(events: &[SseEvent]) -> Vec<(u64, String)> {
    events
        .iter()
        .map(|e| (e.id.as_deref().unwrap().parse().unwrap(), e.data.clone()))
        .collect()
}

/// What a reader that resumed after `after` must have seen: every stored chunk after it, in
/// order, then the original terminal event.
fn expected_after(original: &[SseEvent], after: u64) -> Vec<(u64, String)> {
    pairs(original)
        .into_iter()
        .filter(|(id, _)| *id > after)
        .collect()
}

async fn post_json(url: &str) -> (u16, Value) {
    let r = client().post(url).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn slow(tokens: u32, interval_ms: u64, sluice: Value) -> Value {
    chat_body(
        "sim",
        true,
        json!({"tokens": tokens, "first_token_ms": 100, "token_interval_ms": interval_ms}),
        sluice,
    )
}

#[tokio::test(start_paused = true)]
async fn resume_before_the_first_chunk_gets_everything() {
    let g = gateway("").await;
    let mut original = Reader::open(
        &g.url,
        &chat_body(
            "sim",
            true,
            json!({"tokens": 5, "first_token_ms": 1000}),
            json!(null),
        ),
    )
    .await;
    // The original's headers come with its first chunk; find the stream in the list before.
    let id = loop {
        let list = g.newest(1).await;
        if let Some(s) = list.first() {
            break s.id.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut r = resume(&g.url, &id, None).await;
    assert_eq!(r.status, 200);
    r.finish().await;
    original.finish().await;
    assert_eq!(pairs(&r.events), pairs(&original.events));
    assert_eq!(r.events.last().unwrap().data, "[DONE]");
}

#[tokio::test(start_paused = true)]
async fn resume_mid_stream_continues_after_the_last_event_id() {
    let g = gateway("").await;
    let mut original = Reader::open(&g.url, &slow(20, 50, json!(null))).await;
    for _ in 0..4 {
        original.next().await.unwrap();
    }
    let id = original.stream_id.clone().unwrap();
    let mut r = resume(&g.url, &id, Some(3)).await;
    r.finish().await;
    original.finish().await;
    assert_eq!(pairs(&r.events), expected_after(&original.events, 3));
    let t = final_transcript(&g.url, &id).await;
    assert_invariants(&original.events, &t);
}

#[tokio::test(start_paused = true)]
async fn after_the_end_resume_is_pure_replay_with_the_same_terminal() {
    let g = gateway("").await;
    for sim in [json!({"tokens": 6}), json!({"tokens": 6, "fail_after": 4})] {
        let (original, _) = run_stream(&g.url, &chat_body("sim", true, sim, json!(null))).await;
        let id = original.stream_id.clone().unwrap();
        for after in [None, Some(2), Some(5)] {
            let mut r = resume(&g.url, &id, after).await;
            r.finish().await;
            assert_eq!(
                pairs(&r.events),
                expected_after(&original.events, after.unwrap_or(0))
            );
        }
        // ?after=N works like Last-Event-ID.
        let mut r = Reader::get(
            &format!("{}/v1/streams/{id}/events?after=4", g.url),
            None,
            None,
        )
        .await;
        r.finish().await;
        assert_eq!(pairs(&r.events), expected_after(&original.events, 4));
        // Past the end: nothing.
        let mut r = resume(&g.url, &id, Some(99)).await;
        r.finish().await;
        assert!(r.events.is_empty());
    }
}

#[tokio::test(start_paused = true)]
async fn many_readers_resuming_at_random_points_see_no_gap_and_no_duplicate() {
    let g = gateway("").await;
    let mut original = Reader::open(&g.url, &slow(60, 10, json!(null))).await;
    original.next().await.unwrap();
    let id = original.stream_id.clone().unwrap();
    // A small deterministic generator, so a failure can be replayed.
    let mut seed: u64 = 0x5eed_1234_abcd;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut readers = Vec::new();
    for _ in 0..24 {
        let start_after = Duration::from_millis(rand(700));
        let after = rand(40);
        let (url, id) = (g.url.clone(), id.clone());
        readers.push(tokio::spawn(async move {
            tokio::time::sleep(start_after).await;
            let mut r = resume(&url, &id, Some(after)).await;
            // Some readers are slow, to fall behind the live feed.
            let mut i = 0;
            while r.next().await.is_some() {
                i += 1;
                if i % 7 == 0 {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
            (after, r.events)
        }));
    }
    original.finish().await;
    assert_eq!(original.events.last().unwrap().data, "[DONE]");
    for reader in readers {
        let (after, events) = reader.await.unwrap();
        assert_eq!(
            pairs(&events),
            expected_after(&original.events, after),
            "reader after {after}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn cancel_stops_the_stream_for_its_client_and_every_resumer() {
    let g = gateway("").await;
    let mut original = Reader::open(&g.url, &slow(1000, 50, json!(null))).await;
    for _ in 0..3 {
        original.next().await.unwrap();
    }
    let id = original.stream_id.clone().unwrap();
    let mut a = resume(&g.url, &id, Some(1)).await;
    let mut b = resume(&g.url, &id, None).await;
    a.next().await.unwrap();
    let (status, body) = post_json(&format!("{}/v1/streams/{id}/cancel", g.url)).await;
    assert_eq!(status, 200);
    assert_eq!(
        (body["status"].as_str(), body["reason"].as_str()),
        (Some("cancelled"), Some("requested"))
    );
    original.finish().await;
    a.finish().await;
    b.finish().await;
    let terminal = original.events.last().unwrap().clone();
    assert_eq!(error_event(&original.events).unwrap()["code"], "requested");
    for r in [&a, &b] {
        assert_eq!(
            r.events.last(),
            Some(&terminal),
            "same terminal event for every reader"
        );
    }
    assert_eq!(pairs(&b.events), pairs(&original.events));
    let t = final_transcript(&g.url, &id).await;
    assert_eq!(ending(&t), ("cancelled".into(), Some("requested".into())));
    assert_invariants(&original.events, &t);
    // Idempotent: again, and it changes nothing.
    let (status, again) = post_json(&format!("{}/v1/streams/{id}/cancel", g.url)).await;
    assert_eq!(
        (status, again["status"].as_str(), again["reason"].as_str()),
        (200, Some("cancelled"), Some("requested"))
    );
}

#[tokio::test(start_paused = true)]
async fn cancelling_a_finished_stream_changes_nothing() {
    let g = gateway("").await;
    let (r, _) = run_stream(
        &g.url,
        &chat_body("sim", true, json!({"tokens": 2}), json!(null)),
    )
    .await;
    let id = r.stream_id.unwrap();
    let (status, body) = post_json(&format!("{}/v1/streams/{id}/cancel", g.url)).await;
    assert_eq!(
        (status, body["status"].as_str(), body["reason"].clone()),
        (200, Some("completed"), Value::Null)
    );
    let (status, _) = post_json(&format!("{}/v1/streams/nope/cancel", g.url)).await;
    assert_eq!(status, 404);
}

#[tokio::test(start_paused = true)]
async fn resume_racing_cancel_ends_cleanly_for_everyone() {
    let g = gateway("").await;
    for delay_ms in [0u64, 1, 5, 20] {
        let mut original = Reader::open(&g.url, &slow(1000, 10, json!(null))).await;
        original.next().await.unwrap();
        let id = original.stream_id.clone().unwrap();
        let url = g.url.clone();
        let cancel_id = id.clone();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            post_json(&format!("{url}/v1/streams/{cancel_id}/cancel")).await
        });
        let mut r = resume(&g.url, &id, Some(0)).await;
        r.finish().await;
        original.finish().await;
        let (status, _) = canceller.await.unwrap();
        assert_eq!(status, 200);
        let t = final_transcript(&g.url, &id).await;
        assert_eq!(ending(&t), ("cancelled".into(), Some("requested".into())));
        let (a, b) = (pairs(&r.events), pairs(&original.events));
        if a != b {
            let ids = |v: &[(u64, String)]| v.iter().map(|p| p.0).collect::<Vec<_>>();
            panic!(
                "cancel after {delay_ms} ms: resumer {:?} {:?}\noriginal {:?} {:?}",
                ids(&a),
                a.last(),
                ids(&b),
                b.last()
            );
        }
        assert_invariants(&r.events, &t);
    }
}

#[tokio::test(start_paused = true)]
async fn continue_keeps_generating_after_the_client_leaves_and_a_resume_gets_the_rest() {
    let g = gateway("").await;
    let mut original =
        Reader::open(&g.url, &slow(30, 20, json!({"on_disconnect": "continue"}))).await;
    original.next().await.unwrap();
    original.next().await.unwrap();
    let id = original.stream_id.clone().unwrap();
    original.disconnect();
    let t = final_transcript(&g.url, &id).await;
    assert_eq!(
        ending(&t),
        ("completed".into(), None),
        "the stream ran to its end without a client"
    );
    let mut r = resume(&g.url, &id, Some(2)).await;
    r.finish().await;
    assert_eq!(chunk_events(&r.events).first().map(|c| c.0), Some(3));
    assert_eq!(r.events.last().unwrap().data, "[DONE]");
    assert_eq!(r.events.len(), 30 + 1 - 2 + 1, "chunks 3..=31 then [DONE]");
}

#[tokio::test(start_paused = true)]
async fn continue_is_still_bounded_by_the_total_deadline() {
    let g = gateway("").await;
    let mut original = Reader::open(
        &g.url,
        &slow(
            1000,
            50,
            json!({"on_disconnect": "continue", "total_timeout_ms": 2000}),
        ),
    )
    .await;
    original.next().await.unwrap();
    original.disconnect();
    let t = final_transcript(&g.url, original.stream_id.as_deref().unwrap()).await;
    assert_eq!(ending(&t), ("timed_out".into(), Some("total".into())));
}

#[tokio::test(start_paused = true)]
async fn grace_expires_without_a_resumer() {
    let g = gateway("").await;
    let mut original = Reader::open(
        &g.url,
        &slow(1000, 100, json!({"on_disconnect": {"grace_ms": 1000}})),
    )
    .await;
    original.next().await.unwrap();
    let left = tokio::time::Instant::now();
    original.disconnect();
    let t = final_transcript(&g.url, original.stream_id.as_deref().unwrap()).await;
    assert_eq!(
        ending(&t),
        ("cancelled".into(), Some("client_disconnected".into()))
    );
    assert!(
        left.elapsed() >= Duration::from_millis(1000),
        "it waited the grace period"
    );
    let chunks = t["chunks"].as_array().unwrap().len();
    assert!(
        (9..=13).contains(&chunks),
        "kept recording during the grace period: {chunks} chunks"
    );
}

#[tokio::test(start_paused = true)]
async fn grace_does_not_expire_when_a_resumer_comes_back() {
    let g = gateway("").await;
    let mut original = Reader::open(
        &g.url,
        &slow(40, 100, json!({"on_disconnect": {"grace_ms": 1000}})),
    )
    .await;
    original.next().await.unwrap();
    original.next().await.unwrap();
    let id = original.stream_id.clone().unwrap();
    original.disconnect();
    tokio::time::sleep(Duration::from_millis(600)).await; // a page reload
    let mut r = resume(&g.url, &id, Some(2)).await;
    r.finish().await;
    assert_eq!(r.events.last().unwrap().data, "[DONE]");
    let t = final_transcript(&g.url, &id).await;
    assert_eq!(ending(&t), ("completed".into(), None));
    assert_eq!(chunk_events(&r.events).first().map(|c| c.0), Some(3));
}

#[tokio::test(start_paused = true)]
async fn replay_works_after_a_restart_and_ids_are_not_reused() {
    let g = gateway("shutdown_grace_ms = 0").await;
    let (done, _) = run_stream(
        &g.url,
        &chat_body("sim", true, json!({"tokens": 4}), json!(null)),
    )
    .await;
    let mut cut = Reader::open(&g.url, &slow(1000, 50, json!(null))).await;
    cut.next().await.unwrap();
    let data_dir = g.dir.path().join("data");
    let stop = tokio::spawn(async move { g.server.shutdown().await });
    cut.finish().await;
    stop.await.unwrap().unwrap();

    let dir = g.dir; // keep the directory alive
    let (_server, url) = restart_on(data_dir).await;
    for original in [&done, &cut] {
        let mut r = resume(&url, original.stream_id.as_deref().unwrap(), None).await;
        r.finish().await;
        assert_eq!(
            pairs(&r.events),
            pairs(&original.events),
            "the same events, ids and terminal after a restart"
        );
    }
    // A new stream gets a new id; its events start at 1 again, in their own stream.
    let (fresh, _) = run_stream(
        &url,
        &chat_body("sim", true, json!({"tokens": 2}), json!(null)),
    )
    .await;
    assert_ne!(fresh.stream_id, done.stream_id);
    drop(dir);
}

#[tokio::test(start_paused = true)]
async fn resuming_an_unknown_stream_or_with_a_bad_id_is_an_error() {
    let g = gateway("").await;
    let r = resume(&g.url, "no-such-stream", None).await;
    assert_eq!(r.status, 404);
    let (done, _) = run_stream(
        &g.url,
        &chat_body("sim", true, json!({"tokens": 1}), json!(null)),
    )
    .await;
    let r = Reader::get(
        &format!("{}/v1/streams/{}/events", g.url, done.stream_id.unwrap()),
        None,
        Some(("last-event-id", "x")),
    )
    .await;
    assert_eq!(r.status, 400);
}

/// A deliberately slow SSE reader on a raw socket with a tiny receive buffer, so the server's
/// writes really block (reqwest would buffer everything). Decodes the chunked body by hand.
async fn slow_raw_resume(addr: std::net::SocketAddr, id: &str, after: u64) -> Vec<SseEvent> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let request = format!(
        "GET /v1/streams/{id}/events HTTP/1.1\r\nhost: localhost\r\nlast-event-id: {after}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reader = BufReader::with_capacity(512, stream);
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break; // end of the response head
        }
    }
    let mut parser = sluice::upstream::sse::SseParser::new();
    let mut events = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).await.unwrap();
        let size = usize::from_str_radix(line.trim(), 16).unwrap();
        if size == 0 {
            return events;
        }
        let mut chunk = vec![0u8; size + 2];
        reader.read_exact(&mut chunk).await.unwrap();
        parser.push(&chunk[..size], &mut events).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await; // slow
    }
}

#[tokio::test(start_paused = true)]
async fn a_reader_far_behind_the_live_feed_refills_from_the_store() {
    // 1000 chunks a millisecond apart, a reader that takes 5 ms per write it reads and whose
    // socket holds almost nothing: it falls more than the live buffer (256 events) behind, and
    // must refill what the feed dropped from the store.
    let g = gateway("send_buffer_bytes = 4096").await;
    let body = chat_body(
        "sim",
        true,
        json!({"tokens": 1000, "first_token_ms": 50, "token_interval_ms": 1}),
        json!({"on_disconnect": "continue"}),
    );
    let mut original = Reader::open(&g.url, &body).await;
    original.next().await.unwrap();
    let id = original.stream_id.clone().unwrap();
    // The original client keeps reading (it must not be cut as slow meanwhile).
    let original = tokio::spawn(async move {
        original.finish().await;
        original
    });
    let events = slow_raw_resume(g.server.addr(), &id, 1).await;
    let original = original.await.unwrap();
    assert_eq!(original.events.last().unwrap().data, "[DONE]");
    let (got, want) = (pairs(&events), expected_after(&original.events, 1));
    if got != want {
        let ids: Vec<u64> = got.iter().map(|p| p.0).collect();
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        panic!(
            "got {} events, want {}; first difference at {first:?}; ids {:?}",
            got.len(),
            want.len(),
            &ids[first.unwrap_or(0).saturating_sub(3)..(first.unwrap_or(0) + 5).min(ids.len())]
        );
    }
    assert_eq!(events.len(), 1000 + 1 - 1 + 1);
    let metrics = get_text(&format!("{}/metrics", g.url)).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sluice_resume_refills_total ")),
        "the reader did fall behind and refill"
    );
}
