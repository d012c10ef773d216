//! `sluice-bench`: sluice against the physical limit and a peer, for the same workload, in one run.
//!
//! Targets, all in front of the same upstream (sluice's simulated model served over HTTP, in this
//! process so that "the upstream saw the close" is observed exactly and chunks carry their send
//! time on this process's clock):
//! - **direct**: the client talks to the upstream itself (the physical limit);
//! - **sluice**: a `sluice serve` process (release build) with transcripts on;
//! - **sluice, no transcripts**: the same with `record_chunks = false`;
//! - **peer**: another gateway (the LiteLLM proxy, started by `bench/run`), if given.
//!
//! Absolute times on a shared machine drift, so the report leads with differences and ratios to
//! direct and to the peer. This is a program that prints figures, not a test: nothing here
//! passes or fails a build.
#![allow(
    clippy::disallowed_methods,
    reason = "a benchmark client: each task it spawns is joined before its figures are printed"
)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sluice::mock_upstream::{clock_ns, MockOptions, MockUpstream};
use sluice::upstream::sim::SimDefaults;
use sluice::upstream::sse::SseParser;

mod memory;

/// sluice-bench: direct vs sluice vs a peer gateway, streaming, on one machine.
#[derive(Debug, Parser)]
struct Args {
    /// Full mode (release figures): longer runs and 10,000 idle streams. Default: quick mode
    /// (under a minute, for everyday checks).
    #[arg(long)]
    full: bool,
    /// The sluice binary to measure [default: `sluice` next to this binary].
    #[arg(long)]
    sluice_bin: Option<PathBuf>,
    /// Port for the upstream (a peer's config points at it).
    #[arg(long, default_value_t = 0)]
    upstream_port: u16,
    /// A peer gateway's OpenAI base URL (…/v1), serving model `up` from the upstream.
    #[arg(long)]
    peer_url: Option<String>,
    /// The peer's API key.
    #[arg(long)]
    peer_key: Option<String>,
    /// The peer's name in the report.
    #[arg(long, default_value = "LiteLLM proxy")]
    peer_name: String,
    /// Why there is no peer (printed in the report).
    #[arg(long)]
    peer_skipped: Option<String>,
    /// Where the report (report.md) and raw figures (results.json) go.
    #[arg(long, default_value = "docs/benchmarks")]
    out: PathBuf,
    /// Run only the idle-stream memory measurement and print it (for profiling).
    #[arg(long)]
    only_idle: bool,
    /// Run only sluice's throughput at this many concurrent streams for 10 s and print it (for
    /// profiling: attach perf to the sluice process meanwhile).
    #[arg(long)]
    only_throughput: Option<usize>,
    /// Run only the memory scenarios (transcript read, dripped bodies, a spike, a soak) in a
    /// fresh sluice and write `memory.md` and `memory.json` to `--out`.
    #[arg(long)]
    only_memory: bool,
    /// How long the memory soak runs, in seconds.
    #[arg(long, default_value_t = 120)]
    soak_seconds: u64,
    /// The command line to print in the report.
    #[arg(long, default_value = "bash bench/run")]
    command: String,
}

/// How much of each workload to run.
#[derive(Debug, Clone, Serialize)]
struct Plan {
    ttft_requests: usize,
    chunk_streams: usize,
    chunk_tokens: u32,
    levels: Vec<usize>,
    level_seconds: f64,
    tokens_per_stream: u32,
    close_samples: usize,
    idle_streams: usize,
}

impl Plan {
    fn new(full: bool) -> Self {
        if full {
            Plan {
                ttft_requests: 1000,
                chunk_streams: 20,
                chunk_tokens: 500,
                levels: vec![1, 16, 64, 256],
                level_seconds: 8.0,
                tokens_per_stream: 64,
                close_samples: 300,
                idle_streams: 10_000,
            }
        } else {
            Plan {
                ttft_requests: 100,
                chunk_streams: 4,
                chunk_tokens: 100,
                levels: vec![1, 16, 64, 256],
                level_seconds: 1.0,
                tokens_per_stream: 64,
                close_samples: 30,
                idle_streams: 1_000,
            }
        }
    }
}

/// A gateway (or the upstream itself) to send the workload through.
#[derive(Debug, Clone)]
struct Target {
    id: &'static str,
    name: String,
    base: String,
    key: Option<String>,
    model: &'static str,
    client: reqwest::Client,
    /// Whether chunks keep the upstream's send stamp (a peer may rewrite them).
    stamps: bool,
}

/// p50/p99 of a sample, in microseconds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default)]
struct Dist {
    n: usize,
    p50_us: f64,
    p99_us: f64,
}

fn dist(mut us: Vec<f64>) -> Dist {
    if us.is_empty() {
        return Dist::default();
    }
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() as f64 - 1.0) * q).round() as usize];
    Dist {
        n: us.len(),
        p50_us: at(0.50),
        p99_us: at(0.99),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Level {
    concurrency: usize,
    streams_per_s: f64,
    chunks_per_s: f64,
    failed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct TargetResult {
    name: String,
    ttft: Dist,
    chunk_latency: Option<Dist>,
    close_to_upstream_close: Dist,
    /// Closes after which the upstream still had the request 2 s later.
    upstream_never_closed: usize,
    throughput: Vec<Level>,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1024)
        .build()
        .unwrap_or_default()
}

/// One streamed chat through `t`, read to the end. Calls `on_chunk(data)` for each event.
async fn stream(t: &Target, sim: Value, mut on_event: impl FnMut(&str)) -> anyhow::Result<u64> {
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
async fn ttft(t: &Target, n: usize) -> anyhow::Result<Dist> {
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
    Ok(dist(samples))
}

/// From the upstream writing a chunk to the client reading it.
async fn chunk_latency(t: &Target, streams: usize, tokens: u32) -> anyhow::Result<Option<Dist>> {
    if !t.stamps {
        return Ok(None);
    }
    let mut samples = Vec::new();
    for _ in 0..streams {
        stream(
            t,
            json!({"tokens": tokens, "first_token_ms": 0, "token_interval_ms": 1}),
            |data| {
                let now = clock_ns();
                if let Some(sent) = data
                    .split("\"x_sent_ns\":")
                    .nth(1)
                    .and_then(|r| r.trim_end_matches('}').parse::<u64>().ok())
                {
                    samples.push(now.saturating_sub(sent) as f64 / 1000.0);
                }
            },
        )
        .await?;
    }
    Ok(Some(dist(samples)))
}

/// Streams and chunks per second with `concurrency` clients looping for `seconds`.
async fn throughput(t: &Target, concurrency: usize, seconds: f64, tokens: u32) -> Level {
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
async fn close_delay(t: &Target, mock: &MockUpstream, n: usize) -> anyhow::Result<(Dist, usize)> {
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
        match tokio::time::timeout(
            Duration::from_secs(2),
            mock.stats().wait_disconnected(before + 1),
        )
        .await
        {
            Ok(()) => samples.push(closed.elapsed().as_secs_f64() * 1e6),
            Err(_) => never += 1,
        }
    }
    Ok((dist(samples), never))
}

#[derive(Debug, Clone, Serialize)]
struct Idle {
    streams: usize,
    rss_before_mb: f64,
    rss_with_streams_mb: f64,
    per_stream_kb: f64,
    extrapolated_10k_mb: f64,
}

fn rss_kb(pid: u32) -> anyhow::Result<f64> {
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

/// Sluice's RSS with `n` open streams that have sent one chunk and then wait.
async fn idle_streams(base: &str, pid: u32, n: usize) -> anyhow::Result<Idle> {
    let before = rss_kb(pid)?;
    let client = client();
    let mut open = Vec::with_capacity(n);
    let mut pending = Vec::new();
    for i in 0..n {
        let request = client
            .post(format!("{base}/chat/completions"))
            .json(&json!({"model": "sim", "stream": true, "messages": [{"role": "user", "content": "idle"}], "sim": {"tokens": 100, "first_token_ms": 0, "stall_after": 1}, "sluice": {"idle_timeout_ms": 3_600_000}}));
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

struct Sluice {
    child: tokio::process::Child,
    base: String,
    _dir: PathBuf,
}

async fn start_sluice(
    bin: &Path,
    upstream: &str,
    record_chunks: bool,
    tag: &str,
) -> anyhow::Result<Sluice> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = std::env::temp_dir().join(format!("sluice-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("sluice.toml");
    std::fs::write(&config, format!("record_chunks = {record_chunks}\nkeep_alive_ms = 600000\n[[models]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{upstream}\"\n"))?;
    let child = tokio::process::Command::new(bin)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir.join("data"))
        .arg("--config")
        .arg(&config)
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..200 {
        if reqwest::get(format!("{base}/healthz"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(Sluice {
                child,
                base: format!("{base}/v1"),
                _dir: dir,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("sluice did not start")
}

#[derive(Debug, Clone, Serialize)]
struct Goal {
    goal: String,
    measured: String,
    met: Option<bool>,
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem_gb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": (mem_gb * 10.0).round() / 10.0,
        "os": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let plan = Plan::new(args.full);
    let sluice_bin = match &args.sluice_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("sluice"),
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.upstream_port))
        .await
        .context("upstream port")?;
    let mock = MockUpstream::start(
        listener,
        MockOptions {
            defaults: SimDefaults::default(),
            split_bytes: 0,
            stamp: true,
        },
    )?;
    let sluice = start_sluice(&sluice_bin, &mock.base_url(), true, "on").await?;
    let bare = start_sluice(&sluice_bin, &mock.base_url(), false, "off").await?;
    let sluice_pid = sluice.child.id().context("sluice pid")?;
    let sluice_target = Target {
        id: "sluice",
        name: "sluice".into(),
        base: sluice.base.clone(),
        key: None,
        model: "up",
        client: client(),
        stamps: true,
    };
    if let Some(concurrency) = args.only_throughput {
        eprintln!("sluice pid {sluice_pid}");
        let level = throughput(&sluice_target, concurrency, 10.0, plan.tokens_per_stream).await;
        println!("{}", serde_json::to_string_pretty(&level)?);
        return Ok(());
    }
    if args.only_memory {
        drop((sluice, bare));
        let fresh = start_sluice(&sluice_bin, &mock.base_url(), true, "memory").await?;
        let pid = fresh.child.id().context("sluice pid")?;
        let m = memory::run(&fresh.base, pid, args.soak_seconds).await?;
        std::fs::create_dir_all(&args.out)?;
        let raw = json!({
            "date": now_utc(),
            "command": args.command,
            "machine": machine(),
            "memory": m,
        });
        std::fs::write(
            args.out.join("memory.json"),
            serde_json::to_string_pretty(&raw)?,
        )?;
        std::fs::write(args.out.join("memory.md"), memory::markdown(&raw, &m))?;
        println!("{}", memory::markdown(&raw, &m));
        return Ok(());
    }
    if args.only_idle {
        let idle = idle_streams(&sluice.base, sluice_pid, plan.idle_streams).await?;
        println!("{}", serde_json::to_string_pretty(&idle)?);
        return Ok(());
    }

    let mut targets = vec![
        Target {
            id: "direct",
            name: "direct (upstream itself)".into(),
            base: mock.base_url(),
            key: None,
            model: "sim",
            client: client(),
            stamps: true,
        },
        sluice_target.clone(),
        Target {
            id: "sluice_no_transcripts",
            name: "sluice, record_chunks = false".into(),
            base: bare.base.clone(),
            key: None,
            model: "up",
            client: client(),
            stamps: true,
        },
    ];
    if let Some(url) = &args.peer_url {
        targets.push(Target {
            id: "peer",
            name: args.peer_name.clone(),
            base: url.trim_end_matches('/').to_string(),
            key: args.peer_key.clone(),
            model: "up",
            client: client(),
            stamps: false,
        });
    }

    let steps = targets.len() as u64 * (3 + plan.levels.len() as u64) + 1;
    let bar = indicatif::ProgressBar::new(steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut results = serde_json::Map::new();
    for t in &targets {
        let mut r = TargetResult {
            name: t.name.clone(),
            ..Default::default()
        };
        bar.set_message(format!("{}: time to first token", t.name));
        // Warm up connections and code paths.
        ttft(t, 10)
            .await
            .with_context(|| format!("{}: warm-up", t.name))?;
        r.ttft = ttft(t, plan.ttft_requests).await?;
        bar.inc(1);
        bar.set_message(format!("{}: per-chunk latency", t.name));
        r.chunk_latency = chunk_latency(t, plan.chunk_streams, plan.chunk_tokens).await?;
        bar.inc(1);
        bar.set_message(format!("{}: close → upstream close", t.name));
        (r.close_to_upstream_close, r.upstream_never_closed) =
            close_delay(t, &mock, plan.close_samples).await?;
        bar.inc(1);
        for &c in &plan.levels {
            bar.set_message(format!("{}: throughput at {c} concurrent", t.name));
            r.throughput
                .push(throughput(t, c, plan.level_seconds, plan.tokens_per_stream).await);
            bar.inc(1);
        }
        results.insert(t.id.to_string(), serde_json::to_value(r)?);
    }
    bar.set_message(format!(
        "sluice: RSS with {} idle streams",
        plan.idle_streams
    ));
    // A fresh process: memory the allocator kept from the throughput runs is not the idle cost.
    drop((sluice, bare));
    let fresh = start_sluice(&sluice_bin, &mock.base_url(), true, "idle").await?;
    let fresh_pid = fresh.child.id().context("sluice pid")?;
    let idle = idle_streams(&fresh.base, fresh_pid, plan.idle_streams).await?;
    drop(fresh);
    bar.inc(1);
    bar.finish_with_message("done");

    let get = |id: &str| {
        results
            .get(id)
            .and_then(|v| serde_json::from_value::<TargetResult>(v.clone()).ok())
    };
    let report = Report::new(
        &args,
        &plan,
        get("direct"),
        get("sluice"),
        get("sluice_no_transcripts"),
        get("peer"),
        &idle,
    );
    std::fs::create_dir_all(&args.out)?;
    let raw = json!({
        "date": report.date,
        "mode": if args.full { "full" } else { "quick" },
        "command": args.command,
        "machine": machine(),
        "plan": plan,
        "targets": results,
        "idle": idle,
        "goals": report.goals,
        "cross_node_cancel": {"measured": false, "why": "multi-node sluice on PostgreSQL does not exist yet"},
        "peer": {"name": args.peer_name, "skipped": args.peer_skipped},
    });
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&raw)?,
    )?;
    std::fs::write(args.out.join("report.md"), report.markdown(&raw))?;
    println!("{}", report.headline(&raw));
    println!(
        "wrote {} and {}",
        args.out.join("report.md").display(),
        args.out.join("results.json").display()
    );
    Ok(())
}

/// The date and time now, as `2026-11-28 13:30 UTC`.
fn now_utc() -> String {
    String::from_utf8(
        std::process::Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d %H:%M UTC")
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default(),
    )
    .unwrap_or_default()
    .trim()
    .to_string()
}

/// Turns the figures into goals and a markdown report.
struct Report {
    date: String,
    goals: Vec<Goal>,
    rows: Vec<[String; 5]>,
}

/// `field(a) / field(b)` at each concurrency level.
fn ratios<'a>(
    a: &'a [Level],
    b: &'a [Level],
    field: fn(&Level) -> f64,
) -> impl Iterator<Item = f64> + 'a {
    a.iter().zip(b).map(move |(x, y)| ratio(field(x), field(y)))
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    fn new(
        args: &Args,
        plan: &Plan,
        direct: Option<TargetResult>,
        sluice: Option<TargetResult>,
        bare: Option<TargetResult>,
        peer: Option<TargetResult>,
        idle: &Idle,
    ) -> Self {
        let date = now_utc();
        let (d, s, b) = (
            direct.unwrap_or_default(),
            sluice.unwrap_or_default(),
            bare.unwrap_or_default(),
        );
        let mut goals = Vec::new();
        let mut goal = |goal: &str, measured: String, met: Option<bool>| {
            goals.push(Goal {
                goal: goal.into(),
                measured,
                met,
            })
        };
        let added_ttft = s.ttft.p99_us - d.ttft.p99_us;
        goal(
            "added time-to-first-token p99 ≤ 150 µs",
            format!(
                "{added_ttft:.0} µs (p50 {:.0} µs)",
                s.ttft.p50_us - d.ttft.p50_us
            ),
            Some(added_ttft <= 150.0),
        );
        if let (Some(sc), Some(dc)) = (s.chunk_latency, d.chunk_latency) {
            let added = sc.p99_us - dc.p99_us;
            goal(
                "added per-chunk latency p99 ≤ 5 µs",
                format!("{added:.1} µs (p50 {:.1} µs)", sc.p50_us - dc.p50_us),
                Some(added <= 5.0),
            );
        }
        let worst_direct =
            ratios(&s.throughput, &d.throughput, |l| l.chunks_per_s).fold(f64::INFINITY, f64::min);
        goal(
            "streaming throughput ≥ 50% of direct (every concurrency)",
            format!("{:.0}% at worst", worst_direct * 100.0),
            Some(worst_direct >= 0.5),
        );
        match &peer {
            Some(p) => {
                let worst = ratios(&s.throughput, &p.throughput, |l| l.streams_per_s)
                    .fold(f64::INFINITY, f64::min);
                goal(
                    "throughput ≥ 50× the peer's (every concurrency)",
                    format!("{worst:.1}× at worst"),
                    Some(worst >= 50.0),
                );
            }
            None => goal(
                "throughput ≥ 50× the peer's",
                format!(
                    "not measured: {}",
                    args.peer_skipped
                        .clone()
                        .unwrap_or_else(|| "no peer given".into())
                ),
                None,
            ),
        }
        let rss = if plan.idle_streams >= 10_000 {
            idle.rss_with_streams_mb
        } else {
            idle.extrapolated_10k_mb
        };
        let how = if plan.idle_streams >= 10_000 {
            "measured".to_string()
        } else {
            format!("extrapolated from {}", idle.streams)
        };
        goal(
            "10,000 idle streams in ≤ 150 MB RSS",
            format!(
                "{rss:.0} MB ({how}; {:.1} KB per stream)",
                idle.per_stream_kb
            ),
            Some(rss <= 150.0),
        );
        goal(
            "client close → upstream close p99 ≤ 2 ms",
            format!(
                "{:.0} µs (p50 {:.0} µs)",
                s.close_to_upstream_close.p99_us, s.close_to_upstream_close.p50_us
            ),
            Some(s.close_to_upstream_close.p99_us <= 2000.0),
        );
        let worst_cost = ratios(&s.throughput, &b.throughput, |l| l.chunks_per_s)
            .map(|r| 1.0 - r)
            .fold(f64::NEG_INFINITY, f64::max);
        goal(
            "transcripts cost ≤ 10% of throughput (every concurrency)",
            format!("{:.0}% at worst", worst_cost * 100.0),
            Some(worst_cost <= 0.10),
        );
        goal(
            "cross-node cancel p99",
            "not measured: multi-node sluice on PostgreSQL does not exist yet".into(),
            None,
        );

        let mut rows = Vec::new();
        for (name, r) in [
            ("direct", Some(&d)),
            ("sluice", Some(&s)),
            ("sluice, no transcripts", Some(&b)),
            ("peer", peer.as_ref()),
        ] {
            let Some(r) = r else { continue };
            let chunk = r
                .chunk_latency
                .map(|c| format!("{:.0} / {:.0}", c.p50_us, c.p99_us))
                .unwrap_or_else(|| "n/a".into());
            let tp = r
                .throughput
                .iter()
                .map(|l| format!("{:.0}", l.chunks_per_s))
                .collect::<Vec<_>>()
                .join(" / ");
            let close = format!(
                "{:.0} / {:.0}",
                r.close_to_upstream_close.p50_us, r.close_to_upstream_close.p99_us
            );
            let close = match r.upstream_never_closed {
                0 => close,
                never => format!(
                    "{close} ({never} of {} never closed within 2 s)",
                    never + r.close_to_upstream_close.n
                ),
            };
            rows.push([
                name.to_string(),
                format!("{:.0} / {:.0}", r.ttft.p50_us, r.ttft.p99_us),
                chunk,
                close,
                tp,
            ]);
        }
        Report { date, goals, rows }
    }

    fn table(&self) -> String {
        let mut out = String::from("| target | TTFT p50 / p99 µs | per-chunk p50 / p99 µs | close → upstream close p50 / p99 µs | chunks/s at 1 / 16 / 64 / 256 |\n|---|---|---|---|---|\n");
        for r in &self.rows {
            out.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        out
    }

    fn goals_table(&self) -> String {
        let mut out = String::from("| goal | measured | |\n|---|---|---|\n");
        for g in &self.goals {
            let mark = match g.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "—",
            };
            out.push_str(&format!("| {} | {} | {mark} |\n", g.goal, g.measured));
        }
        out
    }

    fn headline(&self, raw: &Value) -> String {
        format!(
            "{}\n{}\n{}",
            raw["date"].as_str().unwrap_or(""),
            self.table(),
            self.goals_table()
        )
    }

    fn markdown(&self, raw: &Value) -> String {
        let m = &raw["machine"];
        format!(
            "# sluice benchmark ({mode} mode)\n\n\
             - date: {date}\n- machine: {cpu}, {cores} cores, {mem} GiB, Linux {os} (client, upstream and gateways share the cores)\n\
             - command: `{cmd}`\n- peer: {peer}\n\n\
             ## Figures\n\n{table}\n\
             TTFT: request sent to first chunk read, one stream at a time. Per-chunk: the upstream writing a chunk to the client reading it \
             (the peer rewrites chunks, dropping the send stamp). Close → upstream close: the client drops its connection to the upstream \
             seeing its request go away. Throughput: clients each looping over streams of {tokens} chunks, no delay between chunks.\n\n\
             ## Goals\n\n{goals}\n\
             ## Idle streams\n\n{idle} open streams (one chunk sent, then silence) on the built-in simulated model, in a fresh sluice process: RSS {before:.1} MB before, \
             {with:.1} MB with them ({per:.1} KB per stream). The simulated model holds no upstream socket, so an upstream connection's state \
             per stream is not included; this machine allows 20,000 open files per process, too few for 10,000 streams with upstream sockets \
             on both sides in the same run.\n\n\
             ## Not measured\n\n- Cross-node cancel: multi-node sluice on PostgreSQL does not exist yet.\n\n\
             Raw figures: `results.json`. Charts (when matplotlib was available): `latency.png`, `throughput.png`.\n",
            mode = raw["mode"].as_str().unwrap_or(""),
            date = self.date,
            cpu = m["cpu"].as_str().unwrap_or(""),
            cores = m["cores"],
            mem = m["memory_gib"],
            os = m["os"].as_str().unwrap_or(""),
            cmd = raw["command"].as_str().unwrap_or(""),
            peer = match raw["peer"]["skipped"].as_str() { Some(why) => format!("skipped: {why}"), None => raw["peer"]["name"].as_str().unwrap_or("").to_string() },
            table = self.table(),
            tokens = raw["plan"]["tokens_per_stream"],
            goals = self.goals_table(),
            idle = raw["idle"]["streams"],
            before = raw["idle"]["rss_before_mb"].as_f64().unwrap_or(0.0),
            with = raw["idle"]["rss_with_streams_mb"].as_f64().unwrap_or(0.0),
            per = raw["idle"]["per_stream_kb"].as_f64().unwrap_or(0.0),
        )
    }
}
