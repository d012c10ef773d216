//! What the store takes and gives: the records of a stream, whatever the backend.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::stream::{Ending, Reason, Status};

/// A stream as it is first recorded, before the upstream is called.
#[derive(Debug, Clone)]
pub struct NewStream {
    /// The stream's id.
    pub id: String,
    /// The tenant it belongs to.
    pub tenant: String,
    /// The model the client asked for.
    pub model: String,
    /// The client's request body as JSON text, as received (holds no secrets: keys travel in
    /// headers). Text rather than a parsed value: the chat API stores the bytes it already
    /// validated instead of cloning their parsed tree and serializing it again.
    pub request: String,
    /// The key it runs under, when keys are configured.
    pub key: Option<StreamKey>,
}

/// The key a stream runs under, and how many streams that key may run at once (see
/// `store/limits.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamKey {
    /// The key's id ([`key_id`](crate::auth::key_id)), never the key.
    pub id: String,
    /// At most this many of the key's streams run at once, across every node.
    pub max_running: Option<u32>,
}

/// A stream's final record.
#[derive(Debug, Clone)]
pub struct Finish {
    /// The stream's id.
    pub id: String,
    /// How it ended.
    pub ending: Ending,
    /// Time to first token, if there was one.
    pub first_token: Option<Duration>,
    /// Total time.
    pub total: Duration,
    /// Token usage, if the upstream reported it.
    pub usage: Option<Value>,
    /// How many chunks were appended.
    pub chunks: u64,
    /// A routed stream's attempts (see [`crate::upstream::route`]).
    pub attempts: Option<Value>,
}

/// One row of the stream list.
#[derive(Debug, Clone, Serialize)]
pub struct StreamSummary {
    /// The stream's id.
    pub id: String,
    /// Always `"sluice.stream"`.
    pub object: &'static str,
    /// The model the client asked for.
    pub model: String,
    /// When it started, Unix seconds.
    pub created: i64,
    /// Its status.
    pub status: Status,
    /// Why it ended, if it ended abnormally.
    pub reason: Option<Reason>,
    /// How many chunks it has.
    pub chunk_count: u64,
    /// Its timings (for a running stream, what is known so far).
    pub timings: Timings,
}

/// A stream's whole transcript.
#[derive(Debug, Clone, Serialize)]
pub struct Transcript {
    /// The stream's id.
    pub id: String,
    /// Always `"sluice.stream"`.
    pub object: &'static str,
    /// The model the client asked for.
    pub model: String,
    /// When it started, Unix seconds.
    pub created: i64,
    /// Its status.
    pub status: Status,
    /// Why it ended, if it ended abnormally.
    pub reason: Option<Reason>,
    /// Details of an abnormal ending (upstream status and message, ...).
    pub detail: Option<String>,
    /// The client's request.
    pub request: Value,
    /// The assembled answer.
    pub content: String,
    /// Every chunk, in order, with its arrival offset.
    pub chunks: Vec<StoredChunk>,
    /// Timings in milliseconds.
    pub timings: Timings,
    /// Token usage, if the upstream reported it.
    pub usage: Option<Value>,
    /// A routed stream's attempts: target, try, start, first token, end, outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Value>,
}

/// A stream's transcript without its chunks: what [`Store::head`](super::Store::head) reads before the chunks are
/// read page by page.
#[derive(Debug, Clone)]
pub struct TranscriptHead {
    /// The stream's id.
    pub id: String,
    /// The model the client asked for.
    pub model: String,
    /// When it started, Unix seconds.
    pub created: i64,
    /// Its status.
    pub status: Status,
    /// Why it ended, if it ended abnormally.
    pub reason: Option<Reason>,
    /// Details of an abnormal ending.
    pub detail: Option<String>,
    /// The client's request, as JSON text.
    pub request: String,
    /// Timings in milliseconds.
    pub timings: Timings,
    /// Token usage, as JSON text, if the upstream reported it.
    pub usage: Option<String>,
    /// A routed stream's attempts, as JSON text.
    pub attempts: Option<String>,
    /// The id of its last stored chunk when the head was read (0 if none).
    pub last_seq: u64,
}

/// One stored chunk as read back, JSON as text.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkRecord {
    /// Its event id (1, 2, ...).
    pub seq: u64,
    /// When it arrived, in ms from the stream's start.
    pub offset_ms: f64,
    /// The chunk JSON as relayed.
    pub data: String,
    /// The text it adds to the answer.
    pub content: String,
}

/// Where a stream stands, for replaying it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamState {
    /// Its status.
    pub status: Status,
    /// Why it ended, if it ended abnormally.
    pub reason: Option<Reason>,
    /// Details of an abnormal ending.
    pub detail: Option<String>,
    /// The id of its last stored chunk (0 if none).
    pub last_seq: u64,
}

impl StreamState {
    /// How it ended, if it has: the ending its terminal event reports.
    pub fn ending(&self) -> Option<Ending> {
        match (self.status, self.reason) {
            (Status::Streaming, _) => None,
            (Status::Completed, _) => Some(Ending::Completed),
            (_, Some(reason)) => Some(Ending::abnormal(
                reason,
                self.detail.clone().unwrap_or_default(),
            )),
            (status, None) => Some(Ending::abnormal(
                if status == Status::Interrupted {
                    Reason::Crash
                } else {
                    Reason::UpstreamError
                },
                self.detail.clone().unwrap_or_default(),
            )),
        }
    }
}

/// One stored chunk.
#[derive(Debug, Clone, Serialize)]
pub struct StoredChunk {
    /// Its event id (1, 2, ...).
    pub seq: u64,
    /// When it arrived, in ms from the stream's start.
    pub offset_ms: f64,
    /// The chunk JSON as relayed.
    pub data: Value,
}

/// A stream's timings.
#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    /// Start to first token, ms.
    pub time_to_first_token_ms: Option<f64>,
    /// Start to end, ms (while streaming: none).
    pub total_ms: Option<f64>,
}

impl Timings {
    /// From the store's microseconds.
    pub(super) fn from_us(first_token_us: Option<i64>, total_us: Option<i64>) -> Self {
        let ms = |us: Option<i64>| us.map(|u| ms(Duration::from_micros(u.max(0) as u64)));
        Self {
            time_to_first_token_ms: ms(first_token_us),
            total_ms: ms(total_us),
        }
    }
}

pub(super) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `d` in milliseconds, to the microsecond: `227.038`, not `227.03799999999998` (which a
/// JSON reader may not read back to the same number).
pub(super) fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}
