//! API keys, tenants and per-key limits.
//!
//! Keys are configured as `[[keys]]` with a tenant and the key's SHA-256, never the key itself
//! (`sluice keys new` makes one). Clients send `Authorization: Bearer KEY`, as OpenAI clients do.
//! Every stream belongs to the tenant of the key that created it; everything about a stream is
//! looked up *by tenant*, so another tenant's stream is indistinguishable from one that does not
//! exist (404, never 403).
//!
//! With no keys configured, sluice serves one tenant, `local`, without authentication, and
//! refuses to listen on anything but a loopback address.
//!
//! Per key, two limits answer `429` with `Retry-After`: concurrent streams, and chat requests
//! per minute (a token bucket that refills continuously).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The tenant of a gateway without keys.
pub const LOCAL_TENANT: &str = "local";

/// One configured key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyConfig {
    /// The tenant it belongs to.
    pub tenant: String,
    /// SHA-256 of the key.
    pub key_sha256: [u8; 32],
    /// At most this many streams at once.
    pub max_concurrent_streams: Option<u32>,
    /// At most this many chat requests per minute.
    pub requests_per_minute: Option<u32>,
}

/// The SHA-256 of `key`.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A fresh random key (`sk-sluice-` and 64 hex digits: 256 random bits).
pub fn new_key() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness available: {e}"))?;
    Ok(format!("sk-sluice-{}", hex::encode(bytes)))
}

/// The `[[keys]]` lines for `key`.
pub fn config_lines(tenant: &str, key: &str) -> String {
    format!(
        "[[keys]]\ntenant = {tenant:?}\nkey_sha256 = \"{}\"\n# max_concurrent_streams = 16\n# requests_per_minute = 600\n",
        hex::encode(hash_key(key))
    )
}

#[derive(Debug)]
struct KeyState {
    config: KeyConfig,
    /// Places among the key's concurrent streams (`None`: unlimited).
    streams: Option<Arc<Semaphore>>,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Who is calling: their tenant, and their key's limits.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The tenant.
    pub tenant: Arc<str>,
    key: Option<Arc<KeyState>>,
}

/// A limit said no; try again after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Too many streams at once.
    Concurrency {
        /// The limit.
        limit: u32,
    },
    /// Too many requests this minute.
    Rate {
        /// The limit.
        per_minute: u32,
        /// When a request would be admitted.
        retry_after: Duration,
    },
}

/// Held while a stream runs; frees its place in the concurrency limit when dropped.
#[derive(Debug)]
pub struct StreamPermit {
    _place: Option<OwnedSemaphorePermit>,
}

impl Caller {
    /// Admits one chat request: checks the rate, then takes a place among the key's concurrent
    /// streams.
    pub fn admit(&self) -> Result<StreamPermit, Refused> {
        let Some(key) = &self.key else {
            return Ok(StreamPermit { _place: None });
        };
        if let Some(per_minute) = key.config.requests_per_minute {
            let rate = f64::from(per_minute) / 60.0;
            let mut b = key.bucket.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
            b.tokens = (b.tokens + elapsed * rate).min(f64::from(per_minute));
            b.updated = now;
            if b.tokens < 1.0 {
                let wait = ((1.0 - b.tokens) / rate).max(0.0);
                return Err(Refused::Rate {
                    per_minute,
                    retry_after: Duration::from_secs_f64(wait),
                });
            }
            b.tokens -= 1.0;
        }
        let place = match (&key.streams, key.config.max_concurrent_streams) {
            (Some(places), Some(limit)) => Some(
                places
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| Refused::Concurrency { limit })?,
            ),
            _ => None,
        };
        Ok(StreamPermit { _place: place })
    }
}

/// Why a request is not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unauthenticated {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A key that is not configured.
    Unknown,
}

/// The configured keys.
#[derive(Debug)]
pub struct Keys {
    by_hash: HashMap<[u8; 32], Arc<KeyState>>,
    local: Caller,
}

impl Keys {
    /// The keys from the configuration.
    pub fn new(keys: &[KeyConfig]) -> Self {
        let now = Instant::now();
        let by_hash = keys
            .iter()
            .map(|k| {
                let state = KeyState {
                    config: k.clone(),
                    streams: k
                        .max_concurrent_streams
                        .map(|n| Arc::new(Semaphore::new(n as usize))),
                    bucket: Mutex::new(Bucket {
                        tokens: f64::from(k.requests_per_minute.unwrap_or(0)),
                        updated: now,
                    }),
                };
                (k.key_sha256, Arc::new(state))
            })
            .collect();
        Self {
            by_hash,
            local: Caller {
                tenant: Arc::from(LOCAL_TENANT),
                key: None,
            },
        }
    }

    /// Whether any key is configured (authentication is on).
    pub fn enabled(&self) -> bool {
        !self.by_hash.is_empty()
    }

    /// The caller behind an `Authorization` header value.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, Unauthenticated> {
        if !self.enabled() {
            return Ok(self.local.clone());
        }
        // The scheme is case-insensitive (RFC 9110 §11.1), and may be followed by more than one
        // space.
        let key = authorization
            .map(str::trim_start)
            .and_then(|h| h.split_once([' ', '\t']))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .filter(|k| !k.is_empty())
            .ok_or(Unauthenticated::Missing)?;
        let state = self
            .by_hash
            .get(&hash_key(key))
            .ok_or(Unauthenticated::Unknown)?;
        Ok(Caller {
            tenant: Arc::from(state.config.tenant.as_str()),
            key: Some(state.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(rpm: Option<u32>, concurrent: Option<u32>) -> (Keys, String) {
        let key = new_key().expect("random");
        let k = Keys::new(&[KeyConfig {
            tenant: "acme".into(),
            key_sha256: hash_key(&key),
            max_concurrent_streams: concurrent,
            requests_per_minute: rpm,
        }]);
        (k, key)
    }

    #[test]
    fn keys_are_random_and_hashed() {
        let (a, b) = (new_key().expect("random"), new_key().expect("random"));
        assert_ne!(a, b);
        assert!(a.starts_with("sk-sluice-") && a.len() == 10 + 64);
        let lines = config_lines("acme", &a);
        assert!(lines.contains(&hex::encode(hash_key(&a))));
        assert!(
            !lines.contains(&a),
            "the config holds the hash, never the key"
        );
    }

    #[test]
    fn without_keys_everyone_is_local() {
        let k = Keys::new(&[]);
        assert!(!k.enabled());
        assert_eq!(&*k.authenticate(None).expect("open").tenant, LOCAL_TENANT);
    }

    #[test]
    fn bearer_keys_map_to_their_tenant() {
        let (k, key) = keys(None, None);
        assert_eq!(
            &*k.authenticate(Some(&format!("Bearer {key}")))
                .expect("valid")
                .tenant,
            "acme"
        );
        assert_eq!(k.authenticate(None).err(), Some(Unauthenticated::Missing));
        assert_eq!(
            k.authenticate(Some("Bearer nope")).err(),
            Some(Unauthenticated::Unknown)
        );
        assert_eq!(
            k.authenticate(Some(&key)).err(),
            Some(Unauthenticated::Missing)
        );
        for scheme in ["bearer", "BEARER", "bEaReR"] {
            assert_eq!(
                &*k.authenticate(Some(&format!("{scheme}  {key}")))
                    .expect("any case")
                    .tenant,
                "acme",
                "{scheme}"
            );
        }
        assert_eq!(
            k.authenticate(Some(&format!("Basic {key}"))).err(),
            Some(Unauthenticated::Missing)
        );
    }

    #[test]
    fn concurrency_is_limited_and_permits_free_their_place() {
        let (k, key) = keys(None, Some(2));
        let c = k
            .authenticate(Some(&format!("Bearer {key}")))
            .expect("valid");
        let a = c.admit().expect("first");
        let _b = c.admit().expect("second");
        assert_eq!(c.admit().err(), Some(Refused::Concurrency { limit: 2 }));
        drop(a);
        assert!(c.admit().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_refills_continuously_and_says_when() {
        let (k, key) = keys(Some(60), None);
        let c = k
            .authenticate(Some(&format!("Bearer {key}")))
            .expect("valid");
        for _ in 0..60 {
            drop(c.admit().expect("within the minute's budget"));
        }
        match c.admit() {
            Err(Refused::Rate {
                per_minute: 60,
                retry_after,
            }) => assert_eq!(retry_after, Duration::from_secs(1)),
            other => panic!("{other:?}"),
        }
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert!(c.admit().is_ok(), "one request per second comes back");
        assert!(c.admit().is_err());
    }
}
