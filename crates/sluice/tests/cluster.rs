//! Two real `sluice serve` processes on one PostgreSQL (a fresh schema of the machine's server on
//! 127.0.0.1:5432): a node killed with `kill -9` mid-stream has its stream marked
//! `interrupted(crash)` by the other within its lease, a follower on the other node gets that
//! terminal event instead of hanging, and the restarted node replays the stream. Real processes
//! on the real clock; every wait is bounded and nothing asserts on elapsed time.
#![allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]
#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

fn admin_url() -> String {
    std::env::var("SLUICE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh schema, dropped at the end.
struct Schema(String);

impl Schema {
    fn new() -> Schema {
        let name = format!("sluice_cluster_{}", uuid::Uuid::new_v4().simple());
        psql(&format!("CREATE SCHEMA {name}"));
        Schema(name)
    }

    fn url(&self) -> String {
        format!("{}?options=-csearch_path%3D{}", admin_url(), self.0)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        psql(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0));
    }
}

fn psql(sql: &str) {
    let ok = std::process::Command::new("psql")
        .env("PGOPTIONS", "-c client_min_messages=warning")
        .args(["-q", &admin_url(), "-c", sql])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "psql could not run {sql:?} (scripts/ensure-postgres starts PostgreSQL)"
    );
}

/// Starts `sluice serve` on `port` with `config`; waits until it answers.
async fn node(port: u16, data: &Path, config: &Path) -> Child {
    let child = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sluice");
    let url = format!("http://127.0.0.1:{port}/healthz");
    for _ in 0..200 {
        if client()
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("sluice serve on port {port} did not become ready");
}

#[tokio::test]
async fn a_killed_node_s_stream_ends_as_a_crash_on_the_other_and_replays_after_restart() {
    let schema = Schema::new();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = \"{}\"\nlease_ms = 1000\n[[models]]\nname = \"slow\"\nkind = \"sim\"\nsim = {{ first_token_ms = 10, token_interval_ms = 50 }}\n",
            schema.url()
        ),
    )
    .unwrap();
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = node(port_a, &dir.path().join("a"), &config).await;
    let b = node(port_b, &dir.path().join("b"), &config).await;
    let (url_a, url_b) = (
        format!("http://127.0.0.1:{port_a}"),
        format!("http://127.0.0.1:{port_b}"),
    );

    // A stream on A, followed through B.
    let body = chat_body("slow", true, json!({"tokens": 10000}), json!(null));
    let mut on_a = Reader::open(&url_a, &body).await;
    within("a first chunk on A", on_a.next())
        .await
        .expect("a chunk");
    within("a second chunk on A", on_a.next())
        .await
        .expect("a chunk");
    let id = on_a.stream_id.clone().expect("stream id");
    let events_b = format!("{url_b}/v1/streams/{id}/events");
    let followed = tokio::spawn(async move { get_text(&events_b).await });

    // kill -9 A: no shutdown code runs.
    a.kill().await.unwrap();
    let followed = within("the follower on B to end", followed).await.unwrap();
    assert!(
        followed.contains("\"code\":\"crash\"") && !followed.contains("[DONE]"),
        "{followed}"
    );
    let t = get_json(&format!("{url_b}/v1/streams/{id}")).await;
    assert_eq!(ending(&t), ("interrupted".into(), Some("crash".into())));
    let stored = t["chunks"].as_array().map_or(0, Vec::len);
    assert!(
        stored >= 2,
        "the chunks A's client saw are stored: {stored}"
    );

    // A again, on the same port: the stream replays there, to the same terminal event.
    let a = node(port_a, &dir.path().join("a"), &config).await;
    let replay = get_text(&format!("{url_a}/v1/streams/{id}/events")).await;
    assert_eq!(replay, followed, "a replay on A is what B's follower got");
    drop((a, b));
}
