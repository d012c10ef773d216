//! Per-key limits, held by the store so that every node sharing it counts the same streams and
//! the same requests.
//!
//! - **Running streams**: a stream holds a place among its key's from the moment its record is
//!   committed (`begin`) until its final status is (`finish`), or until the store marks it
//!   `interrupted(crash)` because its node died. `begin` refuses a stream beyond the key's limit
//!   with [`StoreError::KeyBusy`].
//! - **Requests per minute**: a token bucket per key, refilled continuously; each chat request
//!   takes a token.
//!
//! On PostgreSQL both live in the database (see `postgres::limits`), exact across nodes. On
//! SQLite one process is the only node, so they live in memory here ([`LocalLimits`]): exact as
//! well, and forgotten at restart along with the streams a restart interrupts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::StoreError;

/// How long a request must wait for a token of a bucket holding `tokens`, refilled at
/// `per_minute`.
pub(super) fn wait_for_token(tokens: f64, per_minute: u32) -> Duration {
    let rate = f64::from(per_minute.max(1)) / 60.0;
    Duration::from_secs_f64(((1.0 - tokens) / rate).max(0.0))
}

/// The limits of one process's keys (the SQLite backend). Its maps hold one entry per key that
/// made a request (keys come from the configuration, so they are bounded) and one per running
/// stream of a key with a concurrency limit.
#[derive(Debug, Default)]
pub(crate) struct LocalLimits {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The key of each running stream that holds a place.
    places: HashMap<String, Arc<str>>,
    /// How many places each key's streams hold.
    held: HashMap<Arc<str>, u32>,
    buckets: HashMap<String, Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl LocalLimits {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a place for `stream` among `key`'s at most `limit` running streams.
    pub(crate) fn take_place(&self, stream: &str, key: &str, limit: u32) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let key: Arc<str> = inner
            .held
            .get_key_value(key)
            .map_or_else(|| Arc::from(key), |(k, _)| k.clone());
        let held = inner.held.entry(key.clone()).or_insert(0);
        if *held >= limit {
            return Err(StoreError::KeyBusy { limit });
        }
        *held += 1;
        inner.places.insert(stream.to_string(), key);
        Ok(())
    }

    /// Frees `stream`'s place, if it holds one.
    pub(crate) fn free_place(&self, stream: &str) {
        let mut inner = self.lock();
        if let Some(key) = inner.places.remove(stream) {
            if let Some(held) = inner.held.get_mut(&key) {
                *held = held.saturating_sub(1);
            }
        }
    }

    /// Takes one of `key`'s `per_minute` requests: `None` if admitted, else how long until a
    /// request would be.
    pub(crate) fn take_request(&self, key: &str, per_minute: u32) -> Option<Duration> {
        let mut inner = self.lock();
        let now = Instant::now();
        let cap = f64::from(per_minute);
        let bucket = inner.buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: cap,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * cap / 60.0).min(cap);
        bucket.updated = now;
        if bucket.tokens < 1.0 {
            return Some(wait_for_token(bucket.tokens, per_minute));
        }
        bucket.tokens -= 1.0;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_limited_per_key_and_freed_by_their_stream() {
        let l = LocalLimits::default();
        l.take_place("a", "k1", 2).expect("first");
        l.take_place("b", "k1", 2).expect("second");
        assert!(matches!(
            l.take_place("c", "k1", 2),
            Err(StoreError::KeyBusy { limit: 2 })
        ));
        l.take_place("c", "k2", 2).expect("another key has its own");
        l.free_place("a");
        l.free_place("a");
        l.free_place("unknown");
        l.take_place("c", "k1", 2).expect("a place came back, once");
        assert!(l.take_place("d", "k1", 2).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_refills_continuously_and_says_when() {
        let l = LocalLimits::default();
        for _ in 0..60 {
            assert_eq!(l.take_request("k", 60), None, "within the minute's budget");
        }
        assert_eq!(l.take_request("k", 60), Some(Duration::from_secs(1)));
        assert_eq!(l.take_request("other", 60), None, "per key");
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert_eq!(l.take_request("k", 60), None, "one request per second");
        assert!(l.take_request("k", 60).is_some());
    }
}
