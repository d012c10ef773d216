//! Memory under hostile input and over time, in a fresh sluice process (`--only-memory`).
//!
//! Each scenario reports sluice's RSS (from `/proc`) before, at its peak while the scenario
//! runs (sampled every 5 ms), and after it:
//! - **transcript read**: one large transcript is made, then read whole with
//!   `GET /v1/streams/{id}`; a read should cost a page, not a multiple of the transcript;
//! - **dripped bodies**: many connections send a request body one byte per TCP segment,
//!   round-robin; memory should follow the bytes sent, not the segments;
//! - **spike, then quiet**: a burst of large request bodies, then ten idle seconds; memory
//!   should return near where it started;
//! - **soak**: streams back to back for minutes, RSS sampled each second; it should be flat.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::measure::{client, rss_kb, stream_id_of};
use crate::report::header;

/// RSS around one scenario, MB.
#[derive(Debug, Clone, Serialize)]
pub struct Rss {
    /// Before it.
    pub before_mb: f64,
    /// The most while it ran.
    pub peak_mb: f64,
    /// After it (and after the scenario's quiet time, if it has one).
    pub after_mb: f64,
}

/// What `--only-memory` measures.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// The transcript's size as served, MB.
    pub transcript_mb: f64,
    /// RSS while reading it.
    pub transcript_read: Rss,
    /// Connections dripping a body, and each body's size in bytes.
    pub drip_connections: usize,
    /// Each dripped body's size, bytes.
    pub drip_body_bytes: usize,
    /// RSS while the bodies dripped (after: every body sent but its last byte).
    pub drip: Rss,
    /// RSS growth per body byte received, bytes.
    pub drip_bytes_per_body_byte: f64,
    /// Large bodies sent at once, and each one's size in bytes.
    pub spike_requests: usize,
    /// Each spike body's size, bytes.
    pub spike_body_bytes: usize,
    /// RSS around the spike; `after` is after 10 idle seconds.
    pub spike: Rss,
    /// Soak: how long, and how many streams at a time.
    pub soak_seconds: u64,
    /// Concurrent streams during the soak.
    pub soak_concurrency: usize,
    /// Streams completed during the soak.
    pub soak_streams: u64,
    /// RSS sampled each second of the soak, MB.
    pub soak_rss_mb: Vec<f64>,
    /// RSS 10 s after the soak, MB.
    pub soak_after_mb: f64,
}

/// Samples `pid`'s RSS every 5 ms until `stop`, and returns the highest, KB.
fn sample_peak(pid: u32, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<f64> {
    tokio::spawn(async move {
        let mut peak = 0f64;
        while !stop.load(Ordering::Relaxed) {
            peak = peak.max(rss_kb(pid).unwrap_or(0.0));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        peak.max(rss_kb(pid).unwrap_or(0.0))
    })
}

/// Runs `scenario` while sampling the peak; RSS before, peak, and right after (KB).
async fn around<T>(
    pid: u32,
    scenario: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, f64, f64, f64)> {
    let before = rss_kb(pid)?;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_peak(pid, stop.clone());
    let out = scenario.await;
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.await?;
    let after = rss_kb(pid)?;
    Ok((out?, before, peak, after))
}

fn mb(kb: f64) -> f64 {
    (kb / 1024.0 * 10.0).round() / 10.0
}

/// Streams one answer to the end; returns its stream id.
async fn run_stream(
    base: &str,
    model: &str,
    sim: serde_json::Value,
    sluice: serde_json::Value,
) -> anyhow::Result<String> {
    let mut r = client()
        .post(format!("{base}/chat/completions"))
        .json(&json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "memory"}], "sim": sim, "sluice": sluice}))
        .send()
        .await?;
    let id = stream_id_of(&r)?;
    while r.chunk().await?.is_some() {}
    Ok(id)
}

/// Reads `GET /v1/streams/{id}` to its end; returns its size in bytes.
async fn read_transcript(base: &str, id: &str) -> anyhow::Result<usize> {
    let mut r = client().get(format!("{base}/streams/{id}")).send().await?;
    anyhow::ensure!(r.status().is_success(), "transcript read: {}", r.status());
    let mut size = 0;
    while let Some(bytes) = r.chunk().await? {
        size += bytes.len();
    }
    Ok(size)
}

/// Opens `n` connections and sends each a chat request whose `len`-byte body goes one byte per
/// write, round-robin over the connections (so each byte is its own TCP segment). Stops before
/// the last byte of each body, measures, then sends it.
async fn drip(addr: &str, n: usize, len: usize, pid: u32) -> anyhow::Result<f64> {
    let mut conns = Vec::with_capacity(n);
    let body = {
        let filler = "x".repeat(len.saturating_sub(80));
        let b = json!({"model": "sim", "messages": [{"role": "user", "content": filler}], "sim": {"tokens": 1}}).to_string();
        anyhow::ensure!(b.len() <= len, "body template too long");
        format!("{b}{}", " ".repeat(len - b.len()))
    };
    for _ in 0..n {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        conns.push(s);
    }
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
    );
    for c in &mut conns {
        c.write_all(head.as_bytes()).await?;
    }
    let bytes = body.as_bytes();
    for i in 0..len - 1 {
        for c in &mut conns {
            c.write_all(&bytes[i..i + 1]).await?;
        }
        if i % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = rss_kb(pid)?;
    for c in &mut conns {
        c.write_all(&bytes[len - 1..]).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(held)
}

/// Sends `n` chat requests with `len`-byte bodies at once (non-streaming, one token each).
async fn spike(base: &str, n: usize, len: usize) -> anyhow::Result<()> {
    let filler = "y ".repeat(len / 2 - 100);
    let body = Arc::new(json!({"model": "sim", "messages": [{"role": "user", "content": filler}], "sim": {"tokens": 1, "first_token_ms": 0}}).to_string());
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (base, body) = (base.to_string(), body.clone());
        tasks.push(tokio::spawn(async move {
            client()
                .post(format!("{base}/chat/completions"))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await?
                .bytes()
                .await?;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Everything `--only-memory` measures, against the sluice at `base` (…/v1) with process `pid`.
pub async fn run(base: &str, pid: u32, soak_seconds: u64) -> anyhow::Result<Memory> {
    let addr = base
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_string();
    // Warm up: code paths, the connection pool, the store.
    for _ in 0..20 {
        run_stream(
            base,
            "up",
            json!({"tokens": 16, "first_token_ms": 0, "token_interval_ms": 0}),
            json!(null),
        )
        .await?;
    }

    // A large transcript (the upstream as fast as it goes for 3 s), then one read of it.
    let big = run_stream(
        base,
        "up",
        json!({"tokens": 1_000_000_000u64, "first_token_ms": 0, "token_interval_ms": 0}),
        json!({"total_timeout_ms": 3000}),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (size, before, peak, after) = around(pid, read_transcript(base, &big)).await?;
    let transcript_read = Rss {
        before_mb: mb(before),
        peak_mb: mb(peak),
        after_mb: mb(after),
    };

    let (drip_n, drip_len) = (50, 10_000);
    let (held, before, peak, after) = around(pid, drip(&addr, drip_n, drip_len, pid)).await?;
    let drip_rss = Rss {
        before_mb: mb(before),
        peak_mb: mb(peak),
        after_mb: mb(after),
    };
    let per_byte = (held - before) * 1024.0 / (drip_n * drip_len) as f64;

    let (spike_n, spike_len) = (200, 1_000_000);
    let (_, before, peak, _) = around(pid, spike(base, spike_n, spike_len)).await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let spike_rss = Rss {
        before_mb: mb(before),
        peak_mb: mb(peak),
        after_mb: mb(rss_kb(pid)?),
    };

    let concurrency = 32;
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(soak_seconds);
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (base, done) = (base.to_string(), done.clone());
        workers.push(tokio::spawn(async move {
            while Instant::now() < until {
                if run_stream(
                    &base,
                    "up",
                    json!({"tokens": 64, "first_token_ms": 0, "token_interval_ms": 1}),
                    json!(null),
                )
                .await
                .is_ok()
                {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let mut soak_rss = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        soak_rss.push(mb(rss_kb(pid)?));
    }
    for w in workers {
        w.await?;
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    Ok(Memory {
        transcript_mb: (size as f64 / 1e6 * 10.0).round() / 10.0,
        transcript_read,
        drip_connections: drip_n,
        drip_body_bytes: drip_len,
        drip: drip_rss,
        drip_bytes_per_body_byte: (per_byte * 10.0).round() / 10.0,
        spike_requests: spike_n,
        spike_body_bytes: spike_len,
        spike: spike_rss,
        soak_seconds,
        soak_concurrency: concurrency,
        soak_streams: done.load(Ordering::Relaxed),
        soak_rss_mb: soak_rss,
        soak_after_mb: mb(rss_kb(pid)?),
    })
}

/// The memory report in markdown.
pub fn markdown(raw: &serde_json::Value, m: &Memory) -> String {
    let soak = &m.soak_rss_mb;
    let first = soak.first().copied().unwrap_or(0.0);
    let last = soak.last().copied().unwrap_or(0.0);
    let max = soak.iter().copied().fold(0.0, f64::max);
    let row = |name: &str, r: &Rss, note: String| {
        format!(
            "| {name} | {:.1} | {:.1} | {:.1} | {note} |\n",
            r.before_mb, r.peak_mb, r.after_mb
        )
    };
    format!(
        "{header}\
         sluice's RSS (MB), in a fresh process with transcripts on:\n\n\
         | scenario | before | peak | after | |\n|---|---|---|---|---|\n\
         {t}{d}{s}\n\
         Soak: {streams} streams, {conc} at a time for {secs} s; RSS each second from {first:.1} to {last:.1} MB \
         (highest {max:.1}); {after:.1} MB 10 s after.\n\n\
         RSS each second: {series}\n",
        header = header("Memory under hostile input", raw),
        t = row(
            "read one transcript",
            &m.transcript_read,
            format!("{:.1} MB transcript", m.transcript_mb)
        ),
        d = row(
            "dripped bodies",
            &m.drip,
            format!(
                "{} connections × {} bytes, a byte per segment: {:.1} bytes of RSS per body byte",
                m.drip_connections, m.drip_body_bytes, m.drip_bytes_per_body_byte
            )
        ),
        s = row(
            "spike, then 10 s quiet",
            &m.spike,
            format!(
                "{} requests of {} bytes at once",
                m.spike_requests, m.spike_body_bytes
            )
        ),
        streams = m.soak_streams,
        conc = m.soak_concurrency,
        secs = m.soak_seconds,
        after = m.soak_after_mb,
        series = soak
            .iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(" "),
    )
}
