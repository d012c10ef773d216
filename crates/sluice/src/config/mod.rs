//! Configuration: defaults, then the TOML file, then flags and `SLUICE_*` variables.
//!
//! With no file at all sluice listens on 127.0.0.1:8750, keeps its data under `./sluice-data/`
//! and serves the built-in simulated model `sim`. A file adds `[[models]]` and tunes the relay.
//! Unknown keys are errors, and every error names the file, the key and the reason, so a typo
//! never silently falls back to a default.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::auth::KeyConfig;
use crate::redact::Redactor;
use crate::store::PgOptions;
use crate::stream::{millis_or, OnDisconnect, Timeouts};
use crate::upstream::openai::OpenAi;
use crate::upstream::route::Breaker;
use crate::upstream::sim::SimDefaults;
use crate::upstream::{Upstream, UpstreamLimits};

use file::{describe, FileConfig, Kind};

mod file;

/// The host names a keyless (loopback) gateway answers to by default.
pub const DEFAULT_ALLOWED_HOSTS: [&str; 4] = ["localhost", "127.0.0.1", "[::1]", "::1"];

/// Where sluice listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8750";
/// Where sluice keeps its data by default.
pub const DEFAULT_DATA_DIR: &str = "sluice-data";

/// The gateway's whole configuration, resolved and checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// The address to listen on.
    pub listen: SocketAddr,
    /// Where the SQLite database lives.
    pub data_dir: PathBuf,
    /// The PostgreSQL store (`postgres://user@host:port/db`); `None`: SQLite in `data_dir`.
    /// Never logged: it may hold a password.
    pub store_url: Option<String>,
    /// With PostgreSQL: the node's lease and the writer's patience (`[store] lease_ms`,
    /// `retry_ms`).
    pub store_options: PgOptions,
    /// How long a stream (and so a response) is kept after it started, once it has ended
    /// (`[store] retention_hours`); `None`: for good.
    pub retention: Option<Duration>,
    /// The largest request body accepted, in bytes (larger: 413).
    pub max_body_bytes: usize,
    /// How long a client may take to send a request body (longer: 408).
    pub body_timeout: Duration,
    /// How many chunks a stream may buffer between the upstream and a slow client.
    pub buffer_chunks: usize,
    /// How many bytes of chunks a stream may buffer between the upstream and a slow client
    /// (a chunk larger than this still goes through, alone).
    pub buffer_bytes: usize,
    /// Bounds on what upstreams may make sluice hold.
    pub upstream_limits: UpstreamLimits,
    /// Without keys: the host names (of the `Host` header, without port) requests may name.
    /// Loopback names by default, so a web page cannot reach sluice through DNS rebinding.
    pub allowed_hosts: Vec<String>,
    /// Web origins (`https://app.example`) allowed to call the API from a browser. Requests
    /// from any other origin are refused; requests without an `Origin` (curl, SDKs) are not.
    pub cors_origins: Vec<String>,
    /// Replaces upstream keys, and in error messages anything credential-shaped.
    pub redactor: Arc<Redactor>,
    /// How long a client may leave a full buffer unread before it is cut (`slow_client`).
    pub slow_client_timeout: Duration,
    /// How long the upstream may be silent before an SSE keep-alive comment is sent.
    pub keep_alive: Duration,
    /// How long in-flight streams get to finish at shutdown.
    pub shutdown_grace: Duration,
    /// The kernel send buffer of each client connection, in bytes (`None`: the OS tunes it; on
    /// Linux up to 4 MiB per connection). Bounds what a client that stops reading can pin in
    /// kernel memory.
    pub send_buffer_bytes: Option<usize>,
    /// The models clients can ask for.
    pub models: Vec<ModelConfig>,
    /// API keys; none means one local tenant, loopback only.
    pub keys: Vec<KeyConfig>,
    /// Whether chunks are recorded. Off: streams still get their request and final status, but
    /// no chunks (no replay, no resume). For measuring what transcripts cost.
    pub record_chunks: bool,
}

/// One model clients can ask for.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// What clients send as `model`.
    pub name: String,
    /// Where its answers come from.
    pub upstream: Upstream,
    /// The model name sent upstream (default: `name`).
    pub upstream_model: Option<String>,
    /// The default timers; per-request `"sluice"` options override them.
    pub timeouts: Timeouts,
    /// What happens when a client leaves (per-request `"sluice"` options override it).
    pub on_disconnect: OnDisconnect,
}

/// Settings given on the command line or in `SLUICE_*` variables; they win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen` / `SLUICE_LISTEN`.
    pub listen: Option<SocketAddr>,
    /// `--data-dir` / `SLUICE_DATA_DIR`.
    pub data_dir: Option<PathBuf>,
    /// `--store-url` / `SLUICE_STORE_URL`.
    pub store_url: Option<String>,
    /// Where the variables that `api_key_env` names are looked up: `None` is the process's
    /// environment; a map stands in for it (tests, which must not change the environment of a
    /// process whose other threads read it).
    pub env: Option<std::collections::HashMap<String, String>>,
}

impl Overrides {
    /// The value of environment variable `name`, as [`env`](Self::env) says.
    fn env_var(&self, name: &str) -> Option<String> {
        match &self.env {
            None => std::env::var(name).ok(),
            Some(vars) => vars.get(name).cloned(),
        }
    }
}

/// The largest request body or upstream event a config may allow: on SQLite a stream's request
/// and each chunk are journal records, and replay takes a record of up to 64 MiB (a chunk's
/// record holds its JSON and its text), so either may be at most a quarter of that.
pub const MAX_RECORDED_BYTES: usize = 16 * 1024 * 1024;

/// Why the configuration cannot be used. Names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {file}: cannot read it: {reason}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        reason: String,
    },
    /// A key is unknown, missing, or has a bad value.
    #[error("config file {file}: key `{key}`: {reason}")]
    Invalid {
        /// The file (or `<defaults>` for flags).
        file: PathBuf,
        /// The key, as a path (`models[0].base_url`).
        key: String,
        /// Why.
        reason: String,
    },
}

impl Config {
    /// The configuration with no file: defaults plus `overrides`.
    pub fn defaults(overrides: &Overrides) -> Result<Self, ConfigError> {
        Self::build(FileConfig::default(), Path::new("<defaults>"), overrides)
    }

    /// Loads `file` (if given) and applies `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let Some(path) = file else {
            return Self::defaults(overrides);
        };
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            file: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, path, overrides)
    }

    /// Parses TOML `text` as if read from `path`.
    pub fn parse(text: &str, path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let invalid = |key: String, reason: String| ConfigError::Invalid {
            file: path.to_path_buf(),
            key,
            reason,
        };
        let deserializer = toml::de::Deserializer::parse(text)
            .map_err(|e| invalid("(syntax)".into(), describe(text, &e)))?;
        let file: FileConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            invalid(key, describe(text, e.inner()))
        })?;
        Self::build(file, path, overrides)
    }

    fn build(file: FileConfig, path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            file: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        // A stream's request and each chunk are journal records on SQLite (see
        // `MAX_RECORDED_BYTES`).
        let at_most_recorded = |key: &str, n: usize| {
            if n > MAX_RECORDED_BYTES {
                Err(invalid(
                    key,
                    format!(
                        "must be at most {MAX_RECORDED_BYTES} (16 MiB): requests and chunks are \
                         recorded in the store's journal, whose records are bounded"
                    ),
                ))
            } else {
                Ok(n)
            }
        };
        let listen = match (overrides.listen, &file.listen) {
            (Some(addr), _) => addr,
            (None, Some(text)) => text.parse().map_err(|_| {
                invalid(
                    "listen",
                    format!("{text:?} is not an address like {DEFAULT_LISTEN}"),
                )
            })?,
            (None, None) => DEFAULT_LISTEN
                .parse()
                .map_err(|_| invalid("listen", "the built-in default is invalid".into()))?,
        };
        let upstream_limits = UpstreamLimits {
            max_event_bytes: match file.max_event_bytes {
                Some(0) => return Err(invalid("max_event_bytes", "must be greater than 0".into())),
                Some(n) => at_most_recorded("max_event_bytes", n)?,
                None => UpstreamLimits::default().max_event_bytes,
            },
            ..UpstreamLimits::default()
        };
        let mut models = Vec::new();
        let mut traits = HashMap::new();
        let mut names = HashSet::new();
        for (i, m) in file.models.into_iter().enumerate() {
            let key = |k: &str| format!("models[{i}].{k}");
            if m.name.trim().is_empty() {
                return Err(invalid(&key("name"), "must not be empty".into()));
            }
            if !names.insert(m.name.clone()) {
                return Err(invalid(
                    &key("name"),
                    format!("{:?} is defined twice", m.name),
                ));
            }
            let defaults = Timeouts::default();
            let timeouts = Timeouts {
                first_token: millis_or(m.first_token_timeout_ms, defaults.first_token),
                idle: millis_or(m.idle_timeout_ms, defaults.idle),
                total: millis_or(m.total_timeout_ms, defaults.total),
            };
            if m.breaker_failures == Some(0) {
                return Err(invalid(
                    &key("breaker_failures"),
                    "must be greater than 0".into(),
                ));
            }
            traits.insert(
                m.name.clone(),
                routes::TargetTraits {
                    // The simulated model can always continue an answer.
                    can_continue: m.kind == Kind::Sim || m.continue_partial == Some(true),
                    breaker: Arc::new(Breaker::new(
                        &m.name,
                        m.breaker_failures
                            .unwrap_or(routes::DEFAULT_BREAKER_FAILURES),
                        millis_or(m.breaker_open_ms, routes::DEFAULT_BREAKER_OPEN),
                    )),
                },
            );
            let upstream = match m.kind {
                Kind::Sim => {
                    for (k, set) in [
                        ("base_url", m.base_url.is_some()),
                        ("api_key_env", m.api_key_env.is_some()),
                        ("headers", !m.headers.is_empty()),
                        ("http_version", m.http_version.is_some()),
                        ("continue_partial", m.continue_partial.is_some()),
                    ] {
                        if set {
                            return Err(invalid(
                                &key(k),
                                "only applies to kind = \"openai\"".into(),
                            ));
                        }
                    }
                    Upstream::Sim(m.sim.unwrap_or_default())
                }
                Kind::Openai | Kind::Anthropic => {
                    if m.kind == Kind::Anthropic && m.continue_partial.is_some() {
                        return Err(invalid(
                            &key("continue_partial"),
                            "only applies to kind = \"openai\"".into(),
                        ));
                    }
                    if m.sim.is_some() {
                        return Err(invalid(
                            &key("sim"),
                            "only applies to kind = \"sim\"".into(),
                        ));
                    }
                    let base_url = m.base_url.ok_or_else(|| {
                        invalid(
                            &key("base_url"),
                            "is required for kind = \"openai\" and \"anthropic\"".into(),
                        )
                    })?;
                    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
                        return Err(invalid(
                            &key("base_url"),
                            format!("{base_url:?} is not an http(s) URL"),
                        ));
                    }
                    let api_key = match &m.api_key_env {
                        None => None,
                        Some(var) => Some(overrides.env_var(var).ok_or_else(|| {
                            invalid(
                                &key("api_key_env"),
                                format!("the environment variable {var} is not set"),
                            )
                        })?),
                    };
                    let headers: Vec<(String, String)> = m.headers.into_iter().collect();
                    let client = OpenAi::new(&base_url, api_key, &headers, upstream_limits)
                        .and_then(|c| c.http_version(m.http_version.unwrap_or_default()))
                        .map_err(|e| {
                            let field = match e {
                                crate::upstream::openai::OpenAiConfigError::Url(_) => "base_url",
                                _ => "headers",
                            };
                            invalid(&key(field), e.to_string())
                        })?;
                    Upstream::OpenAi(if m.kind == Kind::Anthropic {
                        client.anthropic()
                    } else {
                        client
                    })
                }
            };
            models.push(ModelConfig {
                name: m.name,
                upstream,
                upstream_model: m.upstream_model,
                timeouts,
                on_disconnect: m.on_disconnect.unwrap_or_default(),
            });
        }
        // The built-in test model is served without configuration only to a local, keyless
        // gateway: with keys, a model that costs nothing upstream but fills the store must be
        // asked for by name.
        if !names.contains("sim") && file.keys.is_empty() {
            traits.insert(
                "sim".to_string(),
                routes::TargetTraits {
                    can_continue: true,
                    breaker: Arc::new(Breaker::new(
                        "sim",
                        routes::DEFAULT_BREAKER_FAILURES,
                        routes::DEFAULT_BREAKER_OPEN,
                    )),
                },
            );
            models.push(ModelConfig {
                name: "sim".into(),
                upstream: Upstream::Sim(SimDefaults::default()),
                upstream_model: None,
                timeouts: Timeouts::default(),
                on_disconnect: OnDisconnect::default(),
            });
        }
        let routed = routes::build(file.routes, &models, &traits)
            .map_err(|(key, reason)| invalid(&key, reason))?;
        models.extend(routed);
        let mut keys = Vec::new();
        for (i, k) in file.keys.into_iter().enumerate() {
            let key = |k: &str| format!("keys[{i}].{k}");
            if k.tenant.trim().is_empty() {
                return Err(invalid(&key("tenant"), "must not be empty".into()));
            }
            let mut hash = [0u8; 32];
            hex::decode_to_slice(k.key_sha256.trim(), &mut hash).map_err(|_| {
                invalid(
                    &key("key_sha256"),
                    "must be the 64 hex digits of the key's SHA-256 (sluice keys new prints it)"
                        .into(),
                )
            })?;
            if keys.iter().any(|c: &KeyConfig| c.key_sha256 == hash) {
                return Err(invalid(
                    &key("key_sha256"),
                    "this key is configured twice".into(),
                ));
            }
            for (name, value) in [
                ("max_concurrent_streams", k.max_concurrent_streams),
                ("requests_per_minute", k.requests_per_minute),
            ] {
                if value == Some(0) {
                    return Err(invalid(&key(name), "must be greater than 0".into()));
                }
            }
            keys.push(KeyConfig {
                tenant: k.tenant,
                key_sha256: hash,
                max_concurrent_streams: k.max_concurrent_streams,
                requests_per_minute: k.requests_per_minute,
            });
        }
        for (i, origin) in file.cors_origins.iter().enumerate() {
            let rest = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            let ok = origin == "*"
                || rest.is_some_and(|r| {
                    let host = r.trim_end_matches('/');
                    !host.is_empty() && !host.contains(['/', '?', '#', ' '])
                });
            if !ok {
                return Err(invalid(
                    &format!("cors_origins[{i}]"),
                    format!("{origin:?} is not an origin like https://app.example"),
                ));
            }
        }
        let redactor = Arc::new(Redactor::new(models.iter().filter_map(
            |m| match &m.upstream {
                Upstream::OpenAi(o) => o.api_key(),
                Upstream::Sim(_) | Upstream::Route(_) => None,
            },
        )));
        Ok(Config {
            keys,
            redactor,
            upstream_limits,
            allowed_hosts: file.allowed_hosts.unwrap_or_else(|| {
                DEFAULT_ALLOWED_HOSTS
                    .iter()
                    .map(|h| h.to_string())
                    .collect()
            }),
            cors_origins: file
                .cors_origins
                .into_iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            body_timeout: millis_or(file.body_timeout_ms, Duration::from_secs(30)),
            buffer_bytes: file.buffer_bytes.unwrap_or(1 << 20).max(1),
            record_chunks: file.record_chunks.unwrap_or(true),
            listen,
            retention: match file.store.as_ref().and_then(|s| s.retention_hours) {
                Some(0) => {
                    return Err(invalid(
                        "store.retention_hours",
                        "must be greater than 0 (leave it out to keep streams for good)".into(),
                    ))
                }
                hours => hours.map(|h| Duration::from_secs(h.saturating_mul(3600))),
            },
            store_options: PgOptions {
                lease: millis_or(
                    file.store.as_ref().and_then(|s| s.lease_ms),
                    crate::store::DEFAULT_LEASE,
                ),
                retry: millis_or(
                    file.store.as_ref().and_then(|s| s.retry_ms),
                    crate::store::DEFAULT_RETRY,
                ),
            },
            store_url: match overrides
                .store_url
                .clone()
                .or(file.store.and_then(|s| s.url))
            {
                Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                    Some(url)
                }
                Some(_) => {
                    return Err(invalid(
                        "store.url",
                        "must be a postgres:// or postgresql:// URL".into(),
                    ))
                }
                None => None,
            },
            data_dir: overrides
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            max_body_bytes: at_most_recorded(
                "max_body_bytes",
                file.max_body_bytes.unwrap_or(1 << 20),
            )?
            .max(1),
            buffer_chunks: file.buffer_chunks.unwrap_or(64).max(1),
            slow_client_timeout: millis_or(file.slow_client_timeout_ms, Duration::from_secs(30)),
            keep_alive: millis_or(file.keep_alive_ms, Duration::from_secs(15)),
            shutdown_grace: Duration::from_millis(file.shutdown_grace_ms.unwrap_or(10_000)),
            send_buffer_bytes: file.send_buffer_bytes,
            models,
        })
    }

    /// The model called `name`.
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }
}

mod routes;
#[cfg(test)]
mod tests;
