//! The lesson's `number_stream`: an async generator consumed with `async for`.
//!
//! Prints 0, 1, 2, 3, 4, one every 100 ms.
//!
//! ```text
//! cargo run -p sluice-flow --example number_stream
//! ```

use std::time::Duration;

use sluice_flow::{stream, Stream, StreamExt};

/// `async def number_stream(start, end, delay=0.1)`: sleep, then yield, for each number.
fn number_stream(start: u32, end: u32, delay: Duration) -> impl Stream<Item = u32> {
    stream! {
        for i in start..end {
            tokio::time::sleep(delay).await;
            yield i;
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let numbers = number_stream(0, 5, Duration::from_millis(100));
    tokio::pin!(numbers);
    // `async for n in number_stream(0, 5): print(n)`
    while let Some(n) = numbers.next().await {
        println!("{n}");
    }
}
