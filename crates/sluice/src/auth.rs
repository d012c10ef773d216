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
//! per minute (a token bucket that refills continuously). The store counts both (see
//! `store/limits.rs`), so they hold across every node sharing it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::store::{Store, StoreError, StreamKey};

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

/// Who is calling: their tenant, and their key's limits.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The tenant.
    pub tenant: Arc<str>,
    key: Option<Arc<Key>>,
}

/// A configured key, as a caller holds it.
#[derive(Debug)]
struct Key {
    /// [`key_id`] of the key.
    id: String,
    config: KeyConfig,
}

/// A key's id: the first 16 hex digits of its SHA-256 (as in the configuration). It names the
/// key in the store, where its limits are counted; the key itself is never stored.
pub fn key_id(key_sha256: &[u8; 32]) -> String {
    hex::encode(&key_sha256[..8])
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

impl Caller {
    /// The key a new stream of this caller runs under, with its limit of running streams (the
    /// store holds that limit: see [`Store::begin`](crate::store::Store::begin)). `None`
    /// without keys.
    pub fn stream_key(&self) -> Option<StreamKey> {
        self.key.as_ref().map(|k| StreamKey {
            id: k.id.clone(),
            max_running: k.config.max_concurrent_streams,
        })
    }

    /// Takes one of the key's requests per minute, counted in `store` (so across every node
    /// sharing it). `Ok(Err(..))`: refused, with when to try again.
    pub async fn take_request(&self, store: &Store) -> Result<Result<(), Refused>, StoreError> {
        let Some((key, per_minute)) = self
            .key
            .as_ref()
            .and_then(|k| Some((k, k.config.requests_per_minute?)))
        else {
            return Ok(Ok(()));
        };
        Ok(match store.take_request(&key.id, per_minute).await? {
            None => Ok(()),
            Some(retry_after) => Err(Refused::Rate {
                per_minute,
                retry_after,
            }),
        })
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
    by_hash: HashMap<[u8; 32], Arc<Key>>,
    local: Caller,
}

impl Keys {
    /// The keys from the configuration.
    pub fn new(keys: &[KeyConfig]) -> Self {
        let by_hash = keys
            .iter()
            .map(|k| {
                let key = Key {
                    id: key_id(&k.key_sha256),
                    config: k.clone(),
                };
                (k.key_sha256, Arc::new(key))
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
        // The scheme is case-insensitive (RFC 9110 §11.1), and may be followed by more than one
        // space.
        let key = authorization
            .map(str::trim_start)
            .and_then(|h| h.split_once([' ', '\t']))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key);
        self.authenticate_key(key)
    }

    /// The caller behind a bare key (Anthropic's `x-api-key` header value).
    pub fn authenticate_key(&self, key: Option<&str>) -> Result<Caller, Unauthenticated> {
        if !self.enabled() {
            return Ok(self.local.clone());
        }
        let key = key
            .map(str::trim)
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
    fn a_caller_names_its_key_by_id_never_by_the_key() {
        let key = new_key().expect("random");
        let k = Keys::new(&[KeyConfig {
            tenant: "acme".into(),
            key_sha256: hash_key(&key),
            max_concurrent_streams: Some(3),
            requests_per_minute: None,
        }]);
        let caller = k
            .authenticate(Some(&format!("Bearer {key}")))
            .expect("valid");
        let sk = caller.stream_key().expect("a key");
        assert_eq!(sk.id, hex::encode(hash_key(&key))[..16]);
        assert!(!key.contains(&sk.id));
        assert_eq!(sk.max_running, Some(3));
        assert_eq!(
            Keys::new(&[])
                .authenticate(None)
                .expect("open")
                .stream_key(),
            None
        );
    }
}
