//! Prometheus metrics: one process-wide recorder, rendered at `GET /metrics`.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `sluice_requests_total` | counter | `model`, `stream` |
//! | `sluice_active_streams` | gauge | |
//! | `sluice_chunks_relayed_total` | counter | |
//! | `sluice_streams_finished_total` | counter | `status`, `reason` |
//! | `sluice_timeouts_total` | counter | `kind` (first_token, idle, total) |
//! | `sluice_cancellations_total` | counter | `cause` |
//! | `sluice_upstream_errors_total` | counter | `reason` |
//! | `sluice_upstream_connections_opened_total` | counter | `version` (`1.1`, `2`: connections to upstreams opened; an HTTP/2 one carries up to 100 streams) |
//! | `sluice_resume_refills_total` | counter | (a resumer fell behind the live feed and refilled from the store) |
//! | `sluice_stream_buffer_depth` | histogram | (chunks queued for the client, sampled per chunk) |
//! | `sluice_time_to_first_token_seconds` | histogram | |
//! | `sluice_inter_chunk_seconds` | histogram | |
//! | `sluice_store_write_seconds` | histogram | (one observation per committed batch) |
//! | `sluice_store_write_errors_total` | counter | (writes in batches that failed: chunks or statuses not stored) |
//! | `sluice_store_wal_frames` | gauge | (SQLite WAL size in 4 KB pages after each checkpoint) |
//! | `sluice_gateway_overhead_seconds` | histogram | (total time minus time waiting on the upstream and the client) |
//! | `sluice_store_unwritten_endings` | gauge | (PostgreSQL: final statuses kept until the database answers again) |
//! | `sluice_route_attempts_total` | counter | `route`, `target`, `outcome` (completed, failed, timed_out, lost, skipped, cancelled) |
//! | `sluice_route_breaker_open` | gauge | `target` (1 while its circuit breaker skips it) |
//!
//! Labels never carry request content, keys or stream ids.
//!
//! Histogram samples wait in the recorder until they are folded into buckets; a thread folds
//! them every [`UPKEEP_INTERVAL`] so memory stays flat when nobody scrapes `/metrics` (without
//! it, every chunk relayed kept a few samples for good: the soak in docs/benchmarks/memory.md).
//!
//! The three per-chunk metrics (`sluice_inter_chunk_seconds`, `sluice_stream_buffer_depth`,
//! `sluice_chunks_relayed_total`) are not recorded through the recorder: each relay keeps its
//! last few chunks' samples in place ([`ChunkStats`]) and adds them to the process's totals
//! under one lock every [`CHUNK_STATS_EVERY`] chunks and when the stream ends: through the recorder each chunk cost
//! two timestamped samples pushed onto lists all relays share and a shared counter, about 5% of
//! the gateway's CPU per chunk (`perf`, docs/benchmarks/README.md). `/metrics` renders them
//! in the same format, so a stream's latest chunks show there at its end or within
//! [`CHUNK_STATS_EVERY`] chunks.

use std::fmt::Write as _;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often pending histogram samples are folded into their buckets.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

const SECONDS: &[f64] = &[
    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
];
const DEPTH: &[f64] = &[0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// The process's metrics handle, installing the recorder on first use. `None` if another
/// recorder was installed first (metrics then go there, and `/metrics` says so).
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(SECONDS)
                .and_then(|b| b.install_recorder())
                .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
                .ok()
                .inspect(|h| start_upkeep(h.clone()))
        })
        .as_ref()
}

/// Folds pending histogram samples every [`UPKEEP_INTERVAL`], for the life of the process (as
/// long as the recorder it serves).
fn start_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("sluice-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            handle.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "metrics upkeep not started: histogram samples pile up until /metrics is read");
    }
}

/// The metrics in Prometheus' text format.
pub fn render() -> String {
    match handle() {
        Some(h) => {
            let mut out = h.render();
            render_chunk_stats(&mut out);
            out
        }
        None => "# metrics recorder unavailable\n".to_string(),
    }
}

/// How many chunks' samples a relay keeps ([`ChunkStats`]) before adding them to the totals.
pub const CHUNK_STATS_EVERY: u32 = 8;

/// Buckets of one histogram: a count per upper bound (and one past the last), and the sum.
#[derive(Debug, Clone)]
struct Buckets<const N: usize> {
    counts: [u64; N],
    sum: f64,
}

impl<const N: usize> Buckets<N> {
    const EMPTY: Self = Self {
        counts: [0; N],
        sum: 0.0,
    };

    /// Counts `value` in the first bucket whose bound is at least it (Prometheus' `le`).
    fn record(&mut self, bounds: &[f64], value: f64) {
        let i = bounds.partition_point(|&b| b < value).min(N - 1);
        self.counts[i] += 1;
        self.sum += value;
    }

    /// Appends the histogram in Prometheus' text format.
    fn render(&self, name: &str, bounds: &[f64], out: &mut String) {
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut total = 0;
        for (bound, count) in bounds.iter().zip(&self.counts) {
            total += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {total}");
        }
        total += self.counts[N - 1];
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {total}");
    }
}

/// One bucket per bound of [`SECONDS`] and one past them.
const GAP_BUCKETS: usize = SECONDS.len() + 1;
/// One bucket per bound of [`DEPTH`] and one past them.
const DEPTH_BUCKETS: usize = DEPTH.len() + 1;

/// The per-chunk metrics, counted.
#[derive(Debug, Clone)]
struct ChunkTotals {
    gaps: Buckets<GAP_BUCKETS>,
    depth: Buckets<DEPTH_BUCKETS>,
    relayed: u64,
}

impl ChunkTotals {
    const EMPTY: Self = Self {
        gaps: Buckets::EMPTY,
        depth: Buckets::EMPTY,
        relayed: 0,
    };
}

/// The process's per-chunk totals, which relays add to now and then.
static CHUNK_TOTALS: Mutex<ChunkTotals> = Mutex::new(ChunkTotals::EMPTY);

fn render_chunk_stats(out: &mut String) {
    let totals = CHUNK_TOTALS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let _ = writeln!(out, "# TYPE sluice_chunks_relayed_total counter");
    let _ = writeln!(out, "sluice_chunks_relayed_total {}", totals.relayed);
    totals
        .gaps
        .render("sluice_inter_chunk_seconds", SECONDS, out);
    totals
        .depth
        .render("sluice_stream_buffer_depth", DEPTH, out);
}

/// One relay's per-chunk metrics: its last few chunks' samples, kept in place and added to the
/// process's totals every [`CHUNK_STATS_EVERY`] chunks and when dropped (see the module docs).
/// Inline and small (the relay's task carries it for the stream's life, idle or not), so an
/// idle stream holds at most a few samples and nothing on the heap.
#[derive(Debug, Default)]
pub struct ChunkStats {
    samples: [Sample; CHUNK_STATS_EVERY as usize],
    /// How many of `samples` are complete; the one at this index may have its gap already.
    len: u8,
}

/// One chunk's samples.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// The gap since the chunk before, in seconds (`NaN`: none, the first chunk).
    gap: f32,
    /// Chunks queued for the client when it was (`u16::MAX`: none queued it).
    depth: u16,
}

impl Default for Sample {
    fn default() -> Self {
        Self {
            gap: f32::NAN,
            depth: u16::MAX,
        }
    }
}

impl ChunkStats {
    /// Counts the gap between the chunk about to be counted and the one before.
    pub fn gap(&mut self, gap: Duration) {
        if let Some(s) = self.samples.get_mut(usize::from(self.len)) {
            s.gap = gap.as_secs_f32();
        }
    }

    /// Counts one chunk relayed, and how many chunks were queued for the client when it was
    /// (`None`: nobody on the original connection to queue it for).
    pub fn relayed(&mut self, depth: Option<usize>) {
        self.relayed_into(depth, &CHUNK_TOTALS);
    }

    fn relayed_into(&mut self, depth: Option<usize>, totals: &Mutex<ChunkTotals>) {
        if let Some(s) = self.samples.get_mut(usize::from(self.len)) {
            s.depth = depth.map_or(u16::MAX, |d| u16::try_from(d).unwrap_or(u16::MAX - 1));
            self.len += 1;
        }
        if usize::from(self.len) >= self.samples.len() {
            self.flush_into(totals);
        }
    }

    /// Adds the complete samples to `totals` and starts again.
    fn flush_into(&mut self, totals: &Mutex<ChunkTotals>) {
        let n = usize::from(self.len);
        if n == 0 {
            return;
        }
        let mut totals = totals.lock().unwrap_or_else(PoisonError::into_inner);
        for s in &self.samples[..n] {
            if !s.gap.is_nan() {
                totals.gaps.record(SECONDS, f64::from(s.gap));
            }
            if s.depth != u16::MAX {
                totals.depth.record(DEPTH, f64::from(s.depth));
            }
            totals.relayed += 1;
        }
        drop(totals);
        self.samples = Default::default();
        self.len = 0;
    }
}

impl Drop for ChunkStats {
    fn drop(&mut self) {
        self.flush_into(&CHUNK_TOTALS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_count_up_to_and_including_their_bound_and_render_cumulatively() {
        let bounds = [1.0, 2.0];
        let mut b = Buckets::<3>::EMPTY;
        for v in [0.5, 1.0, 1.5, 2.0, 7.0] {
            b.record(&bounds, v);
        }
        assert_eq!(b.counts, [2, 2, 1]);
        let mut out = String::new();
        b.render("x", &bounds, &mut out);
        assert_eq!(
            out,
            "# TYPE x histogram\nx_bucket{le=\"1\"} 2\nx_bucket{le=\"2\"} 4\n\
             x_bucket{le=\"+Inf\"} 5\nx_sum 12\nx_count 5\n"
        );
        // Small bounds are written out in full, as Prometheus reads them.
        let mut out = String::new();
        Buckets::<2>::EMPTY.render("y", &[0.000_01], &mut out);
        assert!(out.contains("y_bucket{le=\"0.00001\"} 0"), "{out}");
    }

    #[test]
    fn a_relay_adds_its_counts_every_so_many_chunks_and_when_it_ends() {
        let totals = Mutex::new(ChunkTotals::EMPTY);
        let read = || totals.lock().expect("lock").clone();
        let mut stats = ChunkStats::default();
        // Carried by every relay's task, idle ones included: a few samples, in place.
        assert!(std::mem::size_of::<ChunkStats>() <= 72);
        for i in 0..CHUNK_STATS_EVERY + 3 {
            if i > 0 {
                stats.gap(Duration::from_millis(2));
            }
            stats.relayed_into((i % 2 == 0).then_some(1), &totals);
        }
        let t = read();
        assert_eq!(t.relayed, u64::from(CHUNK_STATS_EVERY));
        stats.flush_into(&totals);
        let t = read();
        assert_eq!(t.relayed, u64::from(CHUNK_STATS_EVERY) + 3);
        assert_eq!(
            t.gaps.counts.iter().sum::<u64>(),
            u64::from(CHUNK_STATS_EVERY) + 2
        );
        // 2 ms falls in the 5 ms bucket; depth 1 in the `le="1"` one, once every other chunk.
        let five_ms = SECONDS.iter().position(|&b| b == 0.005).expect("bound");
        assert_eq!(t.gaps.counts[five_ms], u64::from(CHUNK_STATS_EVERY) + 2);
        assert_eq!(
            t.depth.counts[1],
            (u64::from(CHUNK_STATS_EVERY) + 3).div_ceil(2)
        );
        // Nothing twice.
        stats.flush_into(&totals);
        assert_eq!(read().relayed, u64::from(CHUNK_STATS_EVERY) + 3);
    }
}
