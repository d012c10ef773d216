//! The lesson's war story, in its Rust forms.
//!
//! Python: wrapping each `__anext__` of an async generator in `asyncio.wait_for` cancels the
//! generator when a timer fires, and the stream ends instead of recovering. The fix is a timer
//! around the whole streaming operation. These tests show what the same mistakes look like in
//! Rust, and that `StreamLimits` does not make them.
//!
//! Two kinds of test live here, each labelled:
//! - **Demonstration**: exercises only tokio or async-stream, to show a pitfall (or a property
//!   of the platform sluice relies on). It checks the platform, not this crate; it would fail
//!   only if tokio or async-stream changed.
//! - **Check**: exercises `sluice-flow` and fails if it makes the mistake.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking
#![allow(
    clippy::disallowed_methods,
    reason = "demonstrations: they show the raw tokio calls that make the lesson's mistakes"
)]

use std::time::Duration;

use sluice_flow::{stream, Event, Limit, Stream, StreamExt, StreamLimits};
use tokio::sync::mpsc;
use tokio::time::Instant;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// One item every 900 ms, forever: a model that never stops "thinking out loud".
fn trickle() -> impl Stream<Item = u32> {
    stream! {
        let mut i = 0;
        loop {
            tokio::time::sleep(ms(900)).await;
            yield i;
            i += 1;
        }
    }
}

/// Demonstration. Pitfall 1: a per-item timeout is not a total timeout. Each `next()` finishes inside its 1 s
/// timeout, so the loop never stops on its own; only our artificial cap of 100 items ends it,
/// 90 s in, far past the 5 s the caller wanted.
#[tokio::test(start_paused = true)]
async fn per_item_timeout_never_ends_a_trickling_stream() {
    let start = Instant::now();
    let s = trickle();
    tokio::pin!(s);
    let mut items = 0;
    while let Ok(Some(_)) = tokio::time::timeout(ms(1000), s.next()).await {
        items += 1;
        if items == 100 {
            break;
        }
    }
    assert_eq!(items, 100, "no per-item timeout ever fired");
    assert_eq!(start.elapsed(), ms(90_000));
}

/// Check. The right shape: one total limit around the whole stream ends it at 5 s, with one terminal
/// error naming the limit, and every item that arrived before it.
#[tokio::test(start_paused = true)]
async fn total_limit_ends_a_trickling_stream_on_time() {
    let start = Instant::now();
    let limits = StreamLimits::new().idle(ms(1000)).total(ms(5000));
    let events: Vec<_> = limits.apply(trickle()).collect().await;
    assert_eq!(start.elapsed(), ms(5000));
    let items: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Ok(Event::Item(i)) => Some(*i),
            _ => None,
        })
        .collect();
    assert_eq!(items, vec![0, 1, 2, 3, 4]);
    let last = events
        .last()
        .and_then(|e| e.as_ref().err())
        .expect("terminal error");
    assert_eq!((last.limit, last.items), (Limit::Total, 5));
}

/// Demonstration. Unlike Python's `wait_for(__anext__())`, a timed-out `next()` does not kill an async-stream
/// generator: `Next` only borrows the stream, so the generator resumes where it was. (It is
/// still the wrong tool: see the test above.)
#[tokio::test(start_paused = true)]
async fn a_timed_out_next_does_not_kill_the_generator() {
    let s = stream! {
        for i in 0..3u32 {
            tokio::time::sleep(ms(300)).await;
            yield i;
        }
    };
    tokio::pin!(s);
    assert!(tokio::time::timeout(ms(100), s.next()).await.is_err());
    let rest: Vec<u32> = s.collect().await;
    assert_eq!(rest, vec![0, 1, 2]);
}

/// A read that is not cancel-safe: it takes two messages to make one frame. If it is dropped
/// after the first `recv`, that message is gone.
async fn read_frame(rx: &mut mpsc::Receiver<u32>) -> Option<(u32, u32)> {
    let a = rx.recv().await?;
    let b = rx.recv().await?;
    Some((a, b))
}

/// The sender: frames of two messages, 400 ms between the halves and between frames.
fn spawn_sender() -> mpsc::Receiver<u32> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        for i in 0..6u32 {
            tokio::time::sleep(ms(400)).await;
            if tx.send(i).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// Demonstration. Pitfall 2: a keep-alive timer in `select!` beside a non-cancel-safe read. Whenever the timer
/// wins between the two halves of a frame, the half already read is dropped with the future.
#[tokio::test(start_paused = true)]
async fn select_drops_a_half_read_frame() {
    let mut rx = spawn_sender();
    let mut frames = Vec::new();
    let mut keep_alives = 0;
    loop {
        tokio::select! {
            frame = read_frame(&mut rx) => match frame {
                Some(f) => frames.push(f),
                None => break,
            },
            _ = tokio::time::sleep(ms(500)) => keep_alives += 1,
        }
    }
    // Six messages were sent, three frames' worth; the reads that the keep-alive timer
    // interrupted lost their first half, so the frames came out wrong or not at all.
    assert_ne!(frames, vec![(0, 1), (2, 3), (4, 5)]);
    assert!(keep_alives > 0);
}

/// Check. The right shape: the frames are a stream (the generator keeps its half-read state across
/// polls), and the keep-alive is `StreamLimits`' soft threshold, which never drops the inner
/// stream's `next()`. Every frame arrives whole, and the keep-alives still happen.
#[tokio::test(start_paused = true)]
async fn stream_limits_keep_alive_loses_nothing() {
    let mut rx = spawn_sender();
    let frames = stream! {
        while let Some(frame) = read_frame(&mut rx).await {
            yield frame;
        }
    };
    let limits = StreamLimits::new().keep_alive(ms(500)).idle(ms(5000));
    let events: Vec<_> = limits.apply(frames).collect().await;
    let frames: Vec<(u32, u32)> = events
        .iter()
        .filter_map(|e| match e {
            Ok(Event::Item(f)) => Some(*f),
            _ => None,
        })
        .collect();
    assert_eq!(frames, vec![(0, 1), (2, 3), (4, 5)]);
    let keep_alives = events
        .iter()
        .filter(|e| matches!(e, Ok(Event::KeepAlive { .. })))
        .count();
    assert_eq!(
        keep_alives, 3,
        "one per 800 ms frame gap, at 500 ms into it"
    );
    assert!(events.iter().all(|e| e.is_ok()), "the stream ended cleanly");
}
