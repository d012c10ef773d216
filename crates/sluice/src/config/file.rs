//! The config file's shape, exactly as TOML spells it: every key optional (defaults are applied
//! by [`Config`](super::Config)), unknown keys refused.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::stream::{Millis, OnDisconnect};
use crate::upstream::sim::SimDefaults;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) listen: Option<String>,
    pub(super) data_dir: Option<PathBuf>,
    pub(super) max_body_bytes: Option<usize>,
    pub(super) body_timeout_ms: Option<Millis>,
    pub(super) buffer_chunks: Option<usize>,
    pub(super) buffer_bytes: Option<usize>,
    pub(super) max_event_bytes: Option<usize>,
    pub(super) allowed_hosts: Option<Vec<String>>,
    #[serde(default)]
    pub(super) cors_origins: Vec<String>,
    pub(super) slow_client_timeout_ms: Option<Millis>,
    pub(super) keep_alive_ms: Option<Millis>,
    pub(super) shutdown_grace_ms: Option<u64>,
    pub(super) send_buffer_bytes: Option<usize>,
    pub(super) record_chunks: Option<bool>,
    #[serde(default)]
    pub(super) models: Vec<FileModel>,
    #[serde(default)]
    pub(super) keys: Vec<FileKey>,
    pub(super) store: Option<FileStore>,
    #[serde(default)]
    pub(super) routes: Vec<FileRoute>,
}

/// `[[routes]]`: one model name over several models.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRoute {
    pub(super) name: String,
    pub(super) strategy: crate::upstream::route::Strategy,
    pub(super) targets: Vec<String>,
    pub(super) total_timeout_ms: Option<Millis>,
    pub(super) idle_timeout_ms: Option<Millis>,
    pub(super) hedge_after_ms: Option<Millis>,
    pub(super) retries: Option<u32>,
    pub(super) retry_backoff_ms: Option<Millis>,
    pub(super) on_disconnect: Option<OnDisconnect>,
}

/// `[store]`: where streams are kept when not in the SQLite file of `data_dir`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileStore {
    pub(super) url: Option<String>,
    pub(super) lease_ms: Option<Millis>,
    pub(super) retry_ms: Option<Millis>,
    pub(super) retention_hours: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileKey {
    pub(super) tenant: String,
    pub(super) key_sha256: String,
    pub(super) max_concurrent_streams: Option<u32>,
    pub(super) requests_per_minute: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileModel {
    pub(super) name: String,
    pub(super) kind: Kind,
    pub(super) base_url: Option<String>,
    pub(super) api_key_env: Option<String>,
    #[serde(default)]
    pub(super) headers: BTreeMap<String, String>,
    pub(super) upstream_model: Option<String>,
    pub(super) http_version: Option<crate::upstream::pool::HttpVersion>,
    pub(super) first_token_timeout_ms: Option<Millis>,
    pub(super) idle_timeout_ms: Option<Millis>,
    pub(super) total_timeout_ms: Option<Millis>,
    pub(super) on_disconnect: Option<OnDisconnect>,
    pub(super) sim: Option<SimDefaults>,
    pub(super) continue_partial: Option<bool>,
    pub(super) breaker_failures: Option<u32>,
    pub(super) breaker_open_ms: Option<Millis>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Kind {
    Openai,
    Anthropic,
    Sim,
}

/// A TOML error's message with its line number.
pub(super) fn describe(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().to_string();
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].lines().count().max(1);
            format!("{message} (line {line})")
        }
        None => message,
    }
}
