//! `sluice-bench`: sluice against the physical limit and a peer, for the same workload, in one run.
//!
//! Targets, all in front of the same upstream (sluice's simulated model served over HTTP, in this
//! process so that "the upstream saw the close" is observed exactly and chunks carry their send
//! time on this process's clock):
//! - **direct**: the client talks to the upstream itself (the physical limit);
//! - **sluice**: a `sluice serve` process (release build) with transcripts on;
//! - **sluice, no transcripts**: the same with `record_chunks = false`;
//! - **nginx**: nginx as a plain reverse proxy in front of the upstream, if installed: the cost of
//!   one relay hop written in C, the floor for what any gateway process adds (see `nginx.rs`);
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
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde::Serialize;
use serde_json::json;
use sluice::mock_upstream::{MockOptions, MockUpstream};
use sluice::upstream::sim::SimDefaults;

mod cluster;
mod hedge;
mod measure;
mod memory;
mod nginx;
mod report;
mod short;
mod tail;

use measure::{
    chunk_latency, chunk_latency_samples, client, close_delay, close_delay_samples, dist,
    idle_streams, quantile, throughput, ttft, ttft_samples, Target, TargetResult,
};
use report::{machine, now_utc, Report};

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
    /// The model idle streams ask for: `sim` (the built-in model: the idle goal's measure) or
    /// `up` (the benchmark's HTTP upstream: each stream also holds an upstream connection).
    #[arg(long, default_value = "sim")]
    idle_model: String,
    /// Run only the throughput at this many concurrent streams: 10 s of sluice alone, printed
    /// (for profiling: attach perf to the sluice process meanwhile), then five alternating
    /// rounds of 2 s each of direct, sluice and sluice without transcripts (so that all three
    /// see the same moments of a noisy machine) and their medians, with sluice's share of direct.
    #[arg(long)]
    only_throughput: Option<usize>,
    /// Run only the time to first token, this many streams one at a time to each of direct,
    /// sluice and sluice without transcripts in turn (so that all three see the same moments of
    /// a noisy machine), and print p50 / p99 and what sluice adds; then the same for the
    /// per-chunk latency (as many chunks, a millisecond apart, in streams of 100).
    #[arg(long)]
    only_ttft: Option<usize>,
    /// Run only the close → upstream close delay, this many closes for each of direct, sluice
    /// and sluice without transcripts, in alternating rounds of ten, and print p50 / p99 and
    /// what sluice adds.
    #[arg(long)]
    only_close: Option<usize>,
    /// Run only the memory scenarios (transcript read, dripped bodies, a spike, a soak) in a
    /// fresh sluice and write `memory.md` and `memory.json` to `--out`.
    #[arg(long)]
    only_memory: bool,
    /// Run only the two-node measurements (cross-node follow delay and cancel) on the
    /// PostgreSQL at `--store-url`, and write `cluster.md` and `cluster.json` to `--out`.
    #[arg(long, requires = "store_url")]
    only_cluster: bool,
    /// Run only the per-stream and per-chunk costs (short streams at 64 connections, CPU per
    /// stream and per chunk), and write `short.md` and `short.json` to `--out`.
    #[arg(long)]
    only_short: bool,
    /// Run only the hedging measurement (two replicas with a slow tail, one directly and both
    /// behind a hedge route), and write `hedge.md` and `hedge.json` to `--out`.
    #[arg(long)]
    only_hedge: bool,
    /// Run only the tail-latency measurement (per-chunk delay at 256 streams, quiet and with
    /// another process loading a core), and write `tail.md` and `tail.json` to `--out`.
    #[arg(long)]
    only_tail: bool,
    /// A PostgreSQL (best a fresh schema:
    /// `postgres://postgres@127.0.0.1:5432/test?options=-csearch_path%3Dbench`): adds the target
    /// "sluice on PostgreSQL" and the two-node figures (cross-node follow and cancel).
    #[arg(long)]
    store_url: Option<String>,
    /// How long the memory soak runs, in seconds.
    #[arg(long, default_value_t = 120)]
    soak_seconds: u64,
    /// The command line to print in the report.
    #[arg(long, default_value = "bash bench/run")]
    command: String,
    /// The nginx binary for the target "nginx (a relay hop in C)"; measured only if it exists.
    #[arg(long, default_value = nginx::DEFAULT_BIN)]
    nginx_bin: PathBuf,
    /// Leave the nginx target out.
    #[arg(long)]
    no_nginx: bool,
    /// The HTTP version sluice speaks to the benchmark's upstream (its model's `http_version`:
    /// `auto`, which is HTTP/1.1 over plain TCP, `1.1`, or `2`, h2c).
    #[arg(long, default_value = "auto")]
    upstream_http: String,
}

/// The `http_version` of every sluice's model `up` ([`Args::upstream_http`]), set once at start.
static UPSTREAM_HTTP: std::sync::OnceLock<String> = std::sync::OnceLock::new();

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

pub(crate) struct Sluice {
    pub(crate) child: tokio::process::Child,
    pub(crate) base: String,
    /// The node's data directory and config, removed when the node is dropped (after its
    /// process is killed: fields drop in order).
    _dir: tempfile::TempDir,
}

async fn start_sluice(
    bin: &Path,
    upstream: &str,
    record_chunks: bool,
    tag: &str,
) -> anyhow::Result<Sluice> {
    start_node(bin, upstream, record_chunks, tag, None).await
}

/// Writes `NAME.json` (the figures with the date, command and machine) and `NAME.md` (what
/// `markdown` makes of them) to `--out`, and prints the markdown.
fn write_report<T: Serialize>(
    args: &Args,
    name: &str,
    figures: &T,
    markdown: fn(&serde_json::Value, &T) -> String,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let raw = json!({
        "date": now_utc(),
        "command": args.command,
        "machine": machine(),
        name: figures,
    });
    std::fs::write(
        args.out.join(format!("{name}.json")),
        serde_json::to_string_pretty(&raw)?,
    )?;
    let md = markdown(&raw, figures);
    std::fs::write(args.out.join(format!("{name}.md")), &md)?;
    println!("{md}");
    Ok(())
}

/// Prints each target's p50 / p99 of `samples` (µs) and what it adds to the first's (direct).
fn print_added(targets: &[Target], samples: Vec<Vec<f64>>, what: &str, unit: &str) {
    let dists: Vec<_> = samples.into_iter().map(dist).collect();
    for (t, d) in targets.iter().zip(&dists) {
        println!(
            "{}: {what} p50 {:.0} µs, p99 {:.0} µs ({} {unit}); added p50 {:.0} µs, p99 {:.0} µs",
            t.name,
            d.p50_us,
            d.p99_us,
            d.n,
            d.p50_us - dists[0].p50_us,
            d.p99_us - dists[0].p99_us
        );
    }
}

/// The upstream itself, as a target: the physical limit.
fn direct(mock: &MockUpstream) -> Target {
    Target {
        id: "direct",
        name: "direct (upstream itself)".into(),
        base: mock.base_url(),
        key: None,
        model: "sim",
        client: client(),
        stamps: true,
    }
}

/// `start_sluice`, on the PostgreSQL at `store_url` if given.
async fn start_node(
    bin: &Path,
    upstream: &str,
    record_chunks: bool,
    tag: &str,
    store_url: Option<&str>,
) -> anyhow::Result<Sluice> {
    let store = store_url.map_or(String::new(), |url| format!("[store]\nurl = \"{url}\"\n"));
    // Said only when not the default, so that builds before `http_version` can be measured.
    let http = match UPSTREAM_HTTP.get().map(String::as_str) {
        None | Some("auto") => String::new(),
        Some(version) => format!("http_version = \"{version}\"\n"),
    };
    start_with(
        bin,
        tag,
        &format!("record_chunks = {record_chunks}\nkeep_alive_ms = 600000\n{store}[[models]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{upstream}\"\n{http}"),
    )
    .await
}

/// Starts `sluice serve` with the config file `config_text`, in a fresh data directory.
pub(crate) async fn start_with(bin: &Path, tag: &str, config_text: &str) -> anyhow::Result<Sluice> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dir = tempfile::Builder::new()
        .prefix(&format!("sluice-bench-{tag}-"))
        .tempdir()?;
    let config = dir.path().join("sluice.toml");
    std::fs::write(&config, config_text)?;
    let child = tokio::process::Command::new(bin)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = UPSTREAM_HTTP.set(args.upstream_http.clone());
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
            ..MockOptions::default()
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
    // The same gateway with transcripts off.
    let bare_target = Target {
        id: "sluice_no_transcripts",
        name: "sluice, record_chunks = false".into(),
        base: bare.base.clone(),
        ..sluice_target.clone()
    };
    // nginx in front of the same upstream, when installed: the floor of a relay hop.
    let measures_nginx = !(args.only_close.is_some()
        || args.only_memory
        || args.only_cluster
        || args.only_short
        || args.only_tail
        || args.only_hedge
        || args.only_idle);
    let nginx = if args.no_nginx || !measures_nginx || !args.nginx_bin.exists() {
        None
    } else {
        Some(nginx::Nginx::start(&args.nginx_bin, &mock.base_url()).await?)
    };
    let with_nginx = |mut targets: Vec<Target>| {
        if let Some(n) = &nginx {
            targets.insert(1, n.target());
        }
        targets
    };
    if let Some(concurrency) = args.only_throughput {
        eprintln!("sluice pid {sluice_pid}");
        let level = throughput(&sluice_target, concurrency, 10.0, plan.tokens_per_stream).await;
        println!("{}", serde_json::to_string_pretty(&level)?);
        let targets = with_nginx(vec![direct(&mock), sluice_target.clone(), bare_target]);
        let mut rounds = vec![Vec::new(); targets.len()];
        for _ in 0..5 {
            for (t, r) in targets.iter().zip(&mut rounds) {
                let level = throughput(t, concurrency, 2.0, plan.tokens_per_stream).await;
                r.push(level.chunks_per_s);
            }
        }
        let medians: Vec<f64> = rounds
            .iter_mut()
            .map(|r| {
                r.sort_by(f64::total_cmp);
                quantile(r, 0.5)
            })
            .collect();
        for (t, m) in targets.iter().zip(&medians) {
            println!(
                "{}: {:.0} chunks/s at {} streams (median of 5 rounds of 2 s), {:.0}% of direct",
                t.name,
                m,
                concurrency,
                100.0 * m / medians[0]
            );
        }
        return Ok(());
    }
    if let Some(n) = args.only_ttft {
        let targets = with_nginx(vec![direct(&mock), sluice_target.clone(), bare_target]);
        for t in &targets {
            ttft(t, 10)
                .await
                .with_context(|| format!("{}: warm-up", t.name))?;
        }
        // In rounds of ten per target, so that no target gets a quiet or a busy minute alone.
        let mut samples = vec![Vec::with_capacity(n); targets.len()];
        for _ in 0..n.div_ceil(10) {
            for (t, s) in targets.iter().zip(&mut samples) {
                s.extend(ttft_samples(t, 10).await?);
            }
        }
        print_added(&targets, samples, "TTFT", "streams");
        let mut samples = vec![Vec::with_capacity(n); targets.len()];
        for _ in 0..n.div_ceil(200) {
            for (t, s) in targets.iter().zip(&mut samples) {
                s.extend(chunk_latency_samples(t, 2, 100).await?);
            }
        }
        print_added(&targets, samples, "per-chunk", "chunks");
        return Ok(());
    }
    if let Some(n) = args.only_close {
        let targets = [direct(&mock), sluice_target.clone(), bare_target];
        let mut samples = vec![Vec::with_capacity(n); targets.len()];
        let mut never = vec![0; targets.len()];
        for _ in 0..n.div_ceil(10) {
            for ((t, s), missed) in targets.iter().zip(&mut samples).zip(&mut never) {
                let (round, not_seen) = close_delay_samples(t, &mock, 10).await?;
                s.extend(round);
                *missed += not_seen;
            }
        }
        print_added(&targets, samples, "close → upstream close", "closes");
        for (t, missed) in targets.iter().zip(never) {
            if missed > 0 {
                println!(
                    "{}: {missed} closes the upstream did not see within 2 s",
                    t.name
                );
            }
        }
        return Ok(());
    }
    if args.only_memory {
        drop((sluice, bare));
        let fresh = start_sluice(&sluice_bin, &mock.base_url(), true, "memory").await?;
        let pid = fresh.child.id().context("sluice pid")?;
        let m = memory::run(&fresh.base, pid, args.soak_seconds).await?;
        return write_report(&args, "memory", &m, memory::markdown);
    }
    if let (true, Some(url)) = (args.only_cluster, args.store_url.as_deref()) {
        drop((sluice, bare));
        let a = start_node(&sluice_bin, &mock.base_url(), true, "node-a", Some(url)).await?;
        let b = start_node(&sluice_bin, &mock.base_url(), true, "node-b", Some(url)).await?;
        let c = cluster::run(&a.base, &b.base, &mock, 200).await?;
        return write_report(&args, "cluster", &c, cluster::markdown);
    }
    if args.only_short {
        let seconds = if args.full { 20.0 } else { 10.0 };
        let bare_pid = bare.child.id().context("sluice pid")?;
        let s = short::run(
            &direct(&mock),
            (&sluice_target, sluice_pid),
            Some((&bare_target, bare_pid)),
            seconds,
        )
        .await?;
        return write_report(&args, "short", &s, short::markdown);
    }
    if args.only_tail {
        let t = tail::run(&direct(&mock), &sluice_target, &bare_target).await?;
        return write_report(&args, "tail", &t, tail::markdown);
    }
    if args.only_hedge {
        drop((sluice, bare));
        let h = hedge::run(&sluice_bin, plan.ttft_requests.max(500)).await?;
        return write_report(&args, "hedge", &h, hedge::markdown);
    }
    if args.only_idle {
        let idle = idle_streams(
            &sluice.base,
            sluice_pid,
            plan.idle_streams,
            &args.idle_model,
        )
        .await?;
        println!("{}", serde_json::to_string_pretty(&idle)?);
        return Ok(());
    }

    let mut targets = with_nginx(vec![direct(&mock), sluice_target.clone(), bare_target]);
    // The same gateway on PostgreSQL, when there is one: a second node for the cross-node
    // figures is started after the targets are measured.
    let postgres = match args.store_url.as_deref() {
        Some(url) => {
            Some(start_node(&sluice_bin, &mock.base_url(), true, "postgres", Some(url)).await?)
        }
        None => None,
    };
    if let Some(node) = &postgres {
        targets.push(Target {
            id: "sluice_postgres",
            name: "sluice on PostgreSQL".into(),
            base: node.base.clone(),
            key: None,
            model: "up",
            client: client(),
            stamps: true,
        });
    }
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
    let cluster = match (&postgres, args.store_url.as_deref()) {
        (Some(a), Some(url)) => {
            bar.set_message("two nodes on PostgreSQL: cross-node follow and cancel");
            let b =
                start_node(&sluice_bin, &mock.base_url(), true, "postgres-b", Some(url)).await?;
            Some(cluster::run(&a.base, &b.base, &mock, plan.close_samples).await?)
        }
        _ => None,
    };
    drop(postgres);
    bar.set_message(format!(
        "sluice: RSS with {} idle streams",
        plan.idle_streams
    ));
    // A fresh process: memory the allocator kept from the throughput runs is not the idle cost.
    drop((sluice, bare));
    let fresh = start_sluice(&sluice_bin, &mock.base_url(), true, "idle").await?;
    let fresh_pid = fresh.child.id().context("sluice pid")?;
    let idle = idle_streams(&fresh.base, fresh_pid, plan.idle_streams, "sim").await?;
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
        get("nginx"),
        get("sluice"),
        get("sluice_no_transcripts"),
        get("peer"),
        get("sluice_postgres"),
        cluster.as_ref(),
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
        "cluster": cluster,
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
