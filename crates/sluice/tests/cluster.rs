//! Two real `sluice serve` processes on one PostgreSQL (a fresh schema of the machine's server on
//! 127.0.0.1:5432): a node killed with `kill -9` mid-stream has its stream marked
//! `interrupted(crash)` by the other within its lease, a follower on the other node gets that
//! terminal event instead of hanging, and the restarted node replays the stream; and the same
//! two behind a real nginx (`deploy/nginx.conf`, round-robin). Real processes on the real clock;
//! every wait is bounded and nothing asserts on elapsed time.
#![allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]
#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

mod common;

use std::path::Path;
use std::process::Stdio;

use common::*;
use serde_json::json;
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// A config file in `dir` for nodes on `schema` (`store_extra`: more `[store]` keys), with a
/// `slow` sim model whose tokens come `interval_ms` apart.
fn cluster_config(
    dir: &tempfile::TempDir,
    schema: &Schema,
    store_extra: &str,
    interval_ms: u64,
) -> std::path::PathBuf {
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = \"{}\"\n{store_extra}[[models]]\nname = \"slow\"\nkind = \"sim\"\nsim = {{ first_token_ms = 10, token_interval_ms = {interval_ms} }}\n",
            schema.url()
        ),
    )
    .unwrap();
    config
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
    assert!(
        answers(&format!("http://127.0.0.1:{port}/healthz")).await,
        "sluice serve on port {port} did not become ready"
    );
    child
}

#[tokio::test]
async fn a_killed_node_s_stream_ends_as_a_crash_on_the_other_and_replays_after_restart() {
    let schema = Schema::new();
    let dir = tempfile::tempdir().unwrap();
    let config = cluster_config(&dir, &schema, "lease_ms = 1000\n", 50);
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

/// nginx (Debian's, `scripts/ensure-nginx`) with `deploy/nginx.conf`, in front of `ports`;
/// listens on the returned port. Runs in the foreground with its files in `dir`.
async fn nginx(dir: &Path, ports: [u16; 2]) -> (Child, u16) {
    let listen = free_port();
    let site = include_str!("../../../deploy/nginx.conf")
        .replace("127.0.0.1:8751", &format!("127.0.0.1:{}", ports[0]))
        .replace("127.0.0.1:8752", &format!("127.0.0.1:{}", ports[1]))
        .replace("listen 8750;", &format!("listen 127.0.0.1:{listen};"));
    let child = spawn_nginx(dir, &site);
    assert!(
        answers(&format!("http://127.0.0.1:{listen}/healthz")).await,
        "nginx did not answer: {}",
        std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
    );
    (child, listen)
}

/// Through nginx round-robin in front of two nodes: a stream arrives chunk by chunk (not
/// buffered to the end), a client that drops its connection resumes through whichever node
/// nginx picks, and a cancel through nginx stops a stream wherever it runs.
#[tokio::test]
async fn through_nginx_streams_arrive_unbuffered_resume_anywhere_and_cancel() {
    let schema = Schema::new();
    let dir = tempfile::tempdir().unwrap();
    let config = cluster_config(&dir, &schema, "", 100);
    let ports = [free_port(), free_port()];
    let _a = node(ports[0], &dir.path().join("a"), &config).await;
    let _b = node(ports[1], &dir.path().join("b"), &config).await;
    let (_nginx, port) = nginx(dir.path(), ports).await;
    let lb = format!("http://127.0.0.1:{port}");

    // Chunk by chunk: the first chunk is through while the stream still runs.
    let body = chat_body("slow", true, json!({"tokens": 20}), json!(null));
    let mut r = Reader::open(&lb, &body).await;
    within("a first chunk through nginx", r.next())
        .await
        .expect("a chunk");
    let id = r.stream_id.clone().expect("stream id");
    let st = get_json(&format!("{lb}/v1/streams/{id}")).await;
    assert_eq!(
        st["status"], "streaming",
        "the first chunk came before the end"
    );
    within("the end through nginx", r.finish()).await;
    assert_eq!(r.events.last().map(|e| e.data.as_str()), Some("[DONE]"));

    // Drop the connection after two chunks; resume through nginx, twice (round-robin: each node
    // answers once), both times from event 2 to the end.
    let keep = chat_body(
        "slow",
        true,
        json!({"tokens": 20}),
        json!({"on_disconnect": "continue"}),
    );
    let mut r = Reader::open(&lb, &keep).await;
    within("a chunk", r.next()).await.expect("a chunk");
    within("a chunk", r.next()).await.expect("a chunk");
    let id = r.stream_id.clone().expect("stream id");
    r.disconnect();
    let resumes: Vec<String> = futures_util::future::join_all((0..2).map(|_| {
        let url = format!("{lb}/v1/streams/{id}/events?after=2");
        async move { within("a resume through nginx", get_text(&url)).await }
    }))
    .await;
    for resumed in &resumes {
        assert!(
            resumed.starts_with("id: 3\n") && resumed.ends_with("data: [DONE]\n\n"),
            "{resumed}"
        );
    }
    assert_eq!(resumes[0], resumes[1], "both nodes replay the same events");

    // Cancel through nginx, wherever the stream runs.
    let long = chat_body("slow", true, json!({"tokens": 10000}), json!(null));
    let mut r = Reader::open(&lb, &long).await;
    within("a chunk", r.next()).await.expect("a chunk");
    let id = r.stream_id.clone().expect("stream id");
    let answer = post_json(&format!("{lb}/v1/streams/{id}/cancel")).await;
    assert_eq!(answer["reason"], "requested", "{answer}");
    within("the cancelled stream's end", r.finish()).await;
    assert_eq!(
        error_event(&r.events).expect("an error event")["code"],
        "requested"
    );
}
