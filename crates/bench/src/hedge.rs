//! Hedging against a slow tail (`--only-hedge`). Two replicas of one model (`mock-upstream`
//! servers in this process) answer at once, except one answer in ten, at random, whose first
//! token takes 500 ms. The same one-at-a-time requests go through sluice to one replica
//! (`model = "a"`) and to a `hedge` route over both (`hedge_after_ms = 50`): time to first token,
//! and how often the hedge had to start the second replica.

use std::path::Path;

use serde::Serialize;
use sluice::mock_upstream::{MockOptions, MockUpstream};
use sluice::upstream::sim::SimDefaults;

use crate::measure::{client, dist, quantile, ttft_samples, Dist, Target};
use crate::report::header;

/// One answer in this many is slow.
const SLOW_ONE_IN: u32 = 10;
/// How slow.
const SLOW_FIRST_TOKEN_MS: u64 = 500;
/// The route's hedge delay.
const HEDGE_AFTER_MS: u64 = 50;

/// What `--only-hedge` measures.
#[derive(Debug, Clone, Serialize)]
pub struct Hedge {
    /// Time to first token through sluice to one replica.
    pub one_replica: Dist,
    /// Time to first token through the hedge route over both.
    pub hedged: Dist,
    /// p95 of each (one replica, hedged), µs: steadier than the p99, which sits on the ~1% of
    /// requests that find both replicas slow (one in ten each) and so flips between runs.
    pub p95_us: (f64, f64),
    /// Requests that waited at least half a slow answer's delay (one replica, hedged): about
    /// one in ten without the hedge, one in a hundred with it.
    pub slow: (usize, usize),
    /// Requests of the hedged run that started the second replica.
    pub hedges_started: u64,
    /// Requests per run.
    pub requests: usize,
    /// One answer in this many was slow.
    pub slow_one_in: u32,
    /// A slow answer's first-token delay, ms.
    pub slow_first_token_ms: u64,
    /// The route's `hedge_after_ms`.
    pub hedge_after_ms: u64,
}

async fn replica() -> anyhow::Result<MockUpstream> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(MockUpstream::start(
        listener,
        MockOptions {
            defaults: SimDefaults::default(),
            slow_one_in: SLOW_ONE_IN,
            slow_first_token_ms: SLOW_FIRST_TOKEN_MS,
            ..MockOptions::default()
        },
    )?)
}

/// Both runs, through a fresh sluice started from `bin`.
pub async fn run(bin: &Path, requests: usize) -> anyhow::Result<Hedge> {
    let (a, b) = (replica().await?, replica().await?);
    let config = format!(
        "keep_alive_ms = 600000\n\
         [[models]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"{}\"\n\
         [[models]]\nname = \"b\"\nkind = \"openai\"\nbase_url = \"{}\"\n\
         [[routes]]\nname = \"hedged\"\nstrategy = \"hedge\"\ntargets = [\"a\", \"b\"]\nhedge_after_ms = {HEDGE_AFTER_MS}\n",
        a.base_url(),
        b.base_url()
    );
    let node = crate::start_with(bin, "hedge", &config).await?;
    let target = |id: &'static str, model: &'static str| Target {
        id,
        name: id.to_string(),
        base: node.base.clone(),
        key: None,
        model,
        client: client(),
        stamps: false,
    };
    let one_replica = ttft_samples(&target("one replica", "a"), requests).await?;
    let before = b.stats().started();
    let hedged = ttft_samples(&target("hedged", "hedged"), requests).await?;
    let slow_us = SLOW_FIRST_TOKEN_MS as f64 * 1000.0 / 2.0;
    let slow = |s: &[f64]| s.iter().filter(|&&us| us >= slow_us).count();
    let p95 = |s: &[f64]| {
        let mut s = s.to_vec();
        s.sort_by(f64::total_cmp);
        quantile(&s, 0.95)
    };
    Ok(Hedge {
        p95_us: (p95(&one_replica), p95(&hedged)),
        slow: (slow(&one_replica), slow(&hedged)),
        one_replica: dist(one_replica),
        hedged: dist(hedged),
        hedges_started: b.stats().started() - before,
        requests,
        slow_one_in: SLOW_ONE_IN,
        slow_first_token_ms: SLOW_FIRST_TOKEN_MS,
        hedge_after_ms: HEDGE_AFTER_MS,
    })
}

/// The hedge report in markdown.
pub fn markdown(raw: &serde_json::Value, h: &Hedge) -> String {
    format!(
        "{header}\
         Two replicas; one answer in {one_in}, at random, has a {slow} ms first token. {n} requests, \
         one at a time, through sluice.\n\n\
         | | p50 µs | p95 µs | p99 µs | at least {half} ms |\n|---|---|---|---|---|\n\
         | one replica (`model = \"a\"`) | {p50:.0} | {p95:.0} | {p99:.0} | {aslow} of {n} |\n\
         | hedge route over both (`hedge_after_ms = {after}`) | {hp50:.0} | {hp95:.0} | {hp99:.0} | {hslow} of {n} |\n\n\
         The hedge started the second replica for {hedges} of {n} requests. About one request in a \
         hundred finds both replicas slow, so the p99 sits on that boundary and flips between \
         runs; the p95 and the count of slow requests are the steady figures.\n",
        header = header("Hedging against a slow first token", raw),
        one_in = h.slow_one_in,
        slow = h.slow_first_token_ms,
        n = h.requests,
        p50 = h.one_replica.p50_us,
        p95 = h.p95_us.0,
        p99 = h.one_replica.p99_us,
        aslow = h.slow.0,
        half = h.slow_first_token_ms / 2,
        after = h.hedge_after_ms,
        hp50 = h.hedged.p50_us,
        hp95 = h.p95_us.1,
        hp99 = h.hedged.p99_us,
        hslow = h.slow.1,
        hedges = h.hedges_started,
    )
}
