//! The lesson's exercise: two `slow_fetch` calls gathered under one 1 s deadline, first with
//! delays 0.5 and 0.5 (both finish), then 0.5 and 2 (the deadline fires). It says which input
//! timed out, and each fetch's cleanup line shows that the timed-out one was cleaned up, before
//! the gather returned.
//!
//! ```text
//! cargo run -p sluice-flow --example exercise
//! ```

use std::convert::Infallible;
use std::time::Duration;

use sluice_flow::{Deadline, Gather, TaskOutcome};

/// Prints when the fetch is cleaned up, and whether it had finished.
struct Cleanup {
    name: &'static str,
    finished: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let how = if self.finished {
            "finished"
        } else {
            "cancelled"
        };
        println!("  cleanup: slow_fetch({}) {how}", self.name);
    }
}

/// `async def slow_fetch(name, delay)`: sleep `delay`, return `f"{name}-done"`.
async fn slow_fetch(name: &'static str, delay: Duration) -> Result<String, Infallible> {
    let mut cleanup = Cleanup {
        name,
        finished: false,
    };
    tokio::time::sleep(delay).await;
    cleanup.finished = true;
    Ok(format!("{name}-done"))
}

async fn round(delays: [(&'static str, f64); 2]) {
    println!(
        "delays {} = {}s, {} = {}s, deadline 1s:",
        delays[0].0, delays[0].1, delays[1].0, delays[1].1
    );
    let mut group = Gather::new();
    for (name, secs) in delays {
        group.spawn(name, slow_fetch(name, Duration::from_secs_f64(secs)));
    }
    let report = group.all(&Deadline::after(Duration::from_secs(1))).await;
    for task in &report.tasks {
        match &task.outcome {
            TaskOutcome::Completed(value) => println!("  {}: {value}", task.label),
            TaskOutcome::TimedOut => {
                println!("  {}: TimeoutError, this input timed out", task.label)
            }
            other => println!("  {}: {other:?}", task.label),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    round([("a", 0.5), ("b", 0.5)]).await;
    round([("a", 0.5), ("b", 2.0)]).await;
}
