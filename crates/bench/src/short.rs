//! Per-stream and per-chunk costs (`--only-short`): short streams (20 chunks each) at 64
//! connections, directly from the upstream and through sluice, as streams per second; and the
//! gateway's own CPU time (from `/proc/PID/stat`, steadier than throughput on a shared machine)
//! per stream and per chunk. CPU per chunk comes from long streams (2,000 chunks each), where
//! per-stream costs vanish; the per-stream overhead is CPU per 20-chunk stream minus 20 chunks'
//! worth.

use serde::Serialize;

use crate::measure::{throughput, Level, Target};
use crate::report::header;

/// Chunks per short stream.
pub const SHORT_TOKENS: u32 = 20;
/// Connections of the short-stream workload.
pub const CONNECTIONS: usize = 64;
const LONG_TOKENS: u32 = 2000;
const LONG_CONNECTIONS: usize = 16;

/// What `--only-short` measures.
#[derive(Debug, Clone, Serialize)]
pub struct Short {
    /// Short streams straight from the upstream.
    pub direct: Level,
    /// Short streams through sluice.
    pub sluice: Level,
    /// sluice's CPU per short stream, µs.
    pub cpu_per_stream_us: f64,
    /// sluice's CPU per chunk of long streams, µs.
    pub cpu_per_chunk_us: f64,
    /// CPU per short stream beyond its chunks, µs.
    pub stream_overhead_us: f64,
    /// How long each run lasted, s.
    pub seconds: f64,
}

/// The CPU time (user + system) process `pid` has used, in seconds (`USER_HZ` is 100 on Linux).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields we want come after its closing parenthesis.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')' field 3 (state) is index 0, so utime (14) is index 11 and stime (15) index 12.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Both runs: `direct` is the upstream, `sluice` the gateway whose process is `pid`.
pub async fn run(
    direct: &Target,
    sluice: &Target,
    pid: u32,
    seconds: f64,
) -> anyhow::Result<Short> {
    let direct_level = throughput(direct, CONNECTIONS, seconds, SHORT_TOKENS).await;
    let before = cpu_seconds(pid).unwrap_or(0.0);
    let sluice_level = throughput(sluice, CONNECTIONS, seconds, SHORT_TOKENS).await;
    let after = cpu_seconds(pid).unwrap_or(0.0);
    let streams = sluice_level.streams_per_s * seconds;
    let cpu_per_stream_us = (after - before) / streams.max(1.0) * 1e6;
    let before = cpu_seconds(pid).unwrap_or(0.0);
    let long = throughput(sluice, LONG_CONNECTIONS, seconds, LONG_TOKENS).await;
    let after = cpu_seconds(pid).unwrap_or(0.0);
    let cpu_per_chunk_us = (after - before) / (long.chunks_per_s * seconds).max(1.0) * 1e6;
    Ok(Short {
        direct: direct_level,
        sluice: sluice_level,
        cpu_per_stream_us,
        cpu_per_chunk_us,
        stream_overhead_us: cpu_per_stream_us - f64::from(SHORT_TOKENS + 1) * cpu_per_chunk_us,
        seconds,
    })
}

/// The report in markdown.
pub fn markdown(raw: &serde_json::Value, s: &Short) -> String {
    format!(
        "{header}\
         Short streams ({tokens} chunks each) at {conns} connections for {secs:.0} s; CPU is the sluice \
         process's own user + system time over the run.\n\n\
         | | streams/s | chunks/s | failed |\n|---|---|---|---|\n\
         | direct (the upstream itself) | {ds:.0} | {dc:.0} | {df} |\n\
         | sluice | {ss:.0} | {sc:.0} | {sf} |\n\n\
         sluice streams/s: {ratio:.2}× direct's.\n\n\
         | sluice CPU | µs | goal |\n|---|---|---|\n\
         | per {tokens}-chunk stream | {cps:.1} | |\n\
         | per chunk (long streams) | {cpc:.2} | ≤ 3 |\n\
         | per stream beyond its chunks | {over:.1} | ≤ 100 |\n",
        header = header("Per-stream and per-chunk costs", raw),
        tokens = SHORT_TOKENS,
        conns = CONNECTIONS,
        secs = s.seconds,
        ds = s.direct.streams_per_s,
        dc = s.direct.chunks_per_s,
        df = s.direct.failed,
        ss = s.sluice.streams_per_s,
        sc = s.sluice.chunks_per_s,
        sf = s.sluice.failed,
        ratio = s.sluice.streams_per_s / s.direct.streams_per_s.max(1.0),
        cps = s.cpu_per_stream_us,
        cpc = s.cpu_per_chunk_us,
        over = s.stream_overhead_us,
    )
}
