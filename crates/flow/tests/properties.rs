//! Property tests: over random arrival schedules, stream limits and the bounded queue never lose,
//! duplicate or reorder an item, and end with exactly one terminal outcome.
#![allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]
#![allow(clippy::expect_used, clippy::unwrap_used)] // a test fails by panicking

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use sluice_flow::{queue, stream, Event, Limit, QueueError, Stream, StreamExt, StreamLimits};
use tokio::time::Instant;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime")
}

struct OnDrop(Arc<AtomicUsize>);
impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Yields `0..gaps.len()`, item `i` after a pause of `gaps[i]` ms; counts its drops.
fn scheduled(gaps: Vec<u64>, drops: Arc<AtomicUsize>) -> impl Stream<Item = usize> {
    stream! {
        let _guard = OnDrop(drops);
        for (i, gap) in gaps.into_iter().enumerate() {
            tokio::time::sleep(ms(gap)).await;
            yield i;
        }
    }
}

/// The reference model of the limits with an eager consumer: item `i` arrives `gaps[i]` after
/// the previous one; a limit due at or before an arrival trips first. Returns how many items
/// pass and, if a limit trips, which one and when.
fn model(limits: &StreamLimits, gaps: &[u64]) -> (usize, Option<(Limit, u64)>) {
    let (mut now, mut last) = (0u64, 0u64);
    let dur = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
    for (i, gap) in gaps.iter().enumerate() {
        let arrival = now + gap;
        let gap_limit = if i == 0 {
            dur(limits.first_item)
                .map(|d| (d, Limit::FirstItem))
                .or(dur(limits.idle).map(|d| (d, Limit::Idle)))
        } else {
            dur(limits.idle).map(|d| (last + d, Limit::Idle))
        };
        let total = dur(limits.total).map(|d| (d, Limit::Total));
        let due = match (gap_limit, total) {
            (Some(g), Some(t)) => Some(if t.0 < g.0 { t } else { g }),
            (g, t) => g.or(t),
        };
        if let Some((at, limit)) = due {
            if at <= arrival {
                return (i, Some((limit, at)));
            }
        }
        now = arrival;
        last = arrival;
    }
    (gaps.len(), None)
}

fn limits_strategy() -> impl Strategy<Value = StreamLimits> {
    (
        proptest::option::of(1u64..400),
        proptest::option::of(1u64..400),
        proptest::option::of(1u64..3000),
        proptest::option::of(1u64..200),
    )
        .prop_map(|(first, idle, total, keep_alive)| StreamLimits {
            first_item: first.map(ms),
            idle: idle.map(ms),
            total: total.map(ms),
            keep_alive: keep_alive.map(ms),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// With an eager consumer the outcome matches the model exactly; in every case the items are
    /// a prefix of the input in order, a terminal error (if any) is last and alone, and the inner
    /// stream is dropped exactly once.
    #[test]
    fn limits_match_the_model(
        limits in limits_strategy(),
        gaps in proptest::collection::vec(0u64..300, 0..25),
    ) {
        let (expected_items, expected_trip) = model(&limits, &gaps);
        let rt = paused_runtime();
        let (events, drops, tripped_at) = rt.block_on(async {
            let drops = Arc::new(AtomicUsize::new(0));
            let start = Instant::now();
            let mut s = limits.apply(scheduled(gaps.clone(), drops.clone()));
            let mut events = Vec::new();
            while let Some(e) = s.next().await {
                events.push(e);
            }
            prop_assert!(s.next().await.is_none(), "fused");
            let at = start.elapsed().as_millis() as u64;
            Ok((events, drops.load(Ordering::SeqCst), at))
        })?;
        let items: Vec<usize> = events.iter().filter_map(|e| match e {
            Ok(Event::Item(i)) => Some(*i),
            _ => None,
        }).collect();
        prop_assert_eq!(items, (0..expected_items).collect::<Vec<_>>());
        let errors: Vec<_> = events.iter().filter_map(|e| e.as_ref().err()).collect();
        prop_assert!(errors.len() <= 1);
        if let Some(err) = errors.first() {
            prop_assert!(events.last().is_some_and(|e| e.is_err()), "the error is last");
            prop_assert_eq!(err.items as usize, expected_items);
            prop_assert_eq!(err.elapsed, ms(tripped_at));
        }
        prop_assert_eq!(
            errors.first().map(|e| (e.limit, e.elapsed.as_millis() as u64)),
            expected_trip
        );
        prop_assert_eq!(drops, 1);
    }

    /// With a slow, irregular consumer there is no simple timing model, but the invariants hold:
    /// no item lost, duplicated or reordered, at most one terminal error, last.
    #[test]
    fn limits_keep_order_with_a_slow_consumer(
        limits in limits_strategy(),
        gaps in proptest::collection::vec(0u64..300, 0..25),
        pauses in proptest::collection::vec(0u64..300, 25),
    ) {
        let rt = paused_runtime();
        let (events, drops) = rt.block_on(async {
            let drops = Arc::new(AtomicUsize::new(0));
            let mut s = limits.apply(scheduled(gaps.clone(), drops.clone()));
            let mut events = Vec::new();
            let mut i = 0;
            while let Some(e) = s.next().await {
                events.push(e);
                tokio::time::sleep(ms(pauses[i % pauses.len()])).await;
                i += 1;
            }
            (events, drops.load(Ordering::SeqCst))
        });
        let items: Vec<usize> = events.iter().filter_map(|e| match e {
            Ok(Event::Item(i)) => Some(*i),
            _ => None,
        }).collect();
        prop_assert_eq!(&items, &(0..items.len()).collect::<Vec<_>>());
        let errors = events.iter().filter(|e| e.is_err()).count();
        prop_assert!(errors <= 1);
        if errors == 1 {
            prop_assert!(events.last().is_some_and(|e| e.is_err()));
        } else {
            prop_assert_eq!(items.len(), gaps.len(), "a clean end delivered everything");
        }
        prop_assert_eq!(drops, 1);
    }

    /// The queue delivers exactly what was sent, in order, then exactly one terminal outcome
    /// matching how the producer ended; its depth never exceeds its capacity.
    #[test]
    fn queue_delivers_everything_in_order_then_one_ending(
        capacity in 1usize..5,
        count in 0u32..40,
        producer_pauses in proptest::collection::vec(0u64..20, 40),
        consumer_pauses in proptest::collection::vec(0u64..20, 40),
        ending in 0u8..3,
    ) {
        let rt = paused_runtime();
        let (received, max_depth) = rt.block_on(async {
            let (tx, mut rx) = queue::bounded::<u32, String>(capacity);
            let producer = tokio::spawn(async move {
                let mut max_depth = 0;
                for i in 0..count {
                    tokio::time::sleep(ms(producer_pauses[i as usize])).await;
                    if tx.send(i).await.is_err() {
                        break;
                    }
                    max_depth = max_depth.max(tx.depth());
                }
                match ending {
                    0 => tx.end(),
                    1 => tx.fail("broken".to_string()),
                    _ => drop(tx),
                }
                max_depth
            });
            let mut received = Vec::new();
            let mut i = 0;
            while let Some(r) = rx.recv().await {
                received.push(r);
                tokio::time::sleep(ms(consumer_pauses[i % consumer_pauses.len()])).await;
                i += 1;
            }
            prop_assert!(rx.recv().await.is_none(), "fused");
            let max_depth = producer.await.map_err(|e| TestCaseError::fail(e.to_string()))?;
            Ok((received, max_depth))
        })?;
        let mut expected: Vec<Result<u32, QueueError<String>>> = (0..count).map(Ok).collect();
        match ending {
            0 => {}
            1 => expected.push(Err(QueueError::Failed("broken".to_string()))),
            _ => expected.push(Err(QueueError::Abandoned)),
        }
        prop_assert_eq!(received, expected);
        prop_assert!(max_depth <= capacity);
    }
}
