//! Streams written as async generator bodies.
//!
//! Python's async generator (`async def` with `yield`, consumed by `async for`) is, in Rust, a
//! [`Stream`] consumed with `while let Some(x) = stream.next().await`. Writing a `Stream` by hand
//! means a state machine; the [`async-stream`](https://docs.rs/async-stream) crate's [`stream!`]
//! and [`try_stream!`] macros let the body be written like the Python one, with `.await` before
//! each `yield`. This module re-exports them and the traits needed to consume a stream.
//!
//! ```
//! use std::time::Duration;
//! use sluice_flow::{stream, Stream, StreamExt};
//!
//! fn number_stream(start: u32, end: u32, delay: Duration) -> impl Stream<Item = u32> {
//!     stream! {
//!         for i in start..end {
//!             tokio::time::sleep(delay).await;
//!             yield i;
//!         }
//!     }
//! }
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let numbers = number_stream(0, 5, Duration::from_millis(100));
//! let got: Vec<u32> = numbers.collect().await;
//! assert_eq!(got, [0, 1, 2, 3, 4]);
//! # }
//! ```
//!
//! Dropping a stream is how it is cancelled: the generator body stops at its current `.await`, and
//! its locals are dropped (their `Drop` runs). Unlike Python's `wait_for(__anext__())`, timing out
//! one `next()` call does *not* kill the generator: the `Next` future only borrows the stream. But
//! neither does it bound the whole stream; see [`crate::limits`].

pub use async_stream::{stream, try_stream};
pub use futures_core::stream::{FusedStream, Stream};
pub use futures_util::stream::StreamExt;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn items_arrive_one_delay_apart() {
        let start = Instant::now();
        let s = stream! {
            for i in 0..5u32 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                yield i;
            }
        };
        tokio::pin!(s);
        let mut seen = Vec::new();
        while let Some(i) = s.next().await {
            seen.push((i, start.elapsed().as_millis()));
        }
        assert_eq!(seen, vec![(0, 100), (1, 200), (2, 300), (3, 400), (4, 500)]);
    }

    #[tokio::test]
    async fn try_stream_ends_at_the_first_error() {
        let s = try_stream! {
            yield 1u32;
            Err("broken")?;
            yield 2u32;
        };
        let got: Vec<Result<u32, &str>> = s.collect().await;
        assert_eq!(got, vec![Ok(1), Err("broken")]);
    }
}
