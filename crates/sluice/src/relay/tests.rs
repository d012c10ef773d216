//! The relay without HTTP: a caller dropped while its stream is being recorded.
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
        client_request: Value::Object(body.clone()),
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
