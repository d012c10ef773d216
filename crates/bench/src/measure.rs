//! The measurements: time to first token, per-chunk latency, throughput, close-to-upstream-close
//! delay and idle-stream memory, each against one target (direct, sluice, a peer).

#![allow(
    clippy::disallowed_methods,
    reason = "a benchmark client: each task it spawns is joined before its figures are printed"
)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sluice::mock_upstream::{clock_ns, MockUpstream};
use sluice::upstream::sse::SseParser;

/// A gateway (or the upstream itself) to send the workload through.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) id: &'static str,
    pub(crate) name: String,
    pub(crate) base: String,
    pub(crate) key: Option<String>,
    pub(crate) model: &'static str,
    pub(crate) client: reqwest::Client,
    /// Whether chunks keep the upstream's send stamp (a peer may rewrite them).
    pub(crate) stamps: bool,
}

/// p50/p99 of a sample, in microseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default)]
pub(crate) struct Dist {
    pub(crate) n: usize,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
}

/// The stream id a gateway named in its response.
pub(crate) fn stream_id_of(response: &reqwest::Response) -> anyhow::Result<String> {
    Ok(response
        .headers()
        .get("x-sluice-stream-id")
        .and_then(|v| v.to_str().ok())
        .context("stream id")?
        .to_string())
}

/// The `q` quantile of `sorted` (nearest rank; 0 if empty).
pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n => sorted[((n as f64 - 1.0) * q).round() as usize],
    }
}

pub(crate) fn dist(mut us: Vec<f64>) -> Dist {
    if us.is_empty() {
        return Dist::default();
    }
    us.sort_by(f64::total_cmp);
    let at = |q: f64| quantile(&us, q);
    Dist {
        n: us.len(),
        p50_us: at(0.50),
        p99_us: at(0.99),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Level {
    pub(crate) concurrency: usize,
    pub(crate) streams_per_s: f64,
    pub(crate) chunks_per_s: f64,
    pub(crate) failed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub(crate) struct TargetResult {
    pub(crate) name: String,
    pub(crate) ttft: Dist,
    pub(crate) chunk_latency: Option<Dist>,
    pub(crate) close_to_upstream_close: Dist,
    /// Closes after which the upstream still had the request 2 s later.
    pub(crate) upstream_never_closed: usize,
    pub(crate) throughput: Vec<Level>,
}

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1024)
        .build()
        .unwrap_or_default()
}

/// One streamed chat through `t`, read to the end. Calls `on_chunk(data)` for each event.
pub(crate) async fn stream(
    t: &Target,
    sim: Value,
    mut on_event: impl FnMut(&str),
) -> anyhow::Result<u64> {
    let mut request = t
        .client
        .post(format!("{}/chat/completions", t.base))
        .timeout(Duration::from_secs(30))
        .json(&json!({"model": t.model, "stream": true, "messages": [{"role": "user", "content": "bench"}], "sim": sim, "sluice": {"idle_timeout_ms": 600000}}));
    if let Some(key) = &t.key {
        request = request.bearer_auth(key);
    }
    let mut response = request.send().await?;
    if !response.status().is_success() {
        bail!("{} answered {}", t.name, response.status());
    }
    let mut parser = SseParser::new();
    let mut events = Vec::new();
    let mut count = 0;
    while let Some(bytes) = response.chunk().await? {
        parser.push(&bytes, &mut events)?;
        for e in events.drain(..) {
            if e.data == "[DONE]" {
                return Ok(count);
            }
            count += 1;
            on_event(&e.data);
        }
    }
    bail!("{}: the stream ended without [DONE]", t.name)
}

/// Request to first content chunk, one stream at a time.
pub(crate) async fn ttft(t: &Target, n: usize) -> anyhow::Result<Dist> {
    Ok(dist(ttft_samples(t, n).await?))
}

/// `n` times to first token (µs), one stream at a time.
pub(crate) async fn ttft_samples(t: &Target, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let mut first = None;
        stream(
            t,
            json!({"tokens": 2, "first_token_ms": 0, "token_interval_ms": 0}),
            |_| {
                first.get_or_insert_with(|| start.elapsed());
            },
        )
        .await?;
        samples.push(first.unwrap_or_default().as_secs_f64() * 1e6);
    }
    Ok(samples)
}

/// How long ago (µs) the mock upstream stamped the chunk `data` as it wrote it (its
/// `"x_sent_ns"`), if it carries a stamp.
pub(crate) fn delay_us(data: &str) -> Option<f64> {
    let now = clock_ns();
    let sent = data
        .split("\"x_sent_ns\":")
        .nth(1)
        .and_then(|r| r.trim_end_matches('}').parse::<u64>().ok())?;
    Some(now.saturating_sub(sent) as f64 / 1000.0)
}

/// From the upstream writing a chunk to the client reading it.
pub(crate) async fn chunk_latency(
    t: &Target,
    streams: usize,
    tokens: u32,
) -> anyhow::Result<Option<Dist>> {
    if !t.stamps {
        return Ok(None);
    }
    Ok(Some(dist(chunk_latency_samples(t, streams, tokens).await?)))
}

/// [`chunk_latency`]'s samples (µs), for a target whose upstream stamps its chunks.
pub(crate) async fn chunk_latency_samples(
    t: &Target,
    streams: usize,
    tokens: u32,
) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::new();
    for _ in 0..streams {
        stream(
            t,
            json!({"tokens": tokens, "first_token_ms": 0, "token_interval_ms": 1}),
            |data| {
                if let Some(us) = delay_us(data) {
                    samples.push(us);
                }
            },
        )
        .await?;
    }
    Ok(samples)
}

/// Streams and chunks per second with `concurrency` clients looping for `seconds`.
pub(crate) async fn throughput(t: &Target, concurrency: usize, seconds: f64, tokens: u32) -> Level {
    let streams = Arc::new(AtomicU64::new(0));
    let chunks = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(seconds);
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (t, streams, chunks, failed) =
            (t.clone(), streams.clone(), chunks.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < until {
                match stream(
                    &t,
                    json!({"tokens": tokens, "first_token_ms": 0, "token_interval_ms": 0}),
                    |_| {},
                )
                .await
                {
                    Ok(n) => {
                        streams.fetch_add(1, Ordering::Relaxed);
                        chunks.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Level {
        concurrency,
        streams_per_s: streams.load(Ordering::Relaxed) as f64 / elapsed,
        chunks_per_s: chunks.load(Ordering::Relaxed) as f64 / elapsed,
        failed: failed.load(Ordering::Relaxed),
    }
}

/// From the client closing its connection to the upstream seeing its request go away; and how
/// many times the upstream still had the request 2 s after the close.
/// Waits (up to 2 s) until the upstream has seen one more connection close than `before`;
/// the microseconds since `since`, or `None` if it never did.
pub(crate) async fn upstream_closed(
    mock: &MockUpstream,
    before: u64,
    since: Instant,
) -> Option<f64> {
    tokio::time::timeout(
        Duration::from_secs(2),
        mock.stats().wait_disconnected(before + 1),
    )
    .await
    .ok()
    .map(|()| since.elapsed().as_secs_f64() * 1e6)
}

pub(crate) async fn close_delay(
    t: &Target,
    mock: &MockUpstream,
    n: usize,
) -> anyhow::Result<(Dist, usize)> {
    let (samples, never) = close_delay_samples(t, mock, n).await?;
    Ok((dist(samples), never))
}

/// [`close_delay`]'s samples (µs), and how many closes the upstream never saw.
pub(crate) async fn close_delay_samples(
    t: &Target,
    mock: &MockUpstream,
    n: usize,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let mut samples = Vec::with_capacity(n);
    let mut never = 0;
    for _ in 0..n {
        let mut request = t
            .client
            .post(format!("{}/chat/completions", t.base))
            .json(&json!({"model": t.model, "stream": true, "messages": [{"role": "user", "content": "bench"}], "sim": {"tokens": 1_000_000, "first_token_ms": 0, "token_interval_ms": 5}}));
        if let Some(key) = &t.key {
            request = request.bearer_auth(key);
        }
        let mut response = request.send().await?;
        response.chunk().await?.context("no first chunk")?;
        let before = mock.stats().disconnected();
        let closed = Instant::now();
        drop(response);
        match upstream_closed(mock, before, closed).await {
            Some(us) => samples.push(us),
            None => never += 1,
        }
    }
    Ok((samples, never))
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Idle {
    pub(crate) streams: usize,
    pub(crate) rss_before_mb: f64,
    pub(crate) rss_with_streams_mb: f64,
    pub(crate) per_stream_kb: f64,
    pub(crate) extrapolated_10k_mb: f64,
}

pub(crate) fn rss_kb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

/// Sluice's RSS with `n` open streams of `model` that have sent one chunk and then wait.
pub(crate) async fn idle_streams(
    base: &str,
    pid: u32,
    n: usize,
    model: &str,
) -> anyhow::Result<Idle> {
    let before = rss_kb(pid)?;
    let client = client();
    let mut open = Vec::with_capacity(n);
    let mut pending = Vec::new();
    for i in 0..n {
        let request = client
            .post(format!("{base}/chat/completions"))
            .json(&json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "idle"}], "sim": {"tokens": 100, "first_token_ms": 0, "stall_after": 1}, "sluice": {"idle_timeout_ms": 3_600_000}}));
        pending.push(tokio::spawn(async move {
            let mut r = request.send().await?;
            r.chunk().await?;
            anyhow::Ok(r)
        }));
        if pending.len() == 200 || i + 1 == n {
            for p in pending.drain(..) {
                open.push(p.await??);
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with = rss_kb(pid)?;
    drop(open);
    Ok(Idle {
        streams: n,
        rss_before_mb: before / 1024.0,
        rss_with_streams_mb: with / 1024.0,
        per_stream_kb: (with - before) / n as f64,
        extrapolated_10k_mb: (before + (with - before) / n as f64 * 10_000.0) / 1024.0,
    })
}
