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

#[tokio::test(start_paused = true)]
async fn a_caller_dropped_while_the_stream_is_recorded_still_gets_a_final_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = Store::open(dir.path()).expect("store");
    let ctx = Arc::new(RelayContext {
        store: store.clone(),
        tasks: Tasks::new(),
        shutdown: CancelToken::new(),
        hub: Arc::new(Hub::default()),
        buffer_chunks: 4,
        buffer_bytes: 1 << 20,
        redactor: Arc::default(),
        slow_client_timeout: Duration::from_secs(30),
        keep_alive: Duration::from_secs(15),
        record_chunks: true,
    });
    let mut body = serde_json::Map::new();
    body.insert("model".into(), "sim".into());
    let req = StreamRequest {
        id: Arc::from("s1"),
        tenant: "local".into(),
        model: "sim".into(),
        client_request: Value::Object(body.clone()).to_string(),
        upstream: Upstream::Sim(SimDefaults::default()),
        upstream_request: UpstreamRequest { body },
        timeouts: Timeouts::default(),
        started: Instant::now(),
        on_disconnect: OnDisconnect::Cancel,
        key: None,
    };
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
