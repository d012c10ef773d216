//! The lesson's timeouts: a 5 s operation under a 1 s deadline, in both forms.
//!
//! Prints `타임아웃` ("timeout") from the block form (`async with asyncio.timeout(1)`), then
//! `타임아웃 (옛 스타일)` ("timeout (old style)") from the `asyncio.wait_for` form, one second each.
//!
//! ```text
//! cargo run -p sluice-flow --example timeout
//! ```

use std::time::Duration;

use sluice_flow::{timeout, Deadline, Timed};

async fn slow_op() -> &'static str {
    tokio::time::sleep(Duration::from_secs(5)).await;
    "완료" // "done"
}

/// `async with asyncio.timeout(1): result = await slow_op(); print(result)`
async fn block_form() {
    let deadline = Deadline::after(Duration::from_secs(1));
    let outcome = deadline
        .run(async {
            let result = slow_op().await;
            println!("{result}");
        })
        .await;
    if let Timed::Expired(_) = outcome {
        println!("타임아웃");
    }
}

/// `result = await asyncio.wait_for(slow_op(), timeout=1)`
async fn wait_for_form() {
    match timeout(Duration::from_secs(1), slow_op()).await {
        Timed::Completed(result) => println!("{result}"),
        Timed::Expired(_) => println!("타임아웃 (옛 스타일)"),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    block_form().await;
    wait_for_form().await;
}
