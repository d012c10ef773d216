//! The `sluice` binary as a user runs it: crash recovery after `kill -9`, SIGTERM mid-stream,
//! a bad config, and the CLI client (`chat`, Ctrl-C, `streams ls/show`). Real processes on the
//! real clock; waiting is only for readiness, bounded, and nothing asserts on elapsed time.
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
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// A `sluice serve` process.
struct Serve {
    child: Child,
    url: String,
}

impl Serve {
    async fn start(data_dir: &Path, config: Option<&Path>) -> Serve {
        Serve::start_on(free_port(), data_dir, config).await
    }

    async fn start_on(port: u16, data_dir: &Path, config: Option<&Path>) -> Serve {
        Serve::start_with(port, data_dir, config, &[], Stdio::null()).await
    }

    /// Starts `sluice GLOBAL_ARGS serve ...` with its stderr going to `stderr`.
    async fn start_with(
        port: u16,
        data_dir: &Path,
        config: Option<&Path>,
        global_args: &[&str],
        stderr: Stdio,
    ) -> Serve {
        let mut cmd = Command::new(BIN);
        cmd.args(global_args)
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sluice");
        let url = format!("http://127.0.0.1:{port}");
        for _ in 0..200 {
            if let Ok(r) = client().get(format!("{url}/healthz")).send().await {
                if r.status() == 200 {
                    return Serve { child, url };
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("sluice serve did not become ready");
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid)
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }
}

/// `sluice streams ls --limit 1` once the newest stream has ended (polled for up to 5 s).
async fn newest_once_ended(url: &str) -> String {
    let mut listed = String::new();
    for _ in 0..100 {
        let out = Command::new(BIN)
            .args(["streams", "ls", "--url", url, "--limit", "1"])
            .output()
            .await
            .unwrap();
        assert!(out.status.success());
        listed = String::from_utf8_lossy(&out.stdout).to_string();
        if !listed.contains("streaming") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    listed
}

/// Writes a config with one tenant `acme` holding `key`, and the `sim` model; returns its path.
fn keyed_sim_config(dir: &tempfile::TempDir, key: &str) -> std::path::PathBuf {
    write_config(
        dir,
        "sluice.toml",
        format!(
            "{}\n[[models]]\nname = \"sim\"\nkind = \"sim\"\n",
            sluice::auth::config_lines("acme", key)
        ),
    )
}

/// Writes a config file `name` with `text` into `dir`; returns its path.
fn write_config(dir: &tempfile::TempDir, name: &str, text: impl AsRef<[u8]>) -> std::path::PathBuf {
    let config = dir.path().join(name);
    std::fs::write(&config, text).unwrap();
    config
}

fn long_stream() -> serde_json::Value {
    chat_body(
        "sim",
        true,
        json!({"tokens": 10_000, "first_token_ms": 1, "token_interval_ms": 50}),
        json!(null),
    )
}

#[tokio::test]
async fn a_crash_leaves_no_stream_streaming() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Serve::start(dir.path(), None).await;
    let mut r = Reader::open(&serve.url, &long_stream()).await;
    // More than a block's worth (32): some chunks are in a block, the rest only in the journal.
    for _ in 0..40 {
        r.next().await.expect("a chunk");
    }
    serve.child.kill().await.unwrap(); // SIGKILL: no shutdown code runs
    r.finish().await;
    assert!(!r.raw.contains("[DONE]"));

    let serve = Serve::start(dir.path(), None).await;
    let t = final_transcript(&serve.url, r.stream_id.as_deref().unwrap()).await;
    assert_eq!(ending(&t), ("interrupted".into(), Some("crash".into())));
    assert_invariants(&r.events, &t);
}

#[tokio::test]
async fn sigterm_interrupts_running_streams_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, "sluice.toml", "shutdown_grace_ms = 200\n");
    let mut serve = Serve::start(&dir.path().join("data"), Some(&config)).await;
    let mut r = Reader::open(&serve.url, &long_stream()).await;
    r.next().await.expect("a chunk");
    serve.signal("TERM");
    r.finish().await;
    let e = error_event(&r.events).expect("an error event, not a silent end");
    assert_eq!(e["code"], "shutdown");
    assert!(!r.raw.contains("[DONE]"));
    let status = tokio::time::timeout(Duration::from_secs(30), serve.child.wait())
        .await
        .expect("exited")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    // Reopening the database finds the stream already final (nothing for crash recovery).
    let (store, recovered) = sluice::store::Store::open(&dir.path().join("data")).unwrap();
    assert_eq!(recovered, 0);
    let t = serde_json::to_value(
        store
            .get(
                sluice::stream::Tenant("local"),
                sluice::stream::StreamId(r.stream_id.as_deref().unwrap()),
            )
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(ending(&t), ("interrupted".into(), Some("shutdown".into())));
    assert_invariants(&r.events, &t);
}

#[tokio::test]
async fn a_bad_config_names_the_file_and_key_and_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &dir,
        "bad.toml",
        "[[models]]\nname = \"x\"\nkind = \"openai\"\nbase_uri = \"http://127.0.0.1:1/v1\"\n",
    );
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml")
            && stderr.contains("models[0].base_uri")
            && stderr.contains("unknown field"),
        "{stderr}"
    );
}

#[tokio::test]
async fn help_documents_the_commands_and_flags() {
    let out = Command::new(BIN).arg("--help").output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["serve", "mock-upstream", "chat", "streams", "keys"] {
        assert!(text.contains(word), "--help lacks {word}");
    }
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--listen",
        "--data-dir",
        "--config",
        "SLUICE_LISTEN",
        "SLUICE_DATA_DIR",
        "SLUICE_CONFIG",
    ] {
        assert!(text.contains(word), "serve --help lacks {word}");
    }
}

#[tokio::test]
async fn the_cli_chats_fails_with_a_reason_and_cancels_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, "sluice.toml", "[[models]]\nname = \"slow\"\nkind = \"sim\"\nsim = { tokens = 10000, first_token_ms = 10, token_interval_ms = 100 }\n");
    let serve = Serve::start(&dir.path().join("data"), Some(&config)).await;

    // A whole answer, exit 0.
    let out = Command::new(BIN)
        .args(["chat", "--url", &serve.url, "hello"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected: String = (0..16).map(sluice::upstream::sim::token_text).collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim_end(), expected);

    // An unknown model: non-zero, with the reason.
    let out = Command::new(BIN)
        .args(["chat", "--url", &serve.url, "--model", "nope", "hello"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the model `nope` does not exist"));

    // Ctrl-C once the answer is flowing: exit 130, and the server records the cancellation.
    let mut chat = Command::new(BIN)
        .args(["chat", "--url", &serve.url, "--model", "slow", "hello"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = chat.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("Hello from") {
        let n = tokio::time::timeout(Duration::from_secs(30), stdout.read(&mut buf))
            .await
            .expect("output")
            .unwrap();
        assert!(n > 0, "chat ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    let pid = chat.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(Duration::from_secs(30), chat.wait())
        .await
        .expect("exited")
        .unwrap();
    assert_eq!(status.code(), Some(130));

    // `streams ls` and `streams show` report it.
    let listed = newest_once_ended(&serve.url).await;
    assert!(
        listed.contains("slow")
            && listed.contains("cancelled")
            && listed.contains("client_disconnected"),
        "{listed}"
    );
    let id = listed
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let out = Command::new(BIN)
        .args(["streams", "show", "--url", &serve.url, &id])
        .output()
        .await
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(&id)
            && shown.contains("cancelled client_disconnected")
            && shown.contains("Hello from"),
        "{shown}"
    );
    let out = Command::new(BIN)
        .args(["streams", "show", "--url", &serve.url, "no-such-id"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test]
async fn tail_resumes_by_itself_across_a_server_restart_and_cancel_and_keys_work() {
    let dir = tempfile::tempdir().unwrap();
    let key = sluice::auth::new_key().unwrap();
    let config = keyed_sim_config(&dir, &key);
    let data = dir.path().join("data");
    let port = free_port();
    let mut serve = Serve::start_on(port, &data, Some(&config)).await;

    // chat needs the key.
    let out = Command::new(BIN)
        .args(["chat", "--url", &serve.url, "hi"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("API key"));
    let out = Command::new(BIN)
        .args(["chat", "--url", &serve.url, "--key", &key, "hi"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A long stream, followed by `streams tail` (the key from the environment).
    let body = chat_body(
        "sim",
        true,
        json!({"tokens": 10_000, "first_token_ms": 1, "token_interval_ms": 20}),
        json!({"on_disconnect": "continue"}),
    );
    let mut original = Reader::open_as(&serve.url, &body, Some(&key)).await;
    original.next().await.unwrap();
    let id = original.stream_id.clone().unwrap();
    let mut tail = Command::new(BIN)
        .args(["streams", "tail", "--url", &serve.url, &id])
        .env("SLUICE_KEY", &key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = tail.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while seen.len() < 40 {
        let n = tokio::time::timeout(Duration::from_secs(30), stdout.read(&mut buf))
            .await
            .expect("output")
            .unwrap();
        assert!(n > 0, "tail ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    // The server dies and comes back on the same port: tail reconnects after the last event it
    // printed and ends with the stream's terminal event (interrupted by the crash).
    serve.child.kill().await.unwrap();
    let serve = Serve::start_on(port, &data, Some(&config)).await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stdout.read_to_end(&mut rest))
        .await
        .expect("tail finished")
        .unwrap();
    seen.extend_from_slice(&rest);
    let status = tail.wait().await.unwrap();
    let mut stderr = String::new();
    tail.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "the stream did not complete: {stderr}"
    );
    assert!(stderr.contains("resuming after event"), "{stderr}");
    assert!(stderr.contains("crash"), "{stderr}");
    let t: serde_json::Value = get_json_as(&format!("{}/v1/streams/{id}", serve.url), &key).await;
    assert_eq!(ending(&t), ("interrupted".into(), Some("crash".into())));
    assert_eq!(
        String::from_utf8_lossy(&seen).trim_end(),
        t["content"].as_str().unwrap(),
        "every chunk once, in order"
    );

    // streams cancel: a running stream ends cancelled(requested); again, nothing changes.
    let mut running = Reader::open_as(&serve.url, &body, Some(&key)).await;
    running.next().await.unwrap();
    let id = running.stream_id.clone().unwrap();
    for _ in 0..2 {
        let out = Command::new(BIN)
            .args(["streams", "cancel", "--url", &serve.url, "--key", &key, &id])
            .output()
            .await
            .unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{id} cancelled requested")
        );
    }
    running.finish().await;
    assert_eq!(error_event(&running.events).unwrap()["code"], "requested");
}

#[tokio::test]
async fn keys_new_prints_a_key_and_config_lines_that_accept_it() {
    let out = Command::new(BIN)
        .args(["keys", "new", "--tenant", "acme"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let key = text
        .lines()
        .find_map(|l| l.strip_prefix("key: "))
        .expect("a key line")
        .to_string();
    let config_lines = &text[text.find("[[keys]]").expect("config lines")..];
    assert!(
        !config_lines.contains(&key),
        "the config lines hold the hash, not the key"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, "sluice.toml", config_lines);
    let serve = Serve::start(&dir.path().join("data"), Some(&config)).await;
    let with_key = client()
        .get(format!("{}/v1/models", serve.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(with_key.status(), 200);
    let without = client()
        .get(format!("{}/v1/models", serve.url))
        .send()
        .await
        .unwrap();
    assert_eq!(without.status(), 401);
}

#[tokio::test]
async fn the_access_log_is_json_lines_without_keys_prompts_or_colours() {
    let dir = tempfile::tempdir().unwrap();
    let key = sluice::auth::new_key().unwrap();
    let config = keyed_sim_config(&dir, &key);
    let mut serve = Serve::start_with(
        free_port(),
        &dir.path().join("data"),
        Some(&config),
        &["--log-format", "json"],
        Stdio::piped(),
    )
    .await;
    let url = serve.url.clone();
    let prompt = "a-secret-prompt-7f3e";
    let body = json!({"model": "sim", "stream": true, "messages": [{"role": "user", "content": prompt}], "sim": {"tokens": 2}});
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-request-id", "req-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    let stream = r.headers()["x-sluice-stream-id"]
        .to_str()
        .unwrap()
        .to_string();
    r.text().await.unwrap();
    let refused = client()
        .get(format!("{url}/v1/streams?after={key}"))
        .bearer_auth("not-the-key")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    serve.signal("TERM");
    let mut stderr = String::new();
    serve
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    serve.child.wait().await.unwrap();

    assert!(!stderr.contains('\u{1b}'), "no colours into a pipe");
    assert!(!stderr.contains(&key), "the key is not logged");
    assert!(!stderr.contains(prompt), "the prompt is not logged");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    let access: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] == "sluice::access")
        .collect();
    let chat = access
        .iter()
        .find(|l| l["path"] == "/v1/chat/completions")
        .expect("an access line for the chat");
    assert_eq!(chat["method"], "POST");
    assert_eq!(chat["status"], 200);
    assert_eq!(chat["request_id"], "req-1");
    assert_eq!(chat["stream"], stream.as_str());
    assert_eq!(chat["tenant"], "acme");
    assert!(chat["duration_ms"].as_f64().is_some());
    let denied = access
        .iter()
        .find(|l| l["path"] == "/v1/streams")
        .expect("an access line for the refused request");
    assert_eq!(denied["status"], 401);
    assert_eq!(denied["tenant"], "-");
}

#[tokio::test]
async fn a_closed_output_ends_the_chat_and_cancels_the_stream() {
    // `sluice chat | head -c 20`: once the reader is gone the chat stops, says why, and the
    // stream is cancelled instead of running on for its 10,000 tokens.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, "sluice.toml", "[[models]]\nname = \"slow\"\nkind = \"sim\"\nsim = { tokens = 10000, first_token_ms = 10, token_interval_ms = 100 }\n");
    let serve = Serve::start(&dir.path().join("data"), Some(&config)).await;
    let mut chat = Command::new(BIN)
        .args(["chat", "--url", &serve.url, "--model", "slow", "hello"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = chat.stdout.take().unwrap();
    let mut buf = [0u8; 20];
    tokio::time::timeout(Duration::from_secs(30), stdout.read_exact(&mut buf))
        .await
        .expect("output")
        .unwrap();
    drop(stdout);
    let out = tokio::time::timeout(Duration::from_secs(30), chat.wait_with_output())
        .await
        .expect("the chat stops once its output is closed")
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot write the answer"), "{stderr}");

    let listed = newest_once_ended(&serve.url).await;
    assert!(
        listed.contains("cancelled") && listed.contains("client_disconnected"),
        "{listed}"
    );
}
