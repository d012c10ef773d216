//! The lesson's shield: `critical_save` finishes, and its result is still obtained, after the
//! caller waiting for it is cancelled.
//!
//! Prints `저장 중...` ("saving"), then at 0.2 s `외부 취소, 안의 task 여전히 실행 중` ("outer
//! cancelled, inner task still running"), then at 0.5 s `저장됨` ("saved") and
//! `기다린 후: checkpoint` ("after waiting: checkpoint"). (The lesson's Python never cancels the
//! outer task, so it prints `결과: checkpoint`; here the outer wait is cancelled at 0.2 s to
//! show the shield at work.)
//!
//! ```text
//! cargo run -p sluice-flow --example shield
//! ```
#![allow(
    clippy::disallowed_methods,
    reason = "the lesson's example shows the raw tokio call"
)]

use std::time::Duration;

use sluice_flow::{CancelCause, CancelToken, Cancellable, Drained, Tasks};

async fn critical_save() -> &'static str {
    println!("저장 중...");
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!("저장됨");
    "checkpoint"
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let tasks = Tasks::new();
    let outer = CancelToken::new();
    let canceller = outer.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        canceller.cancel(CancelCause::Requested);
    });

    // `task = create_task(critical_save()); result = await asyncio.shield(task)`
    let mut task = tasks.shield(critical_save());
    match outer.run(&mut task).await {
        Cancellable::Completed(result) => println!("결과: {}", show(result)),
        Cancellable::Cancelled(_) => {
            println!("외부 취소, 안의 task 여전히 실행 중");
            // Wait for the protected work to really finish.
            let result = task.await;
            println!("기다린 후: {}", show(result));
        }
    }
    if let Drained::TimedOut { still_running } = tasks.shutdown(Duration::from_secs(1)).await {
        println!("{still_running} shielded jobs did not finish");
    }
}

fn show(result: Result<&str, sluice_flow::ShieldError>) -> String {
    match result {
        Ok(value) => value.to_string(),
        Err(e) => e.to_string(),
    }
}
