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
    /// The same three with transcripts off (`record_chunks = false`): what recording costs.
    pub bare: Option<Costs>,
    /// How long each run lasted, s.
    pub seconds: f64,
}

/// A gateway's CPU costs, µs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Costs {
    /// Per short stream.
    pub per_stream_us: f64,
    /// Per chunk of long streams.
    pub per_chunk_us: f64,
    /// Per short stream beyond its chunks.
    pub overhead_us: f64,
}

/// `t`'s CPU costs, `pid` being its process.
async fn costs(t: &Target, pid: u32, seconds: f64) -> (Level, Costs) {
    let before = cpu_seconds(pid).unwrap_or(0.0);
    let level = throughput(t, CONNECTIONS, seconds, SHORT_TOKENS).await;
    let after = cpu_seconds(pid).unwrap_or(0.0);
    let per_stream_us = (after - before) / (level.streams_per_s * seconds).max(1.0) * 1e6;
    let before = cpu_seconds(pid).unwrap_or(0.0);
    let long = throughput(t, LONG_CONNECTIONS, seconds, LONG_TOKENS).await;
    let after = cpu_seconds(pid).unwrap_or(0.0);
    let per_chunk_us = (after - before) / (long.chunks_per_s * seconds).max(1.0) * 1e6;
    let costs = Costs {
        per_stream_us,
        per_chunk_us,
        overhead_us: per_stream_us - f64::from(SHORT_TOKENS + 1) * per_chunk_us,
    };
    (level, costs)
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

/// The runs: `direct` is the upstream, `sluice` the gateway whose process is `pid`, and `bare`
/// (if given) a gateway with transcripts off and its process.
pub async fn run(
    direct: &Target,
    sluice: (&Target, u32),
    bare: Option<(&Target, u32)>,
    seconds: f64,
) -> anyhow::Result<Short> {
    let direct_level = throughput(direct, CONNECTIONS, seconds, SHORT_TOKENS).await;
    let (sluice_level, c) = costs(sluice.0, sluice.1, seconds).await;
    let bare = match bare {
        Some((t, pid)) => Some(costs(t, pid, seconds).await.1),
        None => None,
    };
    Ok(Short {
        direct: direct_level,
        sluice: sluice_level,
        cpu_per_stream_us: c.per_stream_us,
        cpu_per_chunk_us: c.per_chunk_us,
        stream_overhead_us: c.overhead_us,
        bare,
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
         | per stream beyond its chunks | {over:.1} | ≤ 100 |\n{bare}",
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
        bare = s.bare.map_or(String::new(), |b| format!(
            "\nWith transcripts off (`record_chunks = false`): {:.1} µs per stream, {:.2} µs per \
             chunk, {:.1} µs per stream beyond its chunks: recording costs {:.2} µs per chunk.\n",
            b.per_stream_us,
            b.per_chunk_us,
            b.overhead_us,
            s.cpu_per_chunk_us - b.per_chunk_us
        )),
    )
}
