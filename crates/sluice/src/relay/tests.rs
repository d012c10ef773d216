//! The relay without HTTP: a caller dropped while its stream is being recorded; what a stream
//! followed midway publishes.
#![allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]

use super::*;
use crate::stream::Status;
use crate::stream::{StreamId, Tenant};
use crate::upstream::sim::SimDefaults;

/// A relay's context on `store`, with room for `buffer_chunks` chunks toward each client.
fn context(store: &Store, buffer_chunks: usize) -> Arc<RelayContext> {
    Arc::new(RelayContext {
        store: store.clone(),
        tasks: Tasks::new(),
        shutdown: CancelToken::new(),
        hub: Arc::new(Hub::default()),
        buffer_chunks,
        buffer_bytes: 1 << 20,
        redactor: Arc::default(),
        slow_client_timeout: Duration::from_secs(30),
        keep_alive: Duration::from_secs(15),
        record_chunks: true,
    })
}

/// A request for stream `id` of the built-in model, with its `"sim"` field if given.
fn sim_request(id: &str, sim: Option<Value>) -> StreamRequest {
    let mut body = serde_json::Map::new();
    body.insert("model".into(), "sim".into());
    if let Some(sim) = sim {
        body.insert("sim".into(), sim);
    }
    StreamRequest {
        id: Arc::from(id),
        tenant: "local".into(),
        model: "sim".into(),
        client_request: Value::Object(body.clone()).to_string(),
        upstream: Upstream::Sim(SimDefaults::default()),
        upstream_request: UpstreamRequest { body },
        timeouts: Timeouts::default(),
        started: Instant::now(),
        on_disconnect: OnDisconnect::Cancel,
        key: None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_caller_dropped_while_the_stream_is_recorded_still_gets_a_final_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = Store::open(dir.path()).expect("store");
    let ctx = context(&store, 4);
    let req = sim_request("s1", None);
    // Poll `start` once (the record is on its way to the writer) and drop it.
    let dropped = tokio::time::timeout(Duration::ZERO, start(&ctx, req)).await;
    assert!(
        dropped.is_err(),
        "start was still waiting for the record when dropped"
    );
    assert_eq!(
        ctx.tasks.shutdown(Duration::from_secs(5)).await,
        sluice_flow::Drained::Complete
    );
    let t = store
        .get(Tenant("local"), StreamId("s1"))
        .await
        .expect("read")
        .expect("recorded");
    assert_eq!(
        (t.status, t.reason),
        (Status::Cancelled, Some(Reason::ClientDisconnected))
    );
}

/// A chunk the store cannot keep (its journal write fails, as on a full disk) ends the stream
/// `failed(store_error)`, and neither it nor any chunk after it is ever marked stored (the client
/// side sends a chunk only once it is).
#[tokio::test(start_paused = true)]
async fn a_chunk_the_store_cannot_keep_ends_the_stream_failed_and_is_never_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = Store::open(dir.path()).expect("store");
    let ctx = context(&store, 64);
    let req = sim_request(
        "s1",
        Some(serde_json::json!({"tokens": 5, "first_token_ms": 10, "token_interval_ms": 50})),
    );
    let mut frames = start(&ctx, req).await.expect("recorded");
    let Some(Ok(Frame::Chunk(first))) = frames.recv().await else {
        panic!("no first chunk");
    };
    let mark = first.committed.clone().expect("recorded chunks");
    mark.reached(first.seq).await;
    assert!(mark.is_stored(first.seq));
    store.fail_journal_writes();
    let mut later = Vec::new();
    let terminal = loop {
        match frames.recv().await {
            Some(Ok(Frame::Chunk(c))) => later.push(c.seq),
            Some(Ok(Frame::KeepAlive)) => {}
            Some(Err(sluice_flow::QueueError::Failed(t))) => break t,
            other => panic!("the stream ended without its ending: {other:?}"),
        }
    };
    assert_eq!(terminal.ending.reason(), Some(Reason::StoreError));
    assert_eq!(terminal.ending.status(), Status::Failed);
    assert!(
        later.iter().all(|&seq| !mark.is_stored(seq)),
        "a chunk after the failure counts as stored: {later:?}"
    );
    assert!(mark.lost().is_some());
}

#[test]
fn a_stream_followed_midway_sends_its_follower_to_the_store_then_publishes_every_chunk() {
    let hub = Arc::new(Hub::default());
    let publisher = hub.register("s1".into(), "local".into(), CancelToken::new());
    let mark = Watermark::new();
    assert!(!publisher.is_followed());
    let mut live = hub
        .subscribe(Tenant("local"), StreamId("s1"))
        .expect("running");
    assert!(publisher.is_followed());
    // Chunks 1-3 committed and 4-5 queued while nobody followed (so none was kept); 6 comes now.
    mark.advance_for_test(3);
    let mut unpublished = Unpublished::new();
    follow_from_here(&mut unpublished, &mark, 6, &publisher);
    unpublished.push_back((6, Some(Arc::from("{\"n\":6}"))));
    publish_committed(&mut unpublished, &mark, &publisher);
    mark.advance_for_test(6);
    publish_committed(&mut unpublished, &mark, &publisher);
    assert!(unpublished.is_empty());
    let mut got = Vec::new();
    while let Ok(event) = live.try_recv() {
        got.push(event);
    }
    assert_eq!(
        got,
        vec![
            // The store has 1-3; 4 and 5 are gone from the relay: read them there too.
            Live::Large { seq: 3 },
            Live::Large { seq: 4 },
            Live::Large { seq: 5 },
            Live::Chunk {
                seq: 6,
                data: Arc::from("{\"n\":6}")
            },
        ]
    );
}
