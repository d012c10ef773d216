//! The built-in simulated model: deterministic answers, timings and faults on demand.
//!
//! Used for first runs, demos and tests, in-process (`kind = "sim"`) or over real HTTP
//! (`sluice mock-upstream`). A request controls it with the body field `"sim"`:
//!
//! | field | meaning |
//! |---|---|
//! | `tokens` | how many tokens the answer has |
//! | `first_token_ms` | delay before the first token |
//! | `token_interval_ms` | delay between tokens |
//! | `stall_after` | after N tokens, go silent (never end) |
//! | `fail_after` | after N tokens, send an error event |
//! | `drop_after` | after N tokens, cut the connection with no `[DONE]` |
//! | `garbage_after` | after N tokens, send malformed SSE |
//! | `http_status` | answer with this HTTP error status before streaming |
//! | `tool_call` | after the text, call the request's first tool, and finish with `tool_calls` (in-process only) |
//!
//! Fields left out take the model's defaults (`[[models]] sim = {...}` or mock-upstream's flags).
//!
//! It is a test model, and it is bounded like one: in-process, a request may ask for at most
//! `max_tokens` tokens (default 10,000; more is a 400 naming `sim.tokens`), and the answer is paced
//! to at most `max_tokens_per_second` (default 1,000), so one request cannot fill the store at
//! memory speed. With API keys configured, `sim` is served only when the config names it.

use std::time::Duration;

use async_stream::stream;
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Chunk, ChunkStream, Payload, UpstreamError, UpstreamRequest};

/// The per-request `"sim"` field. Every field is optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimParams {
    /// How many tokens the answer has.
    pub tokens: Option<u32>,
    /// Delay before the first token, in ms.
    pub first_token_ms: Option<u64>,
    /// Delay between tokens, in ms.
    pub token_interval_ms: Option<u64>,
    /// After this many tokens, go silent.
    pub stall_after: Option<u32>,
    /// After this many tokens, send an error event.
    pub fail_after: Option<u32>,
    /// After this many tokens, cut the connection.
    pub drop_after: Option<u32>,
    /// After this many tokens, send malformed SSE.
    pub garbage_after: Option<u32>,
    /// Answer with this HTTP error status.
    pub http_status: Option<u16>,
    /// After the text, call the request's first tool (arguments `{"query":"sluice"}`, in three
    /// pieces), and finish with `tool_calls` (in-process `sim` models only).
    pub tool_call: Option<bool>,
}

/// A simulated model's defaults for `tokens`, `first_token_ms` and `token_interval_ms`, and its
/// caps (which bind the in-process model; `mock-upstream`, a test peer, ignores them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimDefaults {
    /// How many tokens an answer has.
    pub tokens: u32,
    /// Delay before the first token, in ms.
    pub first_token_ms: u64,
    /// Delay between tokens, in ms.
    pub token_interval_ms: u64,
    /// The most tokens a request may ask for.
    pub max_tokens: u32,
    /// The fastest an answer is sent, in tokens per second.
    pub max_tokens_per_second: u32,
    /// Faults every answer has unless the request says otherwise (a flaky model to route
    /// around): after N tokens, send an error event.
    pub fail_after: Option<u32>,
    /// After N tokens, go silent.
    pub stall_after: Option<u32>,
    /// After N tokens, cut the connection.
    pub drop_after: Option<u32>,
    /// Answer with this HTTP error status.
    pub http_status: Option<u16>,
}

impl Default for SimDefaults {
    fn default() -> Self {
        Self {
            tokens: 16,
            first_token_ms: 50,
            token_interval_ms: 20,
            max_tokens: 10_000,
            max_tokens_per_second: 1_000,
            fail_after: None,
            stall_after: None,
            drop_after: None,
            http_status: None,
        }
    }
}

impl SimDefaults {
    /// `p` with the faults it leaves out taken from these defaults.
    pub fn faults_into(&self, mut p: SimParams) -> SimParams {
        p.fail_after = p.fail_after.or(self.fail_after);
        p.stall_after = p.stall_after.or(self.stall_after);
        p.drop_after = p.drop_after.or(self.drop_after);
        p.http_status = p.http_status.or(self.http_status);
        p
    }
}

/// How many tokens of its answer a request already holds: when the last message is the
/// assistant's and `continue_final_message` is true (vLLM's flag, which routes send to continue
/// a half-finished answer), the number of leading tokens whose text that message is made of.
/// The answer then continues from there, so the two halves read as one answer.
pub fn continued_from(body: &serde_json::Map<String, Value>) -> u32 {
    if body.get("continue_final_message").and_then(Value::as_bool) != Some(true) {
        return 0;
    }
    let Some(last) = body
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
    else {
        return 0;
    };
    let mut partial = last.get("content").and_then(Value::as_str).unwrap_or("");
    let mut n = 0;
    while let Some(rest) = partial.strip_prefix(token_text(n)) {
        partial = rest;
        n += 1;
    }
    n
}

/// Why a request's `"sim"` field is refused: the field (`sim.tokens`) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimFieldError {
    /// The field, as `sim.NAME` (or `sim` for the whole object).
    pub param: String,
    /// Why.
    pub message: String,
}

/// Reads and checks the `"sim"` field of a request to the in-process model `defaults`.
pub fn checked_params(
    defaults: &SimDefaults,
    body: &serde_json::Map<String, Value>,
) -> Result<SimParams, SimFieldError> {
    let p = match body.get("sim") {
        None | Some(Value::Null) => SimParams::default(),
        Some(v) => serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            SimFieldError {
                param: if path == "." {
                    "sim".into()
                } else {
                    format!("sim.{path}")
                },
                message: format!("invalid sim field: {}", e.inner()),
            }
        })?,
    };
    let tokens = p.tokens.unwrap_or(defaults.tokens);
    if tokens > defaults.max_tokens {
        return Err(SimFieldError {
            param: "sim.tokens".into(),
            message: format!(
                "the simulated model answers with at most {} tokens (max_tokens)",
                defaults.max_tokens
            ),
        });
    }
    Ok(p)
}

/// One step of a simulated answer, after its delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimStep {
    /// A token of text.
    Token(String),
    /// Send an error event and end.
    Fail,
    /// Cut the connection.
    Drop,
    /// Send malformed SSE and end.
    Garbage,
    /// The answer is complete: final chunk, then `[DONE]`.
    Finish,
}

/// Reads the `"sim"` field of a request body (absent: all defaults).
pub fn params(body: &serde_json::Map<String, Value>) -> Result<SimParams, String> {
    match body.get("sim") {
        None | Some(Value::Null) => Ok(SimParams::default()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| e.to_string()),
    }
}

const WORDS: [&str; 16] = [
    "Hello",
    " from",
    " sluice",
    "'s",
    " simulated",
    " model",
    ":",
    " every",
    " token",
    " arrives",
    " on",
    " time",
    ",",
    " naïve",
    " 世界",
    " 🙂",
];

/// The text of token `i`: deterministic, with multi-byte characters among them.
pub fn token_text(i: u32) -> &'static str {
    WORDS[i as usize % WORDS.len()]
}

/// The steps of an answer from token `from` on (0: the whole answer), each after its delay.
/// Stalls never end.
pub fn steps(defaults: SimDefaults, p: SimParams, from: u32) -> impl Stream<Item = SimStep> + Send {
    let tokens = p.tokens.unwrap_or(defaults.tokens);
    let first = Duration::from_millis(p.first_token_ms.unwrap_or(defaults.first_token_ms));
    let interval = Duration::from_millis(p.token_interval_ms.unwrap_or(defaults.token_interval_ms));
    stream! {
        for i in from.min(tokens)..=tokens {
            // Faults trigger after `i` tokens; the earliest-numbered wins.
            if p.stall_after == Some(i) {
                std::future::pending::<()>().await;
            }
            if p.fail_after == Some(i) {
                yield SimStep::Fail;
                return;
            }
            if p.drop_after == Some(i) {
                yield SimStep::Drop;
                return;
            }
            if p.garbage_after == Some(i) {
                yield SimStep::Garbage;
                return;
            }
            if i == tokens {
                break;
            }
            let delay = if i == from { first } else { interval };
            // A zero delay must not wait for the timer's next tick (a millisecond).
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            yield SimStep::Token(token_text(i).to_string());
        }
        yield SimStep::Finish;
    }
}

/// A `chat.completion.chunk` JSON with `content` (or, for the last chunk, a finish reason and
/// usage).
pub fn chunk_json(id: &str, model: &str, content: Option<&str>, usage: Option<Value>) -> String {
    let (delta, finish) = match content {
        Some(text) => (json!({ "content": text }), Value::Null),
        None => (json!({}), json!("stop")),
    };
    let mut chunk = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": unix_now(),
        "model": model,
        "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
    });
    if let (Some(usage), Some(obj)) = (usage, chunk.as_object_mut()) {
        obj.insert("usage".into(), usage);
    }
    chunk.to_string()
}

/// The chunks of a simulated call of tool `name` (its first chunk names it; the arguments come
/// in pieces), then the last chunk, finishing with `tool_calls`, carrying `usage`.
pub fn tool_call_chunks(id: &str, model: &str, name: &str, usage: Value) -> Vec<String> {
    let call_id = format!("call_{}", uuid::Uuid::new_v4().simple());
    let pieces = ["", "{\"query\":", "\"sluice\"", "}"];
    let mut out: Vec<String> = pieces
        .iter()
        .enumerate()
        .map(|(i, args)| {
            let call = if i == 0 {
                json!({"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
            } else {
                json!({"index": 0, "function": {"arguments": args}})
            };
            json!({
                "id": id, "object": "chat.completion.chunk", "created": unix_now(), "model": model,
                "choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": null}],
            })
            .to_string()
        })
        .collect();
    out.push(
        json!({
            "id": id, "object": "chat.completion.chunk", "created": unix_now(), "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
            "usage": usage,
        })
        .to_string(),
    );
    out
}

/// The usage object for an answer of `completion` tokens to `body`'s messages.
pub fn usage(body: &serde_json::Map<String, Value>, completion: u32) -> Value {
    let prompt = body
        .get("messages")
        .and_then(Value::as_array)
        .map(|m| {
            m.iter()
                .filter_map(|m| m.get("content").and_then(Value::as_str))
                .map(|c| c.split_whitespace().count() as u64)
                .sum::<u64>()
        })
        .unwrap_or(0);
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + u64::from(completion),
    })
}

/// The error message the simulated model sends for `fail_after`.
pub const FAIL_MESSAGE: &str = "simulated upstream failure (fail_after)";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The in-process simulated model as a [`ChunkStream`].
pub fn open(defaults: SimDefaults, request: UpstreamRequest) -> ChunkStream {
    // Take what the answer needs now, so the request body is not held for the stream's life.
    let params = params(&request.body);
    let model = request
        .body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("sim")
        .to_string();
    let from = continued_from(&request.body);
    // The tool a `tool_call` answer calls: the request's first.
    let tool = request
        .body
        .get("tools")
        .and_then(|t| t[0]["function"]["name"].as_str())
        .unwrap_or("tool")
        .to_string();
    let prompt_tokens = usage(&request.body, 0)["prompt_tokens"]
        .as_u64()
        .unwrap_or(0);
    drop(request);
    // What the answer needs is settled here and the steps boxed, outside the generator: a value
    // a generator captures and then binds again takes its room twice, for the stream's life.
    let mut p = match params {
        Ok(p) => defaults.faults_into(p),
        Err(e) => {
            return refusal(UpstreamError::Status {
                status: 400,
                message: format!("invalid sim field: {e}"),
                retry_after: None,
            })
        }
    };
    if let Some(status) = p.http_status {
        return refusal(UpstreamError::Status {
            status,
            message: format!("simulated HTTP {status}"),
            retry_after: None,
        });
    }
    p.tokens = Some(p.tokens.unwrap_or(defaults.tokens).min(defaults.max_tokens));
    let answer = Answer {
        id: format!("chatcmpl-sim-{}", uuid::Uuid::new_v4().simple()),
        model,
        tool,
        prompt_tokens,
        // Paced: token n goes out no earlier than n / max_tokens_per_second after the first.
        pace: Duration::from_secs(1) / defaults.max_tokens_per_second.max(1),
        tool_call: p.tool_call == Some(true),
    };
    let mut steps = Box::pin(steps(defaults, p, from));
    Box::pin(stream! {
        let mut paced_from: Option<tokio::time::Instant> = None;
        let mut count = 0u32;
        while let Some(step) = futures_util::StreamExt::next(&mut steps).await {
            match step {
                SimStep::Token(text) => {
                    let from = *paced_from.get_or_insert_with(tokio::time::Instant::now);
                    let due = from + answer.pace * count;
                    // Sleep only when a millisecond or more ahead: the timer's resolution.
                    // Boxed: pacing is rare, and inline its timer would be in every stream.
                    if due > tokio::time::Instant::now() + Duration::from_millis(1) {
                        Box::pin(tokio::time::sleep_until(due)).await;
                    }
                    count += 1;
                    match parsed(chunk_json(&answer.id, &answer.model, Some(&text), None)) {
                        Some(Ok(c)) => yield Ok(c),
                        Some(Err(e)) => { yield Err(e); return; }
                        None => {}
                    }
                }
                SimStep::Fail => { yield Err(UpstreamError::ErrorEvent { message: FAIL_MESSAGE.into() }); return; }
                SimStep::Drop => { yield Err(UpstreamError::Truncated); return; }
                SimStep::Garbage => { yield Err(UpstreamError::Protocol("a chunk is not JSON (garbage_after)".into())); return; }
                SimStep::Finish => {
                    let usage = json!({
                        "prompt_tokens": answer.prompt_tokens,
                        "completion_tokens": count,
                        "total_tokens": answer.prompt_tokens + u64::from(count),
                    });
                    let last = if answer.tool_call {
                        tool_call_chunks(&answer.id, &answer.model, &answer.tool, usage)
                    } else {
                        vec![chunk_json(&answer.id, &answer.model, None, Some(usage))]
                    };
                    for data in last {
                        if let Some(Ok(c)) = parsed(data) {
                            yield Ok(c);
                        }
                    }
                    return;
                }
            }
        }
    })
}

/// What a simulated answer says besides its steps.
struct Answer {
    id: String,
    model: String,
    /// The tool a `tool_call` answer calls.
    tool: String,
    prompt_tokens: u64,
    /// The least time between two tokens.
    pace: Duration,
    tool_call: bool,
}

/// A chunk of the simulated model's own making, parsed as any upstream's is (`None` for
/// `[DONE]`).
fn parsed(data: String) -> Option<Result<Chunk, UpstreamError>> {
    match Payload::parse_owned(data) {
        Ok(Payload::Chunk(c)) => Some(Ok(c)),
        Ok(Payload::Done) => None,
        Err(e) => Some(Err(e)),
    }
}

/// A stream of one error: the simulated model refusing the request.
fn refusal(e: UpstreamError) -> ChunkStream {
    Box::pin(futures_util::stream::once(std::future::ready(Err(e))))
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]
mod tests {
    use super::*;
    use crate::upstream::Chunk;
    use futures_util::StreamExt;
    use tokio::time::Instant;

    fn body(sim: Value) -> UpstreamRequest {
        let mut b = serde_json::Map::new();
        b.insert("model".into(), json!("sim"));
        b.insert(
            "messages".into(),
            json!([{"role": "user", "content": "two words"}]),
        );
        b.insert("sim".into(), sim);
        UpstreamRequest { body: b }
    }

    #[tokio::test(start_paused = true)]
    async fn answers_on_schedule_and_finishes_with_usage() {
        let start = Instant::now();
        let s = open(
            SimDefaults::default(),
            body(json!({"tokens": 3, "first_token_ms": 100, "token_interval_ms": 10})),
        );
        let got: Vec<_> = s.collect().await;
        assert_eq!(start.elapsed(), Duration::from_millis(120));
        let chunks: Vec<Chunk> = got.into_iter().map(|c| c.expect("ok")).collect();
        let text: String = chunks.iter().map(|c| c.content.as_str()).collect();
        assert_eq!(text, "Hello from sluice");
        let last = chunks.last().expect("a last chunk");
        assert_eq!(last.finish_reason.as_deref(), Some("stop"));
        assert_eq!(
            last.usage
                .as_ref()
                .and_then(|u| u.get("total_tokens"))
                .and_then(Value::as_u64),
            Some(5)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn faults() {
        for (sim, expect) in [
            (
                json!({"fail_after": 2}),
                UpstreamError::ErrorEvent {
                    message: FAIL_MESSAGE.into(),
                },
            ),
            (json!({"drop_after": 1}), UpstreamError::Truncated),
            (
                json!({"http_status": 429}),
                UpstreamError::Status {
                    status: 429,
                    message: "simulated HTTP 429".into(),
                    retry_after: None,
                },
            ),
        ] {
            let got: Vec<_> = open(SimDefaults::default(), body(sim)).collect().await;
            assert_eq!(got.last(), Some(&Err(expect)));
            assert!(got[..got.len() - 1].iter().all(Result::is_ok));
        }
        let got: Vec<_> = open(SimDefaults::default(), body(json!({"garbage_after": 0})))
            .collect()
            .await;
        assert!(matches!(got.as_slice(), [Err(UpstreamError::Protocol(_))]));
    }

    #[tokio::test(start_paused = true)]
    async fn stall_never_ends() {
        let mut s = open(SimDefaults::default(), body(json!({"stall_after": 1})));
        assert!(matches!(s.next().await, Some(Ok(_))));
        let next = tokio::time::timeout(Duration::from_secs(3600), s.next()).await;
        assert!(next.is_err(), "silent for an hour and counting");
    }

    #[test]
    fn unknown_sim_fields_are_errors() {
        let b = body(json!({"tokenz": 3})).body;
        assert!(params(&b).is_err());
    }

    #[test]
    fn checked_params_name_the_field_and_cap_tokens() {
        let d = SimDefaults::default();
        let param = |sim: Value| checked_params(&d, &body(sim).body).err().map(|e| e.param);
        assert_eq!(param(json!({"tokens": "many"})), Some("sim.tokens".into()));
        assert_eq!(
            param(json!({"stall_after": -1})),
            Some("sim.stall_after".into())
        );
        assert_eq!(param(json!({"tokenz": 1})), Some("sim.tokenz".into()));
        assert_eq!(param(json!([1])), Some("sim".into()));
        assert_eq!(param(json!({"tokens": 10_001})), Some("sim.tokens".into()));
        assert_eq!(param(json!({"tokens": 10_000})), None);
        assert_eq!(param(json!(null)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn answers_are_paced_and_capped() {
        let d = SimDefaults {
            max_tokens: 500,
            max_tokens_per_second: 100,
            ..SimDefaults::default()
        };
        let start = Instant::now();
        let got: Vec<_> = open(
            d,
            body(json!({"tokens": 1_000_000, "first_token_ms": 0, "token_interval_ms": 0})),
        )
        .collect()
        .await;
        // 500 tokens and the final chunk; at 100 per second the last token is due at 4.99 s.
        assert_eq!(got.len(), 501);
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(4980) && elapsed <= Duration::from_millis(5000),
            "{elapsed:?}"
        );
    }
}
