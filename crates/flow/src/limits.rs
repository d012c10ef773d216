//! Stream limits: one set of timers around a *whole* stream, never around each `next()`.
//!
//! The lesson's war story: wrapping each `__anext__` of an async generator in
//! `asyncio.wait_for` cancels the generator when a timer fires, and the next call ends the stream
//! instead of recovering. The shape that works is a timer around the whole streaming operation.
//!
//! Rust has the same trap in two forms, both shown by tests in `tests/pitfalls.rs`:
//! - **A per-item timeout is not a total timeout.** `tokio::time::timeout(d, stream.next())`
//!   bounds the gap between items, so a stream that trickles one item just inside `d`, forever,
//!   never ends.
//! - **Dropping a future that is not cancel-safe loses data.** In `tokio::select!`, the branch
//!   that loses is dropped; if it was half-way through reading (one of two reads done), what it
//!   had read is gone.
//!
//! [`StreamLimits::apply`] wraps any stream with three hard limits, checked between items and
//! never by dropping the inner stream's `next()` halfway:
//! - `first_item`: time from the start to the first item;
//! - `idle`: time spent waiting for the next item, from the moment the consumer asks for it
//!   (before the first item, if no `first_item` limit is set, time since the start). A consumer
//!   that is slow to ask (backpressure) does not make the inner stream look idle;
//! - `total`: time from the start to the end.
//!
//! When one trips, the wrapper yields exactly one [`LimitExceeded`] naming the limit, with how many
//! items had passed and the elapsed time, drops the inner stream (so its cleanup runs, once) and
//! ends; it is fused. Items are passed through as they arrive: never lost, duplicated or
//! reordered. A soft `keep_alive` threshold yields [`Event::KeepAlive`] while the inner stream is
//! silent, without cancelling anything and without resetting the hard idle timer. On a tie (two
//! limits at the same instant) the more specific one is named: `first_item`, then `idle`, then
//! `total`. An item and a limit due at the same instant: the limit wins.
//!
//! ```
//! use std::time::Duration;
//! use futures_util::StreamExt;
//! use sluice_flow::{stream, Event, Limit, StreamLimits};
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let trickle = stream! {
//!     loop {
//!         tokio::time::sleep(Duration::from_millis(900)).await;
//!         yield "token";
//!     }
//! };
//! let limits = StreamLimits::new().idle(Duration::from_secs(1)).total(Duration::from_secs(5));
//! let events: Vec<_> = limits.apply(trickle).collect().await;
//! assert_eq!(events.len(), 6); // five tokens, then the one terminal error
//! let err = events.last().unwrap().as_ref().unwrap_err();
//! assert_eq!((err.limit, err.items), (Limit::Total, 5));
//! # }
//! ```

use std::fmt;
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::stream::{FusedStream, Stream};
use tokio::time::{Instant, Sleep};

/// Which of a stream's hard limits tripped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// Time from the start to the first item.
    FirstItem,
    /// Time spent waiting for the next item.
    Idle,
    /// Time from the start to the end.
    Total,
}

impl Limit {
    /// The limit's snake_case name: `"first_item"`, `"idle"` or `"total"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Limit::FirstItem => "first_item",
            Limit::Idle => "idle",
            Limit::Total => "total",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The limits to put around a stream. `None` means no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamLimits {
    /// Time from the start to the first item.
    pub first_item: Option<Duration>,
    /// Time spent waiting for the next item (see the module docs).
    pub idle: Option<Duration>,
    /// Time from the start to the end.
    pub total: Option<Duration>,
    /// Soft threshold: after this long waiting without an item, yield [`Event::KeepAlive`] (again every
    /// `keep_alive` while the silence lasts). Cancels nothing; does not reset `idle`.
    pub keep_alive: Option<Duration>,
}

impl StreamLimits {
    /// No limits at all.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the first-item limit.
    pub fn first_item(mut self, limit: Duration) -> Self {
        self.first_item = Some(limit);
        self
    }

    /// Sets the idle limit.
    pub fn idle(mut self, limit: Duration) -> Self {
        self.idle = Some(limit);
        self
    }

    /// Sets the total limit.
    pub fn total(mut self, limit: Duration) -> Self {
        self.total = Some(limit);
        self
    }

    /// Sets the soft keep-alive threshold.
    pub fn keep_alive(mut self, every: Duration) -> Self {
        self.keep_alive = Some(every);
        self
    }

    /// Wraps `stream`; the clock starts now.
    pub fn apply<S: Stream>(self, stream: S) -> Limited<S> {
        self.apply_from(stream, Instant::now())
    }

    /// Wraps `stream` with the clock started at `started` (for a stream whose request began
    /// earlier than the wrapping).
    pub fn apply_from<S: Stream>(self, stream: S, started: Instant) -> Limited<S> {
        Limited {
            inner: Some(Box::pin(stream)),
            limits: self,
            started,
            waiting_since: Some(started),
            items: 0,
            keep_alive_at: self.keep_alive.map(|every| started + every),
            timer: None,
            arrived: started,
            waited: Duration::ZERO,
        }
    }
}

/// What a [`Limited`] stream yields besides its terminal error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<T> {
    /// An item of the inner stream, as it arrived.
    Item(T),
    /// The inner stream has been silent past the soft `keep_alive` threshold.
    KeepAlive {
        /// How long the consumer has been waiting for the next item.
        silent_for: Duration,
    },
}

/// A hard limit tripped; the stream ends after this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{limit} limit of {limit_after:?} exceeded after {items} items ({elapsed:?} elapsed)")]
pub struct LimitExceeded {
    /// Which limit.
    pub limit: Limit,
    /// The limit's configured duration.
    pub limit_after: Duration,
    /// How many items had passed before it tripped.
    pub items: u64,
    /// Time from the start to the trip.
    pub elapsed: Duration,
}

/// A stream under [`StreamLimits`]. Yields `Ok(Event)` for items and keep-alives, at most one
/// `Err(LimitExceeded)`, and then ends. Fused.
#[must_use = "streams do nothing unless polled"]
pub struct Limited<S> {
    /// `None` once the stream has ended or a limit tripped: the inner stream is dropped then.
    inner: Option<Pin<Box<S>>>,
    limits: StreamLimits,
    started: Instant,
    /// When the consumer started waiting for the next item; `None` between handing out an item
    /// and being asked for the next one (that time is the consumer's, not the inner stream's).
    waiting_since: Option<Instant>,
    items: u64,
    /// When the soft keep-alive threshold is next due, if there is one.
    keep_alive_at: Option<Instant>,
    /// One timer, for whichever is due first: the earliest hard limit or the keep-alive; and the
    /// instant it is set for. Made the first time the inner stream makes the consumer wait.
    /// Moved earlier at once when something falls due sooner, but left where it is when what
    /// is due moves later (the idle limit, at every item): it then fires early once and is set
    /// again, rather than being moved in the timer wheel for every item.
    timer: Option<(Instant, Pin<Box<Sleep>>)>,
    /// When the last item was handed out (the clock read of the poll that got it).
    arrived: Instant,
    /// The time the consumer has spent waiting for items, all told.
    waited: Duration,
}

impl<S> Limited<S> {
    /// How many items have passed so far.
    pub fn items(&self) -> u64 {
        self.items
    }

    /// When the clock started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// When the last item was handed out ([`started`](Self::started) before the first): the
    /// clock as read by the poll that got it, so that a consumer timing its items needs no
    /// clock read of its own.
    pub fn arrived(&self) -> Instant {
        self.arrived
    }

    /// How long the consumer has spent waiting for items so far, all told: from each time it
    /// asked for the next item to the poll that got it (from the start, for the first), and
    /// the wait under way, if any, up to now (so after the end, the wait that ended it too).
    /// Time between being handed an item and asking for the next is the consumer's own.
    pub fn waited(&self) -> Duration {
        match self.waiting_since {
            Some(since) => self.waited + Instant::now().saturating_duration_since(since),
            None => self.waited,
        }
    }

    /// The earliest hard limit now in force: its instant, which limit, and its duration.
    fn next_limit(&self) -> Option<(Instant, Limit, Duration)> {
        let l = &self.limits;
        let gap = if self.items == 0 {
            match (l.first_item, l.idle) {
                (Some(d), _) => Some((self.started + d, Limit::FirstItem, d)),
                (None, Some(d)) => Some((self.started + d, Limit::Idle, d)),
                (None, None) => None,
            }
        } else {
            let since = self.waiting_since.unwrap_or_else(Instant::now);
            l.idle.map(|d| (since + d, Limit::Idle, d))
        };
        let total = l.total.map(|d| (self.started + d, Limit::Total, d));
        match (gap, total) {
            // On a tie the more specific limit (first_item or idle) is named.
            (Some(g), Some(t)) => Some(if t.0 < g.0 { t } else { g }),
            (g, t) => g.or(t),
        }
    }

    /// Makes sure the timer wakes us by `due` (if any) and polls it: whether `due` has come.
    fn poll_timer(&mut self, due: Option<Instant>, cx: &mut Context<'_>) -> bool {
        let Some(due) = due else {
            return false;
        };
        let (armed, timer) = self
            .timer
            .get_or_insert_with(|| (due, Box::pin(tokio::time::sleep_until(due))));
        loop {
            // Set for later than `due`: moved to it. Set for earlier and already fired: set
            // again for `due`. Set for earlier and not fired yet: left, to fire early once.
            if *armed > due || (*armed < due && timer.is_elapsed()) {
                *armed = due;
                timer.as_mut().reset(due);
            }
            match timer.as_mut().poll(cx) {
                Poll::Pending => return false,
                Poll::Ready(()) if *armed == due => return true,
                // It fired early (between the look above and the poll): set it again.
                Poll::Ready(()) => {}
            }
        }
    }

    /// Ends the wait under way (if any) at `now`, adding it to `waited`.
    fn close_wait(&mut self, now: Instant) {
        if let Some(since) = self.waiting_since.take() {
            self.waited += now.saturating_duration_since(since);
        }
    }

    fn trip(&mut self, limit: Limit, limit_after: Duration, now: Instant) -> LimitExceeded {
        self.inner = None; // drops the inner stream: its cleanup runs here, once
        self.timer = None;
        self.close_wait(now);
        LimitExceeded {
            limit,
            limit_after,
            items: self.items,
            elapsed: now.saturating_duration_since(self.started),
        }
    }
}

impl<S: Stream> Stream for Limited<S> {
    type Item = Result<Event<S::Item>, LimitExceeded>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Every field is Unpin (the inner stream and the timers are boxed).
        let this = self.get_mut();
        if this.inner.is_none() {
            return Poll::Ready(None);
        }

        // 1. The consumer asks for the next item: the idle clock and the keep-alive start now.
        let now = Instant::now();
        if this.waiting_since.is_none() {
            this.waiting_since = Some(now);
            this.keep_alive_at = this.limits.keep_alive.map(|every| now + every);
        }

        // 2. A limit that is already due trips before we ask for another item.
        let next = this.next_limit();
        if let Some((at, limit, after)) = next {
            if now >= at {
                return Poll::Ready(Some(Err(this.trip(limit, after, now))));
            }
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };

        // 3. Ask the inner stream. Its `poll_next` is never abandoned half-way: we only stop
        //    polling it between items, so nothing it has started producing is lost.
        match inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(item)) => {
                this.items += 1;
                this.close_wait(now);
                this.arrived = now;
                return Poll::Ready(Some(Ok(Event::Item(item))));
            }
            Poll::Ready(None) => {
                this.inner = None;
                this.timer = None;
                this.close_wait(now);
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }

        // 4. Nothing yet: arm the timer for whichever is due first, the earliest hard limit or
        //    the keep-alive, so we are woken then, and check it (it may have become due while
        //    we polled). On a tie the hard limit wins.
        let hard_at = next.map(|(at, _, _)| at);
        if this.poll_timer(earliest(hard_at, this.keep_alive_at), cx) {
            let now = Instant::now();
            if let Some((at, limit, after)) = next {
                if now >= at {
                    return Poll::Ready(Some(Err(this.trip(limit, after, now))));
                }
            }
            // 5. The soft threshold: a keep-alive, then wait another `keep_alive`.
            if let (Some(every), Some(at)) = (this.limits.keep_alive, this.keep_alive_at) {
                if now >= at {
                    this.keep_alive_at = Some(now + every);
                    // Re-armed and polled once, so that it is registered to wake us.
                    let _ = this.poll_timer(earliest(hard_at, this.keep_alive_at), cx);
                    return Poll::Ready(Some(Ok(Event::KeepAlive {
                        silent_for: now
                            .saturating_duration_since(this.waiting_since.unwrap_or(now)),
                    })));
                }
            }
        }
        Poll::Pending
    }
}

/// The earlier of two optional instants.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl<S: Stream> FusedStream for Limited<S> {
    fn is_terminated(&self) -> bool {
        self.inner.is_none()
    }
}

impl<S> fmt::Debug for Limited<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limited")
            .field("limits", &self.limits)
            .field("items", &self.items)
            .field("ended", &self.inner.is_none())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Yields `0..` after each of `gaps`, then ends; counts its drops.
    fn scheduled(gaps: Vec<u64>, drops: Arc<AtomicUsize>) -> impl Stream<Item = usize> {
        struct OnDrop(Arc<AtomicUsize>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        async_stream::stream! {
            let _guard = OnDrop(drops);
            for (i, gap) in gaps.into_iter().enumerate() {
                tokio::time::sleep(ms(gap)).await;
                yield i;
            }
        }
    }

    async fn run(
        limits: StreamLimits,
        gaps: Vec<u64>,
    ) -> (Vec<Result<Event<usize>, LimitExceeded>>, usize) {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut s = limits.apply(scheduled(gaps, drops.clone()));
        let mut out = Vec::new();
        while let Some(e) = s.next().await {
            out.push(e);
        }
        // Fused: polling again yields nothing more.
        assert!(s.next().await.is_none());
        assert!(s.is_terminated());
        (out, drops.load(Ordering::SeqCst))
    }

    fn items(events: &[Result<Event<usize>, LimitExceeded>]) -> Vec<usize> {
        events
            .iter()
            .filter_map(|e| match e {
                Ok(Event::Item(i)) => Some(*i),
                _ => None,
            })
            .collect()
    }

    fn terminal(events: &[Result<Event<usize>, LimitExceeded>]) -> Option<LimitExceeded> {
        events.last().and_then(|e| e.as_ref().err().copied())
    }

    #[tokio::test(start_paused = true)]
    async fn no_limits_passes_everything_through() {
        let (events, drops) = run(StreamLimits::new(), vec![10, 5000, 0, 1]).await;
        assert_eq!(items(&events), vec![0, 1, 2, 3]);
        assert_eq!(terminal(&events), None);
        assert_eq!(drops, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn first_item_limit_trips_before_the_first_item() {
        let limits = StreamLimits::new().first_item(ms(100)).idle(ms(1000));
        let (events, drops) = run(limits, vec![150, 10]).await;
        assert_eq!(events.len(), 1);
        let err = terminal(&events).expect("a terminal error");
        assert_eq!(err.limit, Limit::FirstItem);
        assert_eq!(
            (err.items, err.elapsed, err.limit_after),
            (0, ms(100), ms(100))
        );
        assert_eq!(drops, 1, "the inner stream is dropped exactly once");
    }

    #[tokio::test(start_paused = true)]
    async fn first_item_limit_does_not_apply_after_the_first_item() {
        let limits = StreamLimits::new().first_item(ms(100)).idle(ms(300));
        let (events, _) = run(limits, vec![50, 250, 250]).await;
        assert_eq!(items(&events), vec![0, 1, 2]);
        assert_eq!(terminal(&events), None);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_limit_trips_after_silence_and_counts_items() {
        let limits = StreamLimits::new().idle(ms(200));
        let (events, drops) = run(limits, vec![10, 10, 500, 10]).await;
        assert_eq!(items(&events), vec![0, 1]);
        let err = terminal(&events).expect("a terminal error");
        assert_eq!(
            (err.limit, err.items, err.elapsed),
            (Limit::Idle, 2, ms(220))
        );
        assert_eq!(drops, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_applies_from_the_start_without_a_first_item_limit() {
        let (events, _) = run(StreamLimits::new().idle(ms(200)), vec![300]).await;
        let err = terminal(&events).expect("a terminal error");
        assert_eq!((err.limit, err.elapsed), (Limit::Idle, ms(200)));
    }

    #[tokio::test(start_paused = true)]
    async fn total_limit_ends_a_stream_that_never_idles() {
        let limits = StreamLimits::new().idle(ms(100)).total(ms(1000));
        let (events, _) = run(limits, vec![90; 50]).await;
        assert_eq!(items(&events), (0..11).collect::<Vec<_>>());
        let err = terminal(&events).expect("a terminal error");
        assert_eq!(
            (err.limit, err.items, err.elapsed),
            (Limit::Total, 11, ms(1000))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_due_with_an_item_wins_and_ties_name_the_specific_limit() {
        let limits = StreamLimits::new().first_item(ms(100)).total(ms(100));
        let (events, _) = run(limits, vec![100]).await;
        assert_eq!(items(&events), Vec::<usize>::new());
        assert_eq!(terminal(&events).map(|e| e.limit), Some(Limit::FirstItem));
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_is_soft_and_does_not_reset_idle() {
        let limits = StreamLimits::new().idle(ms(1000)).keep_alive(ms(300));
        let (events, drops) = run(limits, vec![100, 2000]).await;
        let kinds: Vec<String> = events
            .iter()
            .map(|e| match e {
                Ok(Event::Item(i)) => format!("item{i}"),
                Ok(Event::KeepAlive { silent_for }) => format!("ka{}", silent_for.as_millis()),
                Err(e) => format!("{}@{}", e.limit, e.elapsed.as_millis()),
            })
            .collect();
        // Keep-alives at 400, 700, 1000 after the item at 100; idle trips at 1100, not later.
        assert_eq!(kinds, vec!["item0", "ka300", "ka600", "ka900", "idle@1100"]);
        assert_eq!(drops, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_alone_never_ends_the_stream() {
        let limits = StreamLimits::new().keep_alive(ms(100));
        let (events, _) = run(limits, vec![350, 10]).await;
        assert_eq!(items(&events), vec![0, 1]);
        let keep_alives = events
            .iter()
            .filter(|e| matches!(e, Ok(Event::KeepAlive { .. })))
            .count();
        assert_eq!(keep_alives, 3);
        assert_eq!(terminal(&events), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_consumer_does_not_make_the_stream_idle() {
        let drops = Arc::new(AtomicUsize::new(0));
        let limits = StreamLimits::new().idle(ms(100)).keep_alive(ms(60));
        let mut s = limits.apply(scheduled(vec![10, 50, 50], drops));
        let mut got = Vec::new();
        while let Some(e) = s.next().await {
            got.push(e.map(|e| match e {
                Event::Item(i) => i as i64,
                Event::KeepAlive { .. } => -1,
            }));
            // The consumer takes 500 ms per item: five idle limits' worth, none of it upstream's.
            tokio::time::sleep(ms(500)).await;
        }
        assert_eq!(got, vec![Ok(0), Ok(1), Ok(2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_limit_follows_every_item_though_its_timer_is_not_moved_each_time() {
        // Twenty items 90 ms apart under a 100 ms idle limit: each would trip it if the timer
        // set at the start (or at any earlier item) were taken for the limit itself.
        let limits = StreamLimits::new().idle(ms(100));
        let mut gaps = vec![90; 20];
        gaps.push(150);
        let (events, _) = run(limits, gaps).await;
        assert_eq!(items(&events), (0..20).collect::<Vec<_>>());
        let err = terminal(&events).expect("a terminal error");
        assert_eq!(
            (err.limit, err.items, err.elapsed),
            (Limit::Idle, 20, ms(20 * 90 + 100))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn arrivals_and_waits_are_timed_for_the_consumer() {
        let drops = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut s = StreamLimits::new()
            .idle(ms(1000))
            .apply(scheduled(vec![30, 50, 0], drops));
        assert_eq!((s.arrived(), s.waited()), (started, ms(0)));
        assert!(matches!(s.next().await, Some(Ok(Event::Item(0)))));
        assert_eq!((s.arrived(), s.waited()), (started + ms(30), ms(30)));
        // The consumer's own 200 ms is not waiting: the stream only starts its next gap when
        // asked (a generator runs when polled), so item 1 comes 50 ms after the ask.
        tokio::time::sleep(ms(200)).await;
        assert!(matches!(s.next().await, Some(Ok(Event::Item(1)))));
        assert_eq!((s.arrived(), s.waited()), (started + ms(280), ms(80)));
        assert!(matches!(s.next().await, Some(Ok(Event::Item(2)))));
        assert_eq!((s.arrived(), s.waited()), (started + ms(280), ms(80)));
        // The wait that ends the stream counts too, and time after it does not.
        tokio::time::sleep(ms(20)).await;
        assert!(s.next().await.is_none());
        tokio::time::sleep(ms(500)).await;
        assert_eq!(s.waited(), ms(80));
        let drops = Arc::new(AtomicUsize::new(0));
        let mut s = StreamLimits::new()
            .idle(ms(100))
            .apply(scheduled(vec![30, 500], drops));
        assert!(matches!(s.next().await, Some(Ok(Event::Item(0)))));
        assert!(matches!(s.next().await, Some(Err(_))));
        assert_eq!(s.waited(), ms(130));
    }

    #[tokio::test(start_paused = true)]
    async fn clock_can_start_before_wrapping() {
        let started = Instant::now();
        tokio::time::sleep(ms(80)).await;
        let drops = Arc::new(AtomicUsize::new(0));
        let mut s = StreamLimits::new()
            .first_item(ms(100))
            .apply_from(scheduled(vec![50], drops), started);
        let err = s.next().await.and_then(|e| e.err()).expect("trips");
        assert_eq!((err.limit, err.elapsed), (Limit::FirstItem, ms(100)));
    }

    #[test]
    fn limit_names_and_display() {
        assert_eq!(Limit::FirstItem.as_str(), "first_item");
        let e = LimitExceeded {
            limit: Limit::Idle,
            limit_after: ms(200),
            items: 3,
            elapsed: ms(900),
        };
        assert_eq!(
            e.to_string(),
            "idle limit of 200ms exceeded after 3 items (900ms elapsed)"
        );
    }
}
