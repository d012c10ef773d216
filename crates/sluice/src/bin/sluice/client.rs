//! The command-line client: `sluice chat` and `sluice streams`.
//!
//! `chat` streams an answer to the terminal as it arrives (a spinner on stderr until the first
//! token). Ctrl-C drops the connection, which the gateway records as `cancelled`. `streams tail`
//! follows (or replays) a stream and, when the connection drops, resumes after the last event it
//! printed, by itself. The exit code is 0 only when the stream ended with `[DONE]`; any failure
//! prints its reason and exits 1 (130 after Ctrl-C).

use std::io::Write;
use std::time::Duration;

use anyhow::{anyhow, Context};
use futures_util::StreamExt;
use serde_json::{json, Value};

use sluice::upstream::sse::SseParser;
use sluice::upstream::{error_message, Payload};

/// How a `chat` ended, for the exit code.
#[derive(Debug)]
pub enum ChatOutcome {
    /// `[DONE]` arrived.
    Completed,
    /// The server or the stream failed; why.
    Failed(anyhow::Error),
    /// The user pressed Ctrl-C.
    Interrupted,
}

impl ChatOutcome {
    /// The process exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            ChatOutcome::Completed => 0,
            ChatOutcome::Failed(_) => 1,
            ChatOutcome::Interrupted => 130,
        }
    }
}

/// The reason an error event from sluice gives: `status(reason): message`.
fn ended_with(data: &str) -> Option<String> {
    let v: Value = serde_json::from_str(data).ok()?;
    let e = v.get("error")?;
    let text = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    Some(format!(
        "the stream ended {}({}): {}",
        text("type"),
        text("code"),
        text("message")
    ))
}

fn client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .context("cannot build an HTTP client")
}

/// A request that got no answer: says where it was going, keeps why (without the URL, which
/// the message already names).
fn unreachable(url: &str, e: reqwest::Error) -> anyhow::Error {
    anyhow::Error::new(e.without_url()).context(format!("cannot reach sluice at {url}"))
}

fn endpoint(url: &str, path: &str) -> String {
    format!("{}{path}", url.trim_end_matches('/'))
}

/// Where the gateway is, and the API key to use.
#[derive(Debug, Clone)]
pub struct Target {
    /// The gateway's URL.
    pub url: String,
    /// The API key, if the gateway has keys.
    pub key: Option<String>,
}

impl Target {
    fn request(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let request = client.request(method, endpoint(&self.url, path));
        match &self.key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }
}

/// Streams `prompt`'s answer from `model` to `out`, until done, failed or `interrupt`.
pub async fn chat(
    target: &Target,
    model: &str,
    prompt: &str,
    out: &mut (dyn Write + Send),
    interrupt: impl std::future::Future<Output = ()>,
) -> ChatOutcome {
    let url = target.url.as_str();
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    spinner.set_message(format!("waiting for {model}"));
    spinner.enable_steady_tick(Duration::from_millis(100));
    let run = async {
        let client = client()?;
        let body = json!({"model": model, "messages": [{"role": "user", "content": prompt}], "stream": true});
        let response = target
            .request(&client, reqwest::Method::POST, "/v1/chat/completions")
            .json(&body)
            .send()
            .await
            .map_err(|e| unreachable(url, e))?;
        let id = response
            .headers()
            .get(sluice::STREAM_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_string();
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("error").map(error_message))
                .unwrap_or(text);
            return Err(anyhow!("HTTP {status}: {message} (stream {id})"));
        }
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        let mut bytes = response.bytes_stream();
        let mut first = true;
        while let Some(next) = bytes.next().await {
            let next = next
                .map_err(|e| anyhow::Error::new(e.without_url()))
                .with_context(|| format!("the connection broke (stream {id})"))?;
            parser
                .push(&next, &mut events)
                .with_context(|| format!("stream {id}"))?;
            for event in events.drain(..) {
                if let Some(reason) = ended_with(&event.data) {
                    return Err(anyhow!("{reason} (stream {id})"));
                }
                match Payload::parse(&event.data) {
                    Ok(Payload::Done) => return Ok(()),
                    Ok(Payload::Chunk(chunk)) => {
                        if first && !chunk.content.is_empty() {
                            spinner.finish_and_clear();
                            first = false;
                        }
                        // A closed output (`sluice chat | head`) ends the chat: the
                        // response is dropped, which cancels the stream upstream.
                        write_answer(out, &chunk.content)
                            .with_context(|| format!("stream {id}"))?;
                    }
                    Err(e) => return Err(anyhow::Error::new(e).context(format!("stream {id}"))),
                }
            }
        }
        Err(anyhow!("the stream ended without [DONE] (stream {id})"))
    };
    let outcome = tokio::select! {
        result = run => match result {
            Ok(()) => ChatOutcome::Completed,
            Err(reason) => ChatOutcome::Failed(reason),
        },
        () = interrupt => ChatOutcome::Interrupted,
    };
    spinner.finish_and_clear();
    // Best effort: the output may be what failed.
    let _ = writeln!(out);
    outcome
}

/// Writes a piece of the answer and flushes it, so it shows at once.
fn write_answer(out: &mut (impl Write + ?Sized), text: &str) -> anyhow::Result<()> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write the answer")
}

async fn call_json(target: &Target, method: reqwest::Method, path: &str) -> anyhow::Result<Value> {
    let response = target
        .request(&client()?, method, path)
        .send()
        .await
        .map_err(|e| unreachable(&target.url, e))?;
    let status = response.status();
    let value: Value = response
        .json()
        .await
        .map_err(|e| anyhow::Error::new(e.without_url()).context("invalid answer"))?;
    if !status.is_success() {
        let message = value
            .get("error")
            .map(error_message)
            .unwrap_or_else(|| value.to_string());
        return Err(anyhow!("HTTP {status}: {message}"));
    }
    Ok(value)
}

/// `sluice streams ls`: the newest streams, one a line.
pub async fn streams_ls(target: &Target, limit: usize) -> anyhow::Result<String> {
    let list = call_json(
        target,
        reqwest::Method::GET,
        &format!("/v1/streams?limit={limit}"),
    )
    .await?;
    let mut out = format!(
        "{:<36}  {:<10}  {:<12}  {:<20}  {:>6}\n",
        "ID", "MODEL", "STATUS", "REASON", "CHUNKS"
    );
    for s in list
        .get("data")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let field = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
        out.push_str(&format!(
            "{:<36}  {:<10}  {:<12}  {:<20}  {:>6}\n",
            field("id"),
            field("model"),
            field("status"),
            field("reason"),
            s.get("chunk_count").and_then(Value::as_u64).unwrap_or(0)
        ));
    }
    Ok(out)
}

/// `sluice streams show ID`: a transcript, readable (or as JSON).
pub async fn streams_show(target: &Target, id: &str, as_json: bool) -> anyhow::Result<String> {
    let t = call_json(target, reqwest::Method::GET, &format!("/v1/streams/{id}")).await?;
    if as_json {
        return Ok(serde_json::to_string_pretty(&t)?);
    }
    let field = |k: &str| t.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    let timing = |k: &str| {
        t.pointer(&format!("/timings/{k}"))
            .and_then(Value::as_f64)
            .map(|v| format!("{v:.1} ms"))
            .unwrap_or("-".into())
    };
    let chunks = t
        .get("chunks")
        .and_then(Value::as_array)
        .map(Vec::len)
        .unwrap_or(0);
    Ok(format!(
        "stream   {}\nmodel    {}\nstatus   {} {}\ndetail   {}\nfirst    {}\ntotal    {}\nchunks   {}\n\n{}\n",
        field("id"),
        field("model"),
        field("status"),
        field("reason"),
        field("detail"),
        timing("time_to_first_token_ms"),
        timing("total_ms"),
        chunks,
        field("content"),
    ))
}

/// `sluice streams cancel ID`: stops a running stream; prints its final status.
pub async fn streams_cancel(target: &Target, id: &str) -> anyhow::Result<String> {
    let v = call_json(
        target,
        reqwest::Method::POST,
        &format!("/v1/streams/{id}/cancel"),
    )
    .await?;
    let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
    Ok(format!(
        "{} {} {}\n",
        field("id"),
        field("status"),
        field("reason")
    ))
}

/// Why one connection of `tail` ended early.
enum Attempt {
    /// The connection or the server failed: reconnecting may help.
    Retry(anyhow::Error),
    /// The stream itself failed, or the output did: reconnecting would not help.
    Fatal(anyhow::Error),
}

/// How many times in a row `tail` reconnects before it gives up.
const TAIL_RETRIES: u32 = 10;

/// `sluice streams tail ID`: prints a stream's content from the start (replay, then live), and
/// when the connection drops, reconnects with `Last-Event-ID` and carries on where it was.
pub async fn streams_tail(target: &Target, id: &str, out: &mut (dyn Write + Send)) -> ChatOutcome {
    let client = match client() {
        Ok(c) => c,
        Err(e) => return ChatOutcome::Failed(e),
    };
    let mut last: u64 = 0;
    let mut failures = 0;
    loop {
        let attempt = async {
            let response = target
                .request(
                    &client,
                    reqwest::Method::GET,
                    &format!("/v1/streams/{id}/events"),
                )
                .header("last-event-id", last.to_string())
                .send()
                .await
                .map_err(|e| Attempt::Retry(unreachable(&target.url, e)))?;
            if !response.status().is_success() {
                let status = response.status();
                let v: Value = response.json().await.unwrap_or(Value::Null);
                let message = v.get("error").map(error_message).unwrap_or_default();
                let e = anyhow!("HTTP {status}: {message}");
                return Err(if status.is_server_error() {
                    Attempt::Retry(e)
                } else {
                    Attempt::Fatal(e)
                });
            }
            let mut parser = SseParser::new();
            let mut events = Vec::new();
            let mut bytes = response.bytes_stream();
            while let Some(next) = bytes.next().await {
                let next = next.map_err(|e| {
                    Attempt::Retry(
                        anyhow::Error::new(e.without_url()).context("the connection broke"),
                    )
                })?;
                parser
                    .push(&next, &mut events)
                    .map_err(|e| Attempt::Fatal(e.into()))?;
                for event in events.drain(..) {
                    if let Some(seq) = event.id.as_deref().and_then(|i| i.parse::<u64>().ok()) {
                        last = last.max(seq);
                    }
                    if let Some(reason) = ended_with(&event.data) {
                        return Err(Attempt::Fatal(anyhow!(reason)));
                    }
                    match Payload::parse(&event.data) {
                        Ok(Payload::Done) => return Ok(()),
                        Ok(Payload::Chunk(chunk)) => {
                            write_answer(out, &chunk.content).map_err(Attempt::Fatal)?;
                        }
                        Err(e) => return Err(Attempt::Fatal(e.into())),
                    }
                }
            }
            Err(Attempt::Retry(anyhow!(
                "the connection ended before the stream did"
            )))
        };
        match attempt.await {
            Ok(()) => {
                // Best effort: the answer is out; only its final newline could be lost.
                let _ = writeln!(out);
                return ChatOutcome::Completed;
            }
            Err(Attempt::Retry(reason)) if failures < TAIL_RETRIES => {
                failures += 1;
                eprintln!("({reason:#}; resuming after event {last})");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(failures))).await;
            }
            Err(Attempt::Retry(reason) | Attempt::Fatal(reason)) => {
                // Best effort: the output may be what failed.
                let _ = writeln!(out);
                return ChatOutcome::Failed(reason.context(format!("stream {id}")));
            }
        }
    }
}
