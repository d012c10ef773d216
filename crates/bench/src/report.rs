//! The figures as goals and a markdown report (`report.md`), with the machine and the date.

#![allow(
    clippy::disallowed_methods,
    reason = "a benchmark client: each task it spawns is joined before its figures are printed"
)]

use serde::Serialize;
use serde_json::{json, Value};

use crate::cluster::Cluster;
use crate::measure::{Idle, Level, TargetResult};
use crate::{Args, Plan};

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Goal {
    pub(crate) goal: String,
    pub(crate) measured: String,
    pub(crate) met: Option<bool>,
}

pub(crate) fn machine() -> Value {
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

/// A report's title, then the command that made it, the date and the machine, from `raw`.
pub(crate) fn header(title: &str, raw: &serde_json::Value) -> String {
    let machine = &raw["machine"];
    format!(
        "# {title}\n\n- command: `{}`\n- date: {}\n- machine: {}, {} cores, {} GiB, Linux {}\n\n",
        raw["command"].as_str().unwrap_or(""),
        raw["date"].as_str().unwrap_or(""),
        machine["cpu"].as_str().unwrap_or(""),
        machine["cores"],
        machine["memory_gib"],
        machine["os"].as_str().unwrap_or(""),
    )
}

/// The date and time now, as `2026-11-28 13:30 UTC`.
pub(crate) fn now_utc() -> String {
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
pub(crate) struct Report {
    pub(crate) date: String,
    pub(crate) goals: Vec<Goal>,
    pub(crate) rows: Vec<[String; 5]>,
}

/// `field(a) / field(b)` at each concurrency level.
pub(crate) fn ratios<'a>(
    a: &'a [Level],
    b: &'a [Level],
    field: fn(&Level) -> f64,
) -> impl Iterator<Item = f64> + 'a {
    a.iter().zip(b).map(move |(x, y)| ratio(field(x), field(y)))
}

pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        args: &Args,
        plan: &Plan,
        direct: Option<TargetResult>,
        nginx: Option<TargetResult>,
        sluice: Option<TargetResult>,
        bare: Option<TargetResult>,
        peer: Option<TargetResult>,
        postgres: Option<TargetResult>,
        cluster: Option<&Cluster>,
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
        // What a relay hop in C adds on this machine, said next to what sluice adds.
        let floor = |added: Option<(f64, f64)>| {
            added.map_or(String::new(), |(p50, p99)| {
                format!("; nginx adds p50 {p50:.0} µs, p99 {p99:.0} µs")
            })
        };
        let added_ttft = s.ttft.p99_us - d.ttft.p99_us;
        goal(
            "added time-to-first-token p99 ≤ 150 µs",
            format!(
                "{added_ttft:.0} µs (p50 {:.0} µs{})",
                s.ttft.p50_us - d.ttft.p50_us,
                floor(
                    nginx
                        .as_ref()
                        .map(|n| (n.ttft.p50_us - d.ttft.p50_us, n.ttft.p99_us - d.ttft.p99_us))
                )
            ),
            Some(added_ttft <= 150.0),
        );
        if let (Some(sc), Some(dc)) = (s.chunk_latency, d.chunk_latency) {
            let added = sc.p99_us - dc.p99_us;
            goal(
                "added per-chunk latency p99 ≤ 5 µs",
                format!(
                    "{added:.1} µs (p50 {:.1} µs{})",
                    sc.p50_us - dc.p50_us,
                    floor(
                        nginx
                            .as_ref()
                            .and_then(|n| n.chunk_latency)
                            .map(|n| (n.p50_us - dc.p50_us, n.p99_us - dc.p99_us))
                    )
                ),
                Some(added <= 5.0),
            );
        }
        let worst_direct =
            ratios(&s.throughput, &d.throughput, |l| l.chunks_per_s).fold(f64::INFINITY, f64::min);
        let nginx_worst = nginx.as_ref().map_or(String::new(), |n| {
            let worst = ratios(&n.throughput, &d.throughput, |l| l.chunks_per_s)
                .fold(f64::INFINITY, f64::min);
            format!("; nginx {:.0}% at worst", worst * 100.0)
        });
        goal(
            "streaming throughput ≥ 50% of direct (every concurrency)",
            format!("{:.0}% at worst{nginx_worst}", worst_direct * 100.0),
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
        match cluster {
            Some(c) => goal(
                "cross-node cancel p99 ≤ 20 ms",
                format!(
                    "{:.1} ms (p50 {:.1} ms, {} never closed)",
                    c.cancel.p99_us / 1000.0,
                    c.cancel.p50_us / 1000.0,
                    c.cancel_never
                ),
                Some(c.cancel.p99_us <= 20_000.0 && c.cancel_never == 0),
            ),
            None => goal(
                "cross-node cancel p99 ≤ 20 ms",
                "not measured: no --store-url (bench/run passes one when PostgreSQL answers)"
                    .into(),
                None,
            ),
        }

        let mut rows = Vec::new();
        for (name, r) in [
            ("direct", Some(&d)),
            ("nginx (a relay hop in C)", nginx.as_ref()),
            ("sluice", Some(&s)),
            ("sluice, no transcripts", Some(&b)),
            ("peer", peer.as_ref()),
            ("sluice on PostgreSQL", postgres.as_ref()),
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

    pub(crate) fn headline(&self, raw: &Value) -> String {
        format!(
            "{}\n{}\n{}",
            raw["date"].as_str().unwrap_or(""),
            self.table(),
            self.goals_table()
        )
    }

    pub(crate) fn markdown(&self, raw: &Value) -> String {
        let m = &raw["machine"];
        format!(
            "# sluice benchmark ({mode} mode)\n\n\
             - date: {date}\n- machine: {cpu}, {cores} cores, {mem} GiB, Linux {os} (client, upstream and gateways share the cores)\n\
             - command: `{cmd}`\n- peer: {peer}\n\n\
             ## Figures\n\n{table}\n\
             TTFT: request sent to first chunk read, one stream at a time. Per-chunk: the upstream writing a chunk to the client reading it \
             (the peer rewrites chunks, dropping the send stamp). nginx (when installed): a plain reverse proxy in front of the same upstream \
             (`proxy_buffering off`, kept-alive upstream connections, one worker process), the cost of a relay hop itself on this machine: \
             what any gateway adds at least. Close → upstream close: the client drops its connection to the upstream \
             seeing its request go away. Throughput: clients each looping over streams of {tokens} chunks, no delay between chunks.\n\n\
             ## Goals\n\n{goals}\n\
             ## Idle streams\n\n{idle} open streams (one chunk sent, then silence) on the built-in simulated model, in a fresh sluice process: RSS {before:.1} MB before, \
             {with:.1} MB with them ({per:.1} KB per stream). The simulated model holds no upstream socket, so an upstream connection's state \
             per stream is not included; this machine allows 20,000 open files per process, too few for 10,000 streams with upstream sockets \
             on both sides in the same run.\n\n\
             {not_measured}\
             Raw figures: `results.json`. Charts (when matplotlib was available): `latency.png`, `throughput.png`.\n",
            not_measured = if raw["cluster"].is_null() {
                "## Not measured\n\n- Two nodes on one PostgreSQL (cross-node follow and cancel): run with `--store-url`.\n\n"
            } else {
                ""
            },
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
