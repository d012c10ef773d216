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

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

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
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("sluice_stream_buffer_depth".into()),
                        DEPTH,
                    )
                })
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
        Some(h) => h.render(),
        None => "# metrics recorder unavailable\n".to_string(),
    }
}
