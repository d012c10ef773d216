//! One behaviour suite for every store backend: each check runs against a fresh SQLite file and
//! a fresh schema of the real PostgreSQL on 127.0.0.1:5432 (database `test`, trust auth;
//! `scripts/ensure-postgres` starts it; `SLUICE_TEST_POSTGRES` names another). Nothing passes on
//! one backend only.
#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking
#![allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sluice::store::{Finish, NewStream, PgOptions, Store, StoreError, StreamKey, Watermark};
use sluice::stream::{Ending, Reason, Status, StreamId, Tenant};

/// A fresh store of one backend, and what to clean up after it.
struct Fresh {
    store: Store,
    place: Place,
}

enum Place {
    Sqlite(tempfile::TempDir),
    Postgres(common::Schema),
}

async fn sqlite() -> Fresh {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = Store::open(dir.path()).expect("open");
    Fresh {
        store,
        place: Place::Sqlite(dir),
    }
}

async fn postgres() -> Fresh {
    let schema = common::Schema::new();
    let (store, _) = Store::connect(&schema.url(), PgOptions::default())
        .await
        .expect("connect");
    Fresh {
        store,
        place: Place::Postgres(schema),
    }
}

impl Fresh {
    /// The URL of a PostgreSQL store's schema.
    fn url(&self) -> String {
        match &self.place {
            Place::Postgres(schema) => schema.url(),
            Place::Sqlite(_) => unreachable!("a PostgreSQL store"),
        }
    }

    /// The store as the next process finds it after this one died without a word: SQLite is
    /// reopened; on PostgreSQL another node starts once this node's lease has run out.
    async fn after_a_crash(self) -> (Fresh, u64) {
        let Fresh { store, place } = self;
        drop(store);
        let (store, recovered) = match &place {
            Place::Sqlite(dir) => Store::open(dir.path()).expect("reopen"),
            Place::Postgres(schema) => {
                let url = schema.url();
                assert!(
                    common::psql(
                        &url,
                        "UPDATE nodes SET lease_until = now() - interval '1 hour'"
                    ),
                    "expire the lease"
                );
                Store::connect(&url, PgOptions::default())
                    .await
                    .expect("connect")
            }
        };
        (Fresh { store, place }, recovered)
    }
}

fn new_stream(id: &str, tenant: &str) -> NewStream {
    NewStream {
        id: id.into(),
        tenant: tenant.into(),
        model: "sim".into(),
        request: json!({"model": "sim", "messages": [{"role": "user", "content": "hi"}]})
            .to_string(),
        key: None,
    }
}

fn finish(id: &str, ending: Ending, chunks: u64) -> Finish {
    Finish {
        id: id.into(),
        ending,
        first_token: Some(Duration::from_micros(1500)),
        total: Duration::from_millis(20),
        usage: Some(json!({"total_tokens": 3})),
        chunks,
        attempts: None,
    }
}

/// Appends chunks `seqs` of `id` (text `c{seq}`) and waits until they are committed.
async fn append(store: &Store, id: &str, seqs: impl IntoIterator<Item = u64>) {
    let id: Arc<str> = Arc::from(id);
    let mark = Watermark::new();
    let mut top = 0;
    for seq in seqs {
        store
            .append(
                &id,
                seq,
                Duration::from_millis(seq),
                Arc::from(json!({"seq": seq}).to_string()),
                format!("c{seq}"),
                &mark,
            )
            .await
            .expect("append");
        top = seq;
    }
    mark.reached(top).await;
}

async fn a_stream_round_trips_with_its_chunks_in_order(f: Fresh) {
    let s = &f.store;
    s.begin(new_stream("s1", "acme")).await.expect("begin");
    append(s, "s1", 1..=3).await;
    let st = s
        .state(Tenant("acme"), StreamId("s1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((st.status, st.last_seq), (Status::Streaming, 3));
    s.finish(finish("s1", Ending::Completed, 3)).await.unwrap();
    let t = s
        .get(Tenant("acme"), StreamId("s1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t.status, Status::Completed);
    assert_eq!(t.content, "c1c2c3");
    assert_eq!(
        t.chunks.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(t.chunks[1].data, json!({"seq": 2}));
    assert_eq!(t.chunks[1].offset_ms, 2.0);
    assert_eq!(t.timings.time_to_first_token_ms, Some(1.5));
    assert_eq!(t.usage, Some(json!({"total_tokens": 3})));
    assert_eq!(t.request["messages"][0]["content"], "hi");
    let (list, more) = s.list(Tenant("acme"), 10, None).await.unwrap();
    assert!(!more);
    assert_eq!((list[0].id.as_str(), list[0].chunk_count), ("s1", 3));
}

async fn another_tenant_sees_nothing(f: Fresh) {
    let s = &f.store;
    s.begin(new_stream("s1", "acme")).await.unwrap();
    append(s, "s1", [1]).await;
    let (other, id) = (Tenant("other"), StreamId("s1"));
    assert!(s.state(other, id).await.unwrap().is_none());
    assert!(s.head(other, id).await.unwrap().is_none());
    assert!(s.get(other, id).await.unwrap().is_none());
    assert!(s.list(other, 10, None).await.unwrap().0.is_empty());
}

async fn a_final_status_is_written_once(f: Fresh) {
    let s = &f.store;
    s.begin(new_stream("s1", "acme")).await.unwrap();
    s.finish(finish("s1", Ending::abnormal(Reason::Idle, "idle"), 0))
        .await
        .unwrap();
    s.finish(finish("s1", Ending::Completed, 0)).await.unwrap();
    let st = s
        .state(Tenant("acme"), StreamId("s1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (st.status, st.reason),
        (Status::TimedOut, Some(Reason::Idle))
    );
    assert_eq!(st.ending(), Some(Ending::abnormal(Reason::Idle, "idle")));
}

async fn the_list_is_newest_first_and_paged(f: Fresh) {
    let s = &f.store;
    for i in 0..5 {
        s.begin(new_stream(&format!("s{i}"), "acme")).await.unwrap();
    }
    let ids =
        |l: &[sluice::store::StreamSummary]| l.iter().map(|s| s.id.clone()).collect::<Vec<_>>();
    let (page, more) = s.list(Tenant("acme"), 2, None).await.unwrap();
    assert_eq!((ids(&page), more), (vec!["s4".into(), "s3".into()], true));
    let (page, more) = s.list(Tenant("acme"), 10, Some("s3".into())).await.unwrap();
    assert_eq!(
        (ids(&page), more),
        (vec!["s2".into(), "s1".into(), "s0".into()], false)
    );
}

async fn pages_stop_at_their_byte_budget_and_always_move_on(f: Fresh) {
    let s = &f.store;
    s.begin(new_stream("s1", "acme")).await.unwrap();
    append(s, "s1", 1..=10).await;
    // Each chunk is about 12 bytes of JSON and 3 of text.
    let page = s.chunk_page("s1", 0, 100, 40).await.unwrap();
    assert!(
        (2..=4).contains(&page.len()),
        "{} chunks in a 40-byte page",
        page.len()
    );
    let one = s.chunk_page("s1", 4, 100, 1).await.unwrap();
    assert_eq!(one.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![5]);
    let rest = s.chunks_after("s1", 7, 2, usize::MAX).await.unwrap();
    assert_eq!(rest.iter().map(|c| c.0).collect::<Vec<_>>(), vec![8, 9]);
    assert!(s.chunk_page("s1", 10, 100, 1000).await.unwrap().is_empty());
}

async fn a_crash_leaves_no_stream_streaming(f: Fresh) {
    f.store.begin(new_stream("s1", "acme")).await.unwrap();
    append(&f.store, "s1", 1..=2).await;
    f.store.begin(new_stream("s2", "acme")).await.unwrap();
    f.store
        .finish(finish("s2", Ending::Completed, 0))
        .await
        .unwrap();
    let (f, recovered) = f.after_a_crash().await;
    assert_eq!(recovered, 1);
    let st = f
        .store
        .state(Tenant("acme"), StreamId("s1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (st.status, st.reason, st.last_seq),
        (Status::Interrupted, Some(Reason::Crash), 2)
    );
    let done = f
        .store
        .state(Tenant("acme"), StreamId("s2"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.status, Status::Completed);
}

fn keyed(id: &str, key: &str, limit: u32) -> NewStream {
    NewStream {
        key: Some(StreamKey {
            id: key.into(),
            max_running: Some(limit),
        }),
        ..new_stream(id, "acme")
    }
}

fn busy(r: Result<(), StoreError>) -> bool {
    matches!(r, Err(StoreError::KeyBusy { limit: 2 }))
}

async fn a_deleted_stream_is_gone_with_its_chunks(f: Fresh) {
    let s = &f.store;
    s.begin(new_stream("s1", "acme")).await.unwrap();
    append(s, "s1", 1..=40).await;
    s.delete(Tenant("acme"), StreamId("s1")).await.unwrap();
    assert!(
        s.state(Tenant("acme"), StreamId("s1"))
            .await
            .unwrap()
            .is_some(),
        "a running stream is not deleted"
    );
    s.finish(finish("s1", Ending::Completed, 40)).await.unwrap();
    s.delete(Tenant("other"), StreamId("s1")).await.unwrap();
    assert!(
        s.state(Tenant("acme"), StreamId("s1"))
            .await
            .unwrap()
            .is_some(),
        "another tenant cannot delete it"
    );
    s.delete(Tenant("acme"), StreamId("s1")).await.unwrap();
    assert!(s
        .get(Tenant("acme"), StreamId("s1"))
        .await
        .unwrap()
        .is_none());
    assert!(s
        .chunks_after("s1", 0, 100, usize::MAX)
        .await
        .unwrap()
        .is_empty());
}

async fn streams_past_their_retention_are_forgotten(f: Fresh) {
    let s = &f.store;
    s.begin(new_stream("old", "acme")).await.unwrap();
    append(s, "old", 1..=3).await;
    s.finish(finish("old", Ending::Completed, 3)).await.unwrap();
    s.begin(new_stream("running", "acme")).await.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    s.expire(now - 3600).await.unwrap();
    assert!(
        s.state(Tenant("acme"), StreamId("old"))
            .await
            .unwrap()
            .is_some(),
        "not old enough"
    );
    s.expire(now + 10).await.unwrap();
    assert!(s
        .get(Tenant("acme"), StreamId("old"))
        .await
        .unwrap()
        .is_none());
    assert!(s
        .chunks_after("old", 0, 10, usize::MAX)
        .await
        .unwrap()
        .is_empty());
    assert!(
        s.state(Tenant("acme"), StreamId("running"))
            .await
            .unwrap()
            .is_some(),
        "a running stream is kept"
    );
}

async fn a_key_runs_at_most_its_limit_of_streams(f: Fresh) {
    let s = &f.store;
    s.begin(keyed("s1", "k1", 2)).await.unwrap();
    s.begin(keyed("s2", "k1", 2)).await.unwrap();
    assert!(busy(s.begin(keyed("s3", "k1", 2)).await));
    assert!(
        s.state(Tenant("acme"), StreamId("s3"))
            .await
            .unwrap()
            .is_none(),
        "a refused stream is not recorded"
    );
    s.begin(keyed("t1", "k2", 2)).await.unwrap();
    s.begin(new_stream("u1", "acme")).await.unwrap();
    // A final status frees the place.
    s.finish(finish("s1", Ending::Completed, 0)).await.unwrap();
    s.begin(keyed("s3", "k1", 2)).await.unwrap();
    assert!(busy(s.begin(keyed("s4", "k1", 2)).await));
}

async fn a_key_takes_its_requests_per_minute_from_one_bucket(f: Fresh) {
    let s = &f.store;
    for _ in 0..3 {
        assert_eq!(s.take_request("k1", 3).await.unwrap(), None);
    }
    // One request every 20 s: the next comes back in at most 20 s.
    let wait = s.take_request("k1", 3).await.unwrap().expect("refused");
    assert!(
        wait > Duration::from_secs(15) && wait <= Duration::from_secs(20),
        "{wait:?}"
    );
    assert_eq!(s.take_request("k2", 3).await.unwrap(), None, "per key");
}

/// Two nodes on one database count a key's streams and requests together: what one node
/// admitted, the other sees; a dead node's streams give their places back when it is swept.
#[tokio::test]
async fn per_key_limits_hold_across_nodes() {
    let f = postgres().await;
    let url = f.url();
    let (b, _) = Store::connect(&url, PgOptions::default()).await.unwrap();
    let a = &f.store;
    a.begin(keyed("a1", "k1", 2)).await.unwrap();
    b.begin(keyed("b1", "k1", 2)).await.unwrap();
    assert!(busy(a.begin(keyed("a2", "k1", 2)).await));
    assert!(busy(b.begin(keyed("b2", "k1", 2)).await));
    // Admissions racing on both nodes: exactly the free places are taken.
    b.finish(finish("b1", Ending::Completed, 0)).await.unwrap();
    let racers = (0..8).map(|i| {
        let node = if i % 2 == 0 { a.clone() } else { b.clone() };
        async move { node.begin(keyed(&format!("r{i}"), "k1", 2)).await.is_ok() }
    });
    let admitted = futures_util::future::join_all(racers).await;
    assert_eq!(admitted.iter().filter(|ok| **ok).count(), 1, "{admitted:?}");

    for _ in 0..2 {
        assert_eq!(a.take_request("k1", 3).await.unwrap(), None);
    }
    assert_eq!(b.take_request("k1", 3).await.unwrap(), None);
    assert!(a.take_request("k1", 3).await.unwrap().is_some());
    assert!(b.take_request("k1", 3).await.unwrap().is_some());

    // Node A dies; once its lease is gone, a node that sweeps frees A's places.
    let (f, recovered) = f.after_a_crash().await;
    assert!(recovered >= 1, "A's running streams were marked");
    let c = &f.store;
    c.begin(keyed("c1", "k1", 2)).await.unwrap();
    drop(b);
}

/// A final status that comes while PostgreSQL is away is kept and written when it returns: the
/// stream does not stay `streaming`, and its key gets its place back.
#[tokio::test]
async fn a_final_status_written_while_postgres_is_away_lands_when_it_returns() {
    let f = postgres().await;
    let url = f.url();
    let proxy = Proxy::start(0).await;
    let (port, via_proxy) = (proxy.port, proxy.to(&url));
    let options = PgOptions {
        retry: Duration::from_millis(300),
        ..PgOptions::default()
    };
    let (node, _) = Store::connect(&via_proxy, options).await.unwrap();
    node.begin(keyed("s1", "k1", 1)).await.unwrap();
    proxy.down();
    let lost = node.finish(finish("s1", Ending::Completed, 0)).await;
    assert!(lost.is_err(), "the writer gave the batch up");
    let state = || async {
        f.store
            .state(Tenant("acme"), StreamId("s1"))
            .await
            .unwrap()
            .unwrap()
            .status
    };
    assert_eq!(state().await, Status::Streaming);

    let _back = Proxy::start(port).await;
    common::within("the kept final status is written", async {
        while state().await != Status::Completed {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    node.begin(keyed("s2", "k1", 1)).await.unwrap();
}

/// The whole gateway on PostgreSQL: a stream is relayed, recorded (the transcript the API
/// serves is what the store holds, and the invariants hold), listed and replayed.
#[tokio::test]
async fn a_gateway_on_postgres_relays_records_and_replays() {
    let f = postgres().await;
    let url = f.url();
    let g = common::gateway(&format!("[store]\nurl = \"{url}\"\n")).await;
    assert_eq!(g.server.store().backend(), "postgres");
    let (r, t) = common::run_stream(
        &g.url,
        &common::chat_body("sim", true, json!({"tokens": 40}), json!(null)),
    )
    .await;
    assert_eq!(common::ending(&t), ("completed".into(), None));
    let id = r.stream_id.clone().expect("stream id");
    let stored = g
        .server
        .store()
        .get(Tenant("local"), StreamId(&id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t, serde_json::to_value(&stored).unwrap());
    assert_eq!(g.newest(1).await[0].id, id);
    let replay = common::get_text(&format!("{}/v1/streams/{id}/events?after=38", g.url)).await;
    assert!(
        replay.contains("id: 39\n")
            && replay.contains("id: 40\n")
            && replay.ends_with("data: [DONE]\n\n"),
        "{replay}"
    );
    g.server.shutdown().await.expect("shutdown");
}

/// Two nodes on one database act as one gateway: a stream running on A is followed live through
/// B (every chunk, once, then the same ending), and cancelled through B.
#[tokio::test]
async fn two_nodes_follow_and_cancel_each_others_streams() {
    let f = postgres().await;
    let url = f.url();
    let config = format!(
        "[store]\nurl = \"{url}\"\n[[models]]\nname = \"slow\"\nkind = \"sim\"\nsim = {{ first_token_ms = 10, token_interval_ms = 30 }}\n"
    );
    let a = common::gateway(&config).await;
    let b = common::gateway(&config).await;

    // Followed through B while it runs on A.
    let body = common::chat_body("slow", true, json!({"tokens": 30}), json!(null));
    let mut on_a = common::Reader::open(&a.url, &body).await;
    let first = common::within("a first chunk on A", on_a.next()).await;
    assert!(first.is_some());
    let id = on_a.stream_id.clone().expect("stream id");
    let events_on_b = format!("{}/v1/streams/{id}/events", b.url);
    let followed = tokio::spawn(async move { common::get_text(&events_on_b).await });
    common::within("the stream's end on A", on_a.finish()).await;
    let followed = common::within("the follow through B", followed)
        .await
        .expect("follow task");
    let mut parser = sluice::upstream::sse::SseParser::new();
    let mut seen = Vec::new();
    parser.push(followed.as_bytes(), &mut seen).expect("SSE");
    let ids = |events: &[sluice::upstream::sse::SseEvent]| {
        events
            .iter()
            .map(|e| (e.id.clone(), e.data.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&seen), ids(&on_a.events), "B saw what A's client saw");
    assert_eq!(seen.last().map(|e| e.data.as_str()), Some("[DONE]"));

    // Cancelled through B while it runs on A.
    let long = common::chat_body("slow", true, json!({"tokens": 10000}), json!(null));
    let mut on_a = common::Reader::open(&a.url, &long).await;
    common::within("a first chunk on A", on_a.next()).await;
    let id = on_a.stream_id.clone().expect("stream id");
    let asked = std::time::Instant::now();
    let answer = common::post_json(&format!("{}/v1/streams/{id}/cancel", b.url)).await;
    assert_eq!(
        (answer["status"].as_str(), answer["reason"].as_str()),
        (Some("cancelled"), Some("requested")),
        "{answer}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    common::within("the cancelled stream's end on A", on_a.finish()).await;
    let end = common::error_event(&on_a.events).expect("an error event on A");
    assert_eq!(end["code"], "requested");
    a.server.shutdown().await.expect("shutdown A");
    b.server.shutdown().await.expect("shutdown B");
}

/// A background response started on node A is followed through node B (its Responses events,
/// numbered as on A, from `starting_after`) and cancelled there.
#[tokio::test]
async fn a_response_runs_on_one_node_and_is_followed_and_cancelled_on_another() {
    let f = postgres().await;
    let url = f.url();
    let config = format!(
        "[store]\nurl = \"{url}\"\n[[models]]\nname = \"slow\"\nkind = \"sim\"\nsim = {{ first_token_ms = 10, token_interval_ms = 20 }}\n"
    );
    let a = common::gateway(&config).await;
    let b = common::gateway(&config).await;
    let created: serde_json::Value = common::post_body(
        &format!("{}/v1/responses", a.url),
        &json!({"model": "slow", "input": "hi", "background": true, "sim": {"tokens": 5000}}),
    )
    .await;
    assert_eq!(created["status"], "in_progress", "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let mut follow = common::client()
        .get(format!(
            "{}/v1/responses/{id}?stream=true&starting_after=20",
            b.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(follow.status(), 200);
    let mut seen = String::new();
    while !seen.contains("response.output_text.delta") {
        let bytes = common::within("events through B", follow.chunk())
            .await
            .unwrap()
            .expect("more events");
        seen.push_str(&String::from_utf8_lossy(&bytes));
    }
    assert!(
        !seen.contains("response.created"),
        "nothing at or before 20: {seen}"
    );
    let first_id: u64 = seen
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(first_id > 20, "{first_id}");
    let cancelled = common::post_json(&format!("{}/v1/responses/{id}/cancel", b.url)).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let rest = common::within("the end of the follow through B", async {
        let mut rest = String::new();
        while let Some(bytes) = follow.chunk().await.unwrap() {
            rest.push_str(&String::from_utf8_lossy(&bytes));
        }
        rest
    })
    .await;
    assert!(rest.contains("event: response.incomplete"), "{rest}");
    assert!(rest.contains("\"status\":\"cancelled\""), "{rest}");
    a.server.shutdown().await.expect("shutdown A");
    b.server.shutdown().await.expect("shutdown B");
}

/// Through two gateway nodes, a key limited to one stream at a time and three requests a
/// minute is held to that whichever node each request lands on.
#[tokio::test]
async fn two_nodes_hold_a_keys_limits_together() {
    let f = postgres().await;
    let url = f.url();
    let key = sluice::auth::new_key().unwrap();
    let config = format!(
        "[store]\nurl = \"{url}\"\n{}max_concurrent_streams = 1\nrequests_per_minute = 3\n[[models]]\nname = \"slow\"\nkind = \"sim\"\nsim = {{ first_token_ms = 10, token_interval_ms = 30 }}\n",
        sluice::auth::config_lines("acme", &key)
    );
    let a = common::gateway(&config).await;
    let b = common::gateway(&config).await;
    let long = common::chat_body("slow", true, json!({"tokens": 10000}), json!(null));
    let short = common::chat_body("slow", true, json!({"tokens": 2}), json!(null));

    let mut on_a = common::Reader::open_as(&a.url, &long, Some(&key)).await;
    common::within("a first chunk on A", on_a.next()).await;
    let mut on_b = common::Reader::open_as(&b.url, &short, Some(&key)).await;
    assert_eq!(on_b.status, 429, "A's stream holds the key's one place");
    assert_eq!(
        on_b.error_body().await["error"]["code"],
        "concurrency_limit_exceeded"
    );
    let id = on_a.stream_id.clone().expect("stream id");
    let cancelled = common::client()
        .post(format!("{}/v1/streams/{id}/cancel", b.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    common::within("the cancelled stream's end on A", on_a.finish()).await;
    let mut on_b = common::Reader::open_as(&b.url, &short, Some(&key)).await;
    assert_eq!(on_b.status, 200, "the place came back");
    common::within("the short stream on B", on_b.finish()).await;

    // Three requests went in (one per node, one refused for concurrency): the fourth is over
    // the minute's budget, on either node.
    for node in [&a, &b] {
        let mut r = common::Reader::open_as(&node.url, &short, Some(&key)).await;
        assert_eq!(r.status, 429);
        assert_eq!(r.error_body().await["error"]["code"], "rate_limit_exceeded");
    }
    a.server.shutdown().await.expect("shutdown A");
    b.server.shutdown().await.expect("shutdown B");
}

/// A TCP proxy to PostgreSQL that the test can take down and bring back on the same port.
struct Proxy {
    port: u16,
    /// Accepts, and owns every connection: aborting it drops them all.
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(port: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Proxy { port, task }
    }

    /// `url` (of the PostgreSQL on 127.0.0.1:5432) through this proxy.
    fn to(&self, url: &str) -> String {
        url.replace("127.0.0.1:5432", &format!("127.0.0.1:{}", self.port))
    }

    /// Stops accepting and cuts every connection: PostgreSQL is gone, as far as sluice knows.
    fn down(&self) {
        self.task.abort();
    }
}

/// PostgreSQL out of reach (a proxy in between, taken down): a new request gets
/// `503 store_unavailable` in OpenAI's error format once the writer has tried for its bound;
/// brought back on the same address, the node reconnects by itself and serves again.
#[tokio::test]
async fn postgres_out_of_reach_is_a_503_and_the_node_reconnects_by_itself() {
    let f = postgres().await;
    let url = f.url();
    let proxy = Proxy::start(0).await;
    let (port, via_proxy) = (proxy.port, proxy.to(&url));
    let g = common::gateway(&format!("[store]\nurl = \"{via_proxy}\"\n")).await;
    let chat = || async {
        common::within(
            "an answer",
            common::client()
                .post(format!("{}/v1/chat/completions", g.url))
                .json(&common::chat_body(
                    "sim",
                    false,
                    json!({"tokens": 2}),
                    json!(null),
                ))
                .send(),
        )
        .await
        .unwrap()
    };
    assert_eq!(chat().await.status(), 200);

    proxy.down();
    let r = chat().await;
    assert_eq!(r.status(), 503);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "store_unavailable", "{e}");
    assert!(!e["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("postgres://"));

    let _back = Proxy::start(port).await;
    let r = chat().await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
}

/// Every check, once per backend.
macro_rules! on_every_backend {
    ($($check:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $check() {
                    super::$check(super::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $check() {
                    super::$check(super::postgres().await).await;
                }
            )*
        }
    };
}

on_every_backend!(
    a_stream_round_trips_with_its_chunks_in_order,
    another_tenant_sees_nothing,
    a_final_status_is_written_once,
    the_list_is_newest_first_and_paged,
    pages_stop_at_their_byte_budget_and_always_move_on,
    a_crash_leaves_no_stream_streaming,
    a_key_runs_at_most_its_limit_of_streams,
    a_key_takes_its_requests_per_minute_from_one_bucket,
    a_deleted_stream_is_gone_with_its_chunks,
    streams_past_their_retention_are_forgotten,
);
