//! Tail latency under load (`--only-tail`): the per-chunk delay (the upstream stamping a chunk
//! as it writes it, to the client reading it) with 256 streams at once, each sending a chunk
//! every 20 ms (50 tokens/s, a fast model's pace), directly, through sluice, and through sluice
//! with transcripts off; then directly and through sluice while another process keeps one core
//! busy. What sluice adds is the difference at each percentile.

use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;
use serde_json::json;

use crate::measure::{delay_us, quantile, stream, Target};
use crate::report::header;

/// Streams at once.
pub const STREAMS: usize = 256;
/// Chunks per stream.
const TOKENS: u32 = 200;
/// Between two chunks of one stream, ms.
const INTERVAL_MS: u64 = 20;

/// Percentiles of one run, µs.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Tail {
    /// Chunks measured.
    pub n: usize,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// The largest.
    pub max_us: f64,
}

fn tail(mut us: Vec<f64>) -> Tail {
    us.sort_by(f64::total_cmp);
    Tail {
        n: us.len(),
        p50_us: quantile(&us, 0.5),
        p99_us: quantile(&us, 0.99),
        p999_us: quantile(&us, 0.999),
        max_us: quantile(&us, 1.0),
    }
}

/// What `--only-tail` measures.
#[derive(Debug, Clone, Serialize)]
pub struct TailRuns {
    /// Straight from the upstream, quiet machine.
    pub direct: Tail,
    /// Through sluice, quiet machine.
    pub sluice: Tail,
    /// Through sluice with transcripts off (`record_chunks = false`), quiet machine.
    pub bare: Tail,
    /// Straight from the upstream, one core kept busy by another process.
    pub direct_loaded: Tail,
    /// Through sluice, one core kept busy by another process.
    pub sluice_loaded: Tail,
    /// Streams that failed (any run).
    pub failed: usize,
}

/// The per-chunk delays of `STREAMS` streams at once through `t`.
async fn run_one(t: &Target) -> (Tail, usize) {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let (t, samples) = (t.clone(), samples.clone());
        tasks.push(tokio::spawn(async move {
            // Spread the starts over one interval so the streams do not tick in step.
            tokio::time::sleep(std::time::Duration::from_micros(
                (i as u64 * INTERVAL_MS * 1000) / STREAMS as u64,
            ))
            .await;
            let mut mine = Vec::with_capacity(TOKENS as usize);
            let sim =
                json!({"tokens": TOKENS, "first_token_ms": 0, "token_interval_ms": INTERVAL_MS});
            let ok = stream(&t, sim, |data| mine.extend(delay_us(data)))
                .await
                .is_ok();
            samples
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(mine);
            ok
        }));
    }
    let mut failed = 0;
    for task in tasks {
        if !task.await.unwrap_or(false) {
            failed += 1;
        }
    }
    let all = std::mem::take(&mut *samples.lock().unwrap_or_else(PoisonError::into_inner));
    (tail(all), failed)
}

/// A process that keeps one core busy until dropped.
struct Hog(std::process::Child);

impl Hog {
    fn start() -> anyhow::Result<Self> {
        Ok(Self(
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()?,
        ))
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The four runs.
pub async fn run(direct: &Target, sluice: &Target, bare: &Target) -> anyhow::Result<TailRuns> {
    let (d, f1) = run_one(direct).await;
    let (s, f2) = run_one(sluice).await;
    let (b, f0) = run_one(bare).await;
    let hog = Hog::start()?;
    let (dl, f3) = run_one(direct).await;
    let (sl, f4) = run_one(sluice).await;
    drop(hog);
    Ok(TailRuns {
        direct: d,
        sluice: s,
        bare: b,
        direct_loaded: dl,
        sluice_loaded: sl,
        failed: f0 + f1 + f2 + f3 + f4,
    })
}

/// The report in markdown.
pub fn markdown(raw: &serde_json::Value, r: &TailRuns) -> String {
    let row = |name: &str, t: &Tail| {
        format!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {} |\n",
            t.p50_us, t.p99_us, t.p999_us, t.max_us, t.n
        )
    };
    let added = |name: &str, s: &Tail, d: &Tail| {
        format!(
            "| {name} | {:.0} | {:.0} | {:.0} | | |\n",
            s.p50_us - d.p50_us,
            s.p99_us - d.p99_us,
            s.p999_us - d.p999_us
        )
    };
    format!(
        "{header}\
         {STREAMS} streams at once, each a chunk every {INTERVAL_MS} ms ({TOKENS} chunks), about \
         {rate} chunks/s in all; per-chunk delay from the upstream stamping a chunk to the client \
         reading it, µs. Loaded: another process (`sh -c 'while :; do :; done'`) keeps one of \
         the cores busy. Failed streams: {failed}.\n\n\
         | | p50 | p99 | p99.9 | max | chunks |\n|---|---|---|---|---|---|\n\
         {d}{s}{a}{b}{dl}{sl}{al}",
        header = header("Tail latency under load", raw),
        rate = STREAMS as u64 * 1000 / INTERVAL_MS,
        failed = r.failed,
        d = row("direct", &r.direct),
        s = row("sluice", &r.sluice),
        a = added("**added by sluice**", &r.sluice, &r.direct),
        b = row("sluice, transcripts off", &r.bare),
        dl = row("direct, loaded", &r.direct_loaded),
        sl = row("sluice, loaded", &r.sluice_loaded),
        al = added(
            "**added by sluice, loaded**",
            &r.sluice_loaded,
            &r.direct_loaded
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_over_the_sorted_sample() {
        let t = tail((1..=1000).rev().map(f64::from).collect());
        assert_eq!(t.n, 1000);
        assert_eq!(
            (t.p50_us, t.p99_us, t.p999_us, t.max_us),
            (501.0, 990.0, 999.0, 1000.0)
        );
        let empty = tail(Vec::new());
        assert_eq!((empty.n, empty.p99_us), (0, 0.0));
    }
}
