//! The vocabulary of one stream, shared by every layer: how it is run ([`Timeouts`],
//! [`OnDisconnect`]) and how it ends ([`Status`], [`Reason`], [`Ending`], [`Terminal`]). A leaf
//! module: it depends on no other module of the crate, so config, store, hub, relay and api can
//! all speak it without depending on each other.
//!
//! The status and reason table of the API:
//!
//! | status | reasons |
//! |---|---|
//! | `streaming` | (still running) |
//! | `completed` | — |
//! | `cancelled` | `client_disconnected`, `slow_client`, `requested` |
//! | `timed_out` | `first_token`, `idle`, `total` |
//! | `failed` | `upstream_error`, `upstream_protocol_error`, `store_error` |
//! | `interrupted` | `shutdown`, `crash` |
//!
//! The cause of an ending travels through the relay as a [`Ending`] value and is stored as these
//! snake_case strings; it is never parsed back out of a message.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_flow::Limit;

/// A tenant, in a lookup of its streams. Every tenant-scoped lookup (the store's and the hub's)
/// takes a [`Tenant`] and a [`StreamId`] rather than two `&str`s, so the two cannot be swapped
/// by mistake: tenant isolation is a security invariant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tenant<'a>(pub &'a str);

/// A stream's id, in a lookup (see [`Tenant`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamId<'a>(pub &'a str);

/// A new stream's id: a time-ordered (v7) UUID, 48 bits of Unix milliseconds then 74 random
/// bits (no counter: two ids of one millisecond share nothing else).
///
/// Time-ordered so that the store's indexes by stream id take new streams at their right edge:
/// with random (v4) ids every new stream, and every block of its chunks, landed on a random index
/// page, and each commit rewrote a page per stream into SQLite's WAL. The random bits come from
/// a thread-local generator seeded by the OS, not from a system call per id.
pub fn new_stream_id() -> String {
    new_stream_uuid().to_string()
}

/// The UUID of a new stream's id (see [`new_stream_id`]), for front doors whose ids carry it in
/// another form (the Responses API's `resp_…`).
pub fn new_stream_uuid() -> uuid::Uuid {
    uuid::Uuid::new_v7(uuid::Timestamp::now(uuid::NoContext))
}

/// A timer's length as configured: whole milliseconds, never zero (a zero timer fires before
/// anything can happen). It deserializes from a positive integer and refuses zero there, so the
/// config file and the per-request `"sluice"` options reject it the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "u64")]
pub struct Millis(std::num::NonZeroU64);

impl TryFrom<u64> for Millis {
    type Error = &'static str;

    fn try_from(ms: u64) -> Result<Self, Self::Error> {
        std::num::NonZeroU64::new(ms)
            .map(Millis)
            .ok_or("must be greater than 0")
    }
}

impl From<Millis> for Duration {
    fn from(ms: Millis) -> Self {
        Duration::from_millis(ms.0.get())
    }
}

/// `value` as a duration, or `default` if it is not given.
pub fn millis_or(value: Option<Millis>, default: Duration) -> Duration {
    value.map_or(default, Duration::from)
}

/// The three stream timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Request start to first token.
    pub first_token: Duration,
    /// Longest silence between tokens.
    pub idle: Duration,
    /// Request start to the end.
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            first_token: Duration::from_secs(30),
            idle: Duration::from_secs(30),
            total: Duration::from_secs(600),
        }
    }
}

/// What happens to a stream when its client disconnects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum OnDisconnect {
    /// Stop the upstream at once: `cancelled(client_disconnected)`.
    #[default]
    Cancel,
    /// Keep generating and recording, so the client can resume (still bounded by the total
    /// deadline).
    Continue,
    /// Keep going for this long waiting for a resumer; with none, cancel.
    GraceMs(u64),
}

/// A stream's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Still running.
    Streaming,
    /// Ended with `[DONE]`.
    Completed,
    /// Stopped because nobody needed the answer any more.
    Cancelled,
    /// A deadline fired.
    TimedOut,
    /// The upstream failed.
    Failed,
    /// The gateway stopped (shutdown or crash) while it ran.
    Interrupted,
}

/// Why a stream ended the way it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The client closed its connection.
    ClientDisconnected,
    /// The client did not read for longer than `slow_client_timeout`.
    SlowClient,
    /// Someone asked for it to stop.
    Requested,
    /// No first token within `first_token_timeout`.
    FirstToken,
    /// No token for `idle_timeout`.
    Idle,
    /// The whole stream took longer than `total_timeout`.
    Total,
    /// The upstream answered with an error, sent an error event, or cut the stream.
    UpstreamError,
    /// The upstream sent something that is not a valid stream.
    UpstreamProtocolError,
    /// The store could not keep the stream's chunks (it was unreachable past the writer's
    /// retries, or refused them): the stream ends rather than go on without a whole transcript.
    StoreError,
    /// The gateway shut down.
    Shutdown,
    /// The gateway's process died; found at the next start.
    Crash,
}

impl Status {
    /// The snake_case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Streaming => "streaming",
            Status::Completed => "completed",
            Status::Cancelled => "cancelled",
            Status::TimedOut => "timed_out",
            Status::Failed => "failed",
            Status::Interrupted => "interrupted",
        }
    }

    /// Parses a stored name.
    pub fn parse(name: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
    }
}

impl Reason {
    /// The snake_case name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::ClientDisconnected => "client_disconnected",
            Reason::SlowClient => "slow_client",
            Reason::Requested => "requested",
            Reason::FirstToken => "first_token",
            Reason::Idle => "idle",
            Reason::Total => "total",
            Reason::UpstreamError => "upstream_error",
            Reason::UpstreamProtocolError => "upstream_protocol_error",
            Reason::StoreError => "store_error",
            Reason::Shutdown => "shutdown",
            Reason::Crash => "crash",
        }
    }

    /// Parses a stored name.
    pub fn parse(name: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(name.to_string())).ok()
    }

    /// The reason for a tripped stream limit.
    pub fn for_limit(limit: Limit) -> Self {
        match limit {
            Limit::FirstItem => Reason::FirstToken,
            Limit::Idle => Reason::Idle,
            Limit::Total => Reason::Total,
        }
    }

    /// The status this reason belongs to.
    pub fn status(&self) -> Status {
        match self {
            Reason::ClientDisconnected | Reason::SlowClient | Reason::Requested => {
                Status::Cancelled
            }
            Reason::FirstToken | Reason::Idle | Reason::Total => Status::TimedOut,
            Reason::UpstreamError | Reason::UpstreamProtocolError | Reason::StoreError => {
                Status::Failed
            }
            Reason::Shutdown | Reason::Crash => Status::Interrupted,
        }
    }
}

/// A stream's final outcome: completed, or a reason (which implies the status) with a detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Ended with `[DONE]`.
    Completed,
    /// Ended abnormally.
    Abnormal {
        /// Why.
        reason: Reason,
        /// A human-readable detail (the upstream's status and message, which limit, ...).
        /// Never holds a secret.
        detail: String,
    },
}

impl Ending {
    /// An abnormal ending.
    pub fn abnormal(reason: Reason, detail: impl Into<String>) -> Self {
        Ending::Abnormal {
            reason,
            detail: detail.into(),
        }
    }

    /// The status.
    pub fn status(&self) -> Status {
        match self {
            Ending::Completed => Status::Completed,
            Ending::Abnormal { reason, .. } => reason.status(),
        }
    }

    /// The reason, if abnormal.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            Ending::Completed => None,
            Ending::Abnormal { reason, .. } => Some(*reason),
        }
    }

    /// The detail, if abnormal.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Ending::Completed => None,
            Ending::Abnormal { detail, .. } => Some(detail),
        }
    }
}

/// How a stream ended, as the client learns it: after every frame, the queue ends (success,
/// with `seq` the id of the `[DONE]` event) or fails with this.
#[derive(Debug, Clone, PartialEq)]
pub struct Terminal {
    /// The id of the terminal event.
    pub seq: u64,
    /// How it ended.
    pub ending: Ending,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_are_v7_uuids_in_time_order_and_never_repeat() {
        let ids: Vec<String> = (0..2000).map(|_| new_stream_id()).collect();
        let parsed: Vec<uuid::Uuid> = ids
            .iter()
            .map(|id| uuid::Uuid::parse_str(id).expect("a UUID"))
            .collect();
        assert!(parsed.iter().all(|u| u.get_version_num() == 7));
        // Ordered by their millisecond (made one after another), not within one.
        let times: Vec<(u64, u32)> = parsed
            .iter()
            .map(|u| u.get_timestamp().expect("v7 has a time").to_unix())
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
    }

    #[test]
    fn names_round_trip_and_reasons_imply_the_table_status() {
        let table = [
            (Reason::ClientDisconnected, "cancelled"),
            (Reason::SlowClient, "cancelled"),
            (Reason::Requested, "cancelled"),
            (Reason::FirstToken, "timed_out"),
            (Reason::Idle, "timed_out"),
            (Reason::Total, "timed_out"),
            (Reason::UpstreamError, "failed"),
            (Reason::UpstreamProtocolError, "failed"),
            (Reason::StoreError, "failed"),
            (Reason::Shutdown, "interrupted"),
            (Reason::Crash, "interrupted"),
        ];
        for (reason, status) in table {
            assert_eq!(reason.status().as_str(), status);
            assert_eq!(Reason::parse(reason.as_str()), Some(reason));
            assert_eq!(
                serde_json::to_value(reason).ok(),
                Some(serde_json::Value::String(reason.as_str().into()))
            );
        }
        assert_eq!(Status::parse("timed_out"), Some(Status::TimedOut));
        assert_eq!(Status::parse("nope"), None);
        assert_eq!(Reason::for_limit(Limit::FirstItem), Reason::FirstToken);
    }
}
