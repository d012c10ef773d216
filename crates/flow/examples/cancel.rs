//! The lesson's cancellation: a long task cancelled after 0.3 s runs its cleanup, and the caller
//! sees the cancellation, here with its cause.
//!
//! Prints `작업 중 0` .. `작업 중 2` ("working"), one every 100 ms, then `취소 받음 — 정리 중`
//! ("cancel received — cleaning up") from the task and `task 취소 확인 (cause: requested)`
//! ("task cancellation confirmed") from the caller.
//!
//! In Python, `CancelledError` arrives at the task's next `await`; the task cleans up and
//! re-raises. In Rust the task watches a [`CancelToken`] at its await points
//! ([`CancelToken::run`]) and returns the typed cancellation, so it cannot be swallowed.
//!
//! ```text
//! cargo run -p sluice-flow --example cancel
//! ```
#![allow(
    clippy::disallowed_methods,
    reason = "the lesson's example shows the raw tokio call"
)]

use std::time::Duration;

use sluice_flow::{CancelCause, CancelToken, Cancellable, Cancelled};

async fn long_task(cancel: CancelToken) -> Result<(), Cancelled> {
    for i in 0..100 {
        println!("작업 중 {i}");
        if let Cancellable::Cancelled(cause) = cancel
            .run(tokio::time::sleep(Duration::from_millis(100)))
            .await
        {
            println!("취소 받음 — 정리 중");
            // cleanup goes here
            return Err(Cancelled { cause }); // re-raise: the caller must see it
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cancel = CancelToken::new();
    let task = tokio::spawn(long_task(cancel.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel.cancel(CancelCause::Requested);
    match task.await {
        Ok(Err(Cancelled { cause })) => println!("task 취소 확인 (cause: {cause})"),
        Ok(Ok(())) => println!("task finished before it was cancelled"),
        Err(e) => println!("task failed: {e}"),
    }
}
