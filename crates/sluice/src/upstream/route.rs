//! Routes: one `model` name over several targets (configured models), under one deadline.
//!
//! A route is an upstream made of upstreams: the relay sees one [`ChunkStream`], with its
//! timers, cancel, resume and disconnect policy working as on any stream, and the route decides
//! which target's chunks go into it:
//!
//! - `fallback`: targets in order. An attempt that fails before its first chunk (an error, a
//!   `429`/`5xx`, a lost connection, the target's first-token timer) is retried with backoff and
//!   jitter (honouring `Retry-After`) while the deadline allows, then the next target is tried;
//!   nothing of a failed attempt reaches the client. An attempt that fails *after* chunks went
//!   out is continued by the next target that can continue an answer (the `sim` model, or an
//!   `openai` model with `continue_partial`): it is sent the partial answer as the last assistant
//!   message with `continue_final_message: true, add_generation_prompt: false` (vLLM's flags),
//!   and its chunks follow on, so the client reads one answer.
//! - `race`: every target at once; the first to produce a chunk is streamed, the others are
//!   dropped at once (their connections closed) and recorded as `lost`.
//! - `hedge`: the first target; the next one if no chunk came after `hedge_after`, and so on;
//!   the first to produce a chunk wins, as in a race. A target that fails starts the next at once.
//! - `gather`: every target at once under the deadline; each target's chunks go out as choice
//!   `index` = the target's position, tagged `"sluice_target"`, and a last chunk lists every
//!   target's outcome (`"sluice_gather"`). Targets still running at the deadline are cut and
//!   reported `timed_out`; what finished is kept.
//!
//! Every attempt (target, try, start, first chunk, end, outcome) is noted in [`Attempts`], which
//! the relay writes into the transcript, and counted in `sluice_route_attempts_total`. A target
//! that keeps failing has its circuit [`Breaker`] opened: routes skip it for a while.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_stream::stream;
use futures_util::stream::{FuturesUnordered, SelectAll};
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};
use sluice_flow::{timeout, Timed};
use tokio::time::Instant;

use super::{Chunk, ChunkStream, Upstream, UpstreamError, UpstreamRequest};

/// How a route uses its targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// In order, moving on when one fails.
    Fallback,
    /// All at once; the first chunk wins.
    Race,
    /// One, then the next if the first is slow to start; the first chunk wins.
    Hedge,
    /// All at once; every outcome is returned.
    Gather,
}

/// A configured route.
#[derive(Debug)]
pub struct Route {
    /// Its name (what clients send as `model`).
    pub name: String,
    /// How it uses its targets.
    pub strategy: Strategy,
    /// Its targets, in order.
    pub targets: Vec<Target>,
    /// The one deadline around the whole route.
    pub total: Duration,
    /// `hedge`: how long a target may go without a chunk before the next is started.
    pub hedge_after: Duration,
    /// Retries before the first chunk.
    pub retry: Retry,
}

/// One target of a route: a configured model.
#[derive(Debug)]
pub struct Target {
    /// The model's name.
    pub name: String,
    /// Its upstream (never a route).
    pub upstream: Upstream,
    /// The name sent upstream (`None`: `name`).
    pub upstream_model: Option<String>,
    /// Its first-token timer: an attempt with no chunk by then has failed.
    pub first_token: Duration,
    /// Whether it can continue a half-finished answer.
    pub can_continue: bool,
    /// Its circuit breaker, shared by every route that uses the model.
    pub breaker: Arc<Breaker>,
}

/// Retries of an attempt that failed before its first chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// How many times a target is tried again (0: once only).
    pub retries: u32,
    /// The first backoff; each retry doubles it, and a random part of it is waited (full
    /// jitter). A `Retry-After` from the upstream is waited instead when it is longer.
    pub backoff: Duration,
}

impl Retry {
    /// How long to wait before try `tries + 1`: full jitter over `backoff * 2^(tries-1)`, or
    /// the upstream's `Retry-After` if longer.
    pub fn wait(&self, tries: u32, retry_after: Option<Duration>) -> Duration {
        let cap = self
            .backoff
            .saturating_mul(1u32 << tries.saturating_sub(1).min(16));
        let jittered = cap.mul_f64(jitter());
        retry_after.map_or(jittered, |r| r.max(jittered))
    }
}

/// tokio's timers fire on whole milliseconds, a sleep's end rounded up to the next.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// Whether a wait that ends at `end` ends before `deadline`, each rounded up to the tick its
/// timer fires on: a backoff ending in the deadline's last tick would wake with the stream's own
/// timer (set to the same deadline), which is checked first and would cut the route short.
fn ends_before(end: Instant, deadline: Instant) -> bool {
    end + TIMER_TICK <= deadline
}

/// A number in [0.5, 1): jitter that still waits at least half the backoff.
fn jitter() -> f64 {
    let mut b = [0u8; 2];
    if getrandom::fill(&mut b).is_err() {
        return 0.75;
    }
    0.5 + f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) / 2.0
}

/// A circuit breaker: after `failures` failures in a row, the target is skipped for `open_for`;
/// then one attempt is let through, and its success closes the breaker.
#[derive(Debug)]
pub struct Breaker {
    target: String,
    failures: u32,
    open_for: Duration,
    in_a_row: AtomicU32,
    open_until: Mutex<Option<Instant>>,
}

impl Breaker {
    /// A closed breaker for `target`.
    pub fn new(target: &str, failures: u32, open_for: Duration) -> Self {
        Self {
            target: target.to_string(),
            failures: failures.max(1),
            open_for,
            in_a_row: AtomicU32::new(0),
            open_until: Mutex::new(None),
        }
    }

    /// Whether the target is being skipped now.
    pub fn is_open(&self) -> bool {
        let mut until = self
            .open_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match *until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                // Half open: let attempts through; the next failure opens it again.
                *until = None;
                self.in_a_row.store(self.failures - 1, Ordering::SeqCst);
                metrics::gauge!("sluice_route_breaker_open", "target" => self.target.clone())
                    .set(0.0);
                false
            }
            None => false,
        }
    }

    fn succeeded(&self) {
        self.in_a_row.store(0, Ordering::SeqCst);
    }

    fn failed(&self) {
        if self.in_a_row.fetch_add(1, Ordering::SeqCst) + 1 >= self.failures {
            *self
                .open_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + self.open_for);
            metrics::gauge!("sluice_route_breaker_open", "target" => self.target.clone()).set(1.0);
            tracing::warn!(target = %self.target, "circuit breaker opened: the target is skipped for a while");
        }
    }
}

/// One attempt of a route, as the transcript records it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Attempt {
    /// The target.
    pub target: String,
    /// Which try of that target (1, 2, ...).
    #[serde(rename = "try")]
    pub try_number: u32,
    /// Its start, ms from the route's start.
    pub started_ms: f64,
    /// Its first chunk, ms from the route's start.
    pub first_token_ms: Option<f64>,
    /// Its end, ms from the route's start.
    pub ended_ms: Option<f64>,
    /// `completed`, `failed`, `timed_out` (its first-token timer), `lost` (another won),
    /// `skipped` (breaker open, or it cannot continue an answer), `cancelled` (the stream ended
    /// while it ran), `running`.
    pub outcome: &'static str,
    /// Why, for the abnormal outcomes.
    pub detail: Option<String>,
    /// When it continued a half-finished answer: how many characters it was given.
    pub continued_from_chars: Option<usize>,
}

/// The attempts of one routed stream; cheap to clone (shared with the relay).
#[derive(Debug, Clone)]
pub struct Attempts(Arc<AttemptsInner>);

#[derive(Debug)]
struct AttemptsInner {
    started: Instant,
    route: Mutex<String>,
    list: Mutex<Vec<Attempt>>,
}

impl Attempts {
    /// The attempts of a stream that started at `started` (its request's arrival): their times
    /// and the route's deadline count from there, the moment the relay's own timers count from,
    /// so the route's deadline never falls after the stream's.
    pub fn since(started: Instant) -> Self {
        Self(Arc::new(AttemptsInner {
            started,
            route: Mutex::new(String::new()),
            list: Mutex::new(Vec::new()),
        }))
    }

    /// The route's deadline: `total` after the stream's start.
    fn deadline(&self, total: Duration) -> Instant {
        self.0.started + total
    }

    fn ms(&self) -> f64 {
        (self.0.started.elapsed().as_secs_f64() * 1e6).round() / 1e3
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Attempt>> {
        self.0.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn start(&self, target: &str, try_number: u32, continued: Option<usize>) -> usize {
        let started_ms = self.ms();
        let mut list = self.list();
        list.push(Attempt {
            target: target.to_string(),
            try_number,
            started_ms,
            first_token_ms: None,
            ended_ms: None,
            outcome: "running",
            detail: None,
            continued_from_chars: continued,
        });
        list.len() - 1
    }

    fn first_token(&self, i: usize) {
        let at = self.ms();
        if let Some(a) = self.list().get_mut(i) {
            a.first_token_ms = Some(at);
        }
    }

    fn end(&self, i: usize, outcome: &'static str, detail: Option<String>) {
        let at = self.ms();
        let route = self
            .0
            .route
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(a) = self.list().get_mut(i) {
            if a.outcome != "running" {
                return;
            }
            a.ended_ms = Some(at);
            a.outcome = outcome;
            a.detail = detail;
            metrics::counter!("sluice_route_attempts_total", "route" => route, "target" => a.target.clone(), "outcome" => outcome).increment(1);
        }
    }

    fn skip(&self, target: &str, why: &str) {
        let i = self.start(target, 0, None);
        self.end(i, "skipped", Some(why.to_string()));
    }

    /// Every attempt so far; those still running are reported `cancelled` (the stream has
    /// ended, so they were stopped with it). `None` for a stream that is not routed.
    pub fn finish(&self) -> Option<Value> {
        let running: Vec<usize> = self
            .list()
            .iter()
            .enumerate()
            .filter(|(_, a)| a.outcome == "running")
            .map(|(i, _)| i)
            .collect();
        for i in running {
            self.end(i, "cancelled", Some("the stream ended while it ran".into()));
        }
        let list = self.list();
        (!list.is_empty()).then(|| serde_json::to_value(&*list).unwrap_or(Value::Null))
    }

    /// A one-line summary of every attempt (for an error's detail).
    fn summary(&self) -> String {
        self.list()
            .iter()
            .map(|a| match &a.detail {
                Some(d) => format!("{} ({}): {d}", a.target, a.outcome),
                None => format!("{} ({})", a.target, a.outcome),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Opens a routed stream; see the module docs.
pub fn open(route: Arc<Route>, request: UpstreamRequest, attempts: Attempts) -> ChunkStream {
    *attempts
        .0
        .route
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = route.name.clone();
    match route.strategy {
        Strategy::Fallback => fallback(route, request, attempts),
        Strategy::Race => first_of(route, request, attempts, Duration::ZERO),
        Strategy::Hedge => {
            let stagger = route.hedge_after;
            first_of(route, request, attempts, stagger)
        }
        Strategy::Gather => gather(route, request, attempts),
    }
}

/// The request for `target`: its model name and, when it continues an answer, the partial answer
/// as the last assistant message with vLLM's continuation flags.
fn request_for(target: &Target, base: &UpstreamRequest, partial: Option<&str>) -> UpstreamRequest {
    let mut body = base.body.clone();
    let model = target.upstream_model.as_ref().unwrap_or(&target.name);
    body.insert("model".into(), Value::String(model.clone()));
    if let Some(text) = partial {
        if let Some(Value::Array(messages)) = body.get_mut("messages") {
            messages.push(json!({"role": "assistant", "content": text}));
        }
        body.insert("continue_final_message".into(), Value::Bool(true));
        body.insert("add_generation_prompt".into(), Value::Bool(false));
    }
    UpstreamRequest { body }
}

/// What an attempt's wait for its first chunk came to.
enum First {
    Chunk(Chunk),
    Failed(UpstreamError),
    TimedOut(Duration),
}

async fn first_chunk(stream: &mut ChunkStream, limit: Duration) -> First {
    match timeout(limit, stream.next()).await {
        Timed::Completed(Some(Ok(chunk))) => First::Chunk(chunk),
        Timed::Completed(Some(Err(e))) => First::Failed(e),
        // A clean end with no chunk at all is not an answer.
        Timed::Completed(None) => First::Failed(UpstreamError::Truncated),
        Timed::Expired(_) => First::TimedOut(limit),
    }
}

fn timed_out_detail(limit: Duration) -> String {
    format!("no first token within {} ms", limit.as_millis())
}

fn fallback(route: Arc<Route>, request: UpstreamRequest, attempts: Attempts) -> ChunkStream {
    Box::pin(stream! {
        let deadline = attempts.deadline(route.total);
        // The text that has gone out: a continuing target picks up from it.
        let mut partial = String::new();
        'targets: for target in &route.targets {
            let continuing = !partial.is_empty();
            if continuing && !target.can_continue {
                attempts.skip(&target.name, "cannot continue a half-finished answer");
                continue;
            }
            if target.breaker.is_open() {
                attempts.skip(&target.name, "circuit breaker open");
                continue;
            }
            let mut tries = 0;
            loop {
                tries += 1;
                let a = attempts.start(&target.name, tries, continuing.then_some(partial.len()));
                let mut upstream = target
                    .upstream
                    .open(request_for(target, &request, continuing.then_some(partial.as_str())), Some(&attempts));
                let left = deadline.saturating_duration_since(Instant::now());
                let error = match first_chunk(&mut upstream, target.first_token.min(left)).await {
                    First::Chunk(chunk) => {
                        attempts.first_token(a);
                        target.breaker.succeeded();
                        partial.push_str(&chunk.content);
                        yield Ok(chunk);
                        loop {
                            match upstream.next().await {
                                Some(Ok(chunk)) => {
                                    partial.push_str(&chunk.content);
                                    yield Ok(chunk);
                                }
                                None => {
                                    attempts.end(a, "completed", None);
                                    return;
                                }
                                Some(Err(e)) => {
                                    // Chunks went out: only a target that continues can help.
                                    attempts.end(a, "failed", Some(e.to_string()));
                                    target.breaker.failed();
                                    continue 'targets;
                                }
                            }
                        }
                    }
                    First::Failed(e) => {
                        attempts.end(a, "failed", Some(e.to_string()));
                        e
                    }
                    First::TimedOut(limit) => {
                        attempts.end(a, "timed_out", Some(timed_out_detail(limit)));
                        UpstreamError::Exhausted(timed_out_detail(limit))
                    }
                };
                drop(upstream);
                target.breaker.failed();
                let retry_after = match &error {
                    UpstreamError::Status { retry_after, .. } => *retry_after,
                    _ => None,
                };
                if error.is_retryable() && tries <= route.retry.retries {
                    let wait = route.retry.wait(tries, retry_after);
                    if ends_before(Instant::now() + wait, deadline) {
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
                continue 'targets;
            }
        }
        yield Err(UpstreamError::Exhausted(attempts.summary()));
    })
}

/// An attempt racing for its first chunk: which one, its attempt's index, and the outcome
/// with its stream.
type Racer =
    std::pin::Pin<Box<dyn std::future::Future<Output = (usize, usize, First, ChunkStream)> + Send>>;

fn first_of(
    route: Arc<Route>,
    request: UpstreamRequest,
    attempts: Attempts,
    stagger: Duration,
) -> ChunkStream {
    Box::pin(stream! {
        let deadline = attempts.deadline(route.total);
        let mut waiting: VecDeque<usize> = VecDeque::new();
        for (i, target) in route.targets.iter().enumerate() {
            if target.breaker.is_open() {
                attempts.skip(&target.name, "circuit breaker open");
            } else {
                waiting.push_back(i);
            }
        }
        let mut racing: FuturesUnordered<Racer> = FuturesUnordered::new();
        let mut running: Vec<usize> = Vec::new();
        let start = |i: usize| -> (usize, Racer) {
            let target = &route.targets[i];
            let a = attempts.start(&target.name, 1, None);
            let mut upstream = target.upstream.open(request_for(target, &request, None), Some(&attempts));
            let limit = target
                .first_token
                .min(deadline.saturating_duration_since(Instant::now()));
            let racer: Racer = Box::pin(async move {
                let first = first_chunk(&mut upstream, limit).await;
                (i, a, first, upstream)
            });
            (a, racer)
        };
        let mut next_start = Instant::now();
        let winner = loop {
            // Start whoever is due: everyone at once for a race; for a hedge the next one when
            // the last has had `stagger` without a chunk, or at once if none is running.
            while !waiting.is_empty() && (stagger.is_zero() || racing.is_empty() || Instant::now() >= next_start) {
                if let Some(i) = waiting.pop_front() {
                    let (a, racer) = start(i);
                    running.push(a);
                    racing.push(racer);
                    next_start = Instant::now() + stagger;
                }
                if !stagger.is_zero() {
                    break;
                }
            }
            if racing.is_empty() {
                break None;
            }
            let hedge = tokio::time::sleep_until(next_start);
            let more = !waiting.is_empty() && !stagger.is_zero();
            tokio::select! {
                Some((i, a, first, upstream)) = racing.next() => {
                    running.retain(|r| *r != a);
                    let target = &route.targets[i];
                    match first {
                        First::Chunk(chunk) => {
                            attempts.first_token(a);
                            target.breaker.succeeded();
                            break Some((a, chunk, upstream));
                        }
                        First::Failed(e) => {
                            attempts.end(a, "failed", Some(e.to_string()));
                            target.breaker.failed();
                        }
                        First::TimedOut(limit) => {
                            attempts.end(a, "timed_out", Some(timed_out_detail(limit)));
                            target.breaker.failed();
                        }
                    }
                    // A failure makes room for the next target at once.
                    next_start = Instant::now();
                }
                () = hedge, if more => {}
            }
        };
        // The losers are dropped here: their connections close now.
        drop(racing);
        for a in running {
            attempts.end(a, "lost", Some("another target answered first".into()));
        }
        let Some((a, chunk, mut upstream)) = winner else {
            yield Err(UpstreamError::Exhausted(attempts.summary()));
            return;
        };
        yield Ok(chunk);
        while let Some(item) = upstream.next().await {
            match item {
                Ok(chunk) => yield Ok(chunk),
                Err(e) => {
                    attempts.end(a, "failed", Some(e.to_string()));
                    yield Err(e);
                    return;
                }
            }
        }
        attempts.end(a, "completed", None);
    })
}

/// One gathered target's chunks, tagged with its position; `None` marks its clean end.
type Tagged = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = (usize, Option<Result<Chunk, UpstreamError>>)> + Send>,
>;

fn gather(route: Arc<Route>, request: UpstreamRequest, attempts: Attempts) -> ChunkStream {
    Box::pin(stream! {
        let deadline = attempts.deadline(route.total);
        let n = route.targets.len();
        let mut index_of_attempt = vec![None; n];
        let mut merged: SelectAll<Tagged> = SelectAll::new();
        for (i, target) in route.targets.iter().enumerate() {
            if target.breaker.is_open() {
                attempts.skip(&target.name, "circuit breaker open");
                continue;
            }
            index_of_attempt[i] = Some(attempts.start(&target.name, 1, None));
            let upstream = target.upstream.open(request_for(target, &request, None), Some(&attempts));
            let first_token = target.first_token;
            let tagged: Tagged = Box::pin(with_first_token(upstream, first_token)
                .map(move |item| (i, Some(item)))
                .chain(futures_util::stream::once(async move { (i, None) })));
            merged.push(tagged);
        }
        let mut texts = vec![String::new(); n];
        let mut seen = vec![false; n];
        let mut done = vec![false; n];
        let mut completed = 0;
        let expired = tokio::time::sleep_until(deadline);
        tokio::pin!(expired);
        let id = format!("chatcmpl-gather-{}", uuid::Uuid::new_v4().simple());
        loop {
            tokio::select! {
                item = merged.next() => match item {
                    None => break,
                    Some((i, Some(Ok(chunk)))) => {
                        let target = &route.targets[i];
                        if !seen[i] {
                            seen[i] = true;
                            if let Some(a) = index_of_attempt[i] { attempts.first_token(a); }
                            target.breaker.succeeded();
                        }
                        texts[i].push_str(&chunk.content);
                        yield Ok(tag(chunk, i, &target.name));
                    }
                    Some((i, Some(Err(e)))) => {
                        if let Some(a) = index_of_attempt[i] {
                            let outcome = if matches!(e, UpstreamError::Exhausted(_)) { "timed_out" } else { "failed" };
                            attempts.end(a, outcome, Some(e.to_string()));
                        }
                        route.targets[i].breaker.failed();
                        done[i] = true;
                    }
                    Some((i, None)) => {
                        if !done[i] {
                            if let Some(a) = index_of_attempt[i] { attempts.end(a, "completed", None); }
                            completed += 1;
                            done[i] = true;
                        }
                    }
                },
                () = &mut expired => {
                    for (i, a) in index_of_attempt.iter().enumerate() {
                        if let (Some(a), false) = (a, done[i]) {
                            attempts.end(*a, "timed_out", Some(format!("still running at the route's deadline ({} ms)", route.total.as_millis())));
                        }
                    }
                    break;
                }
            }
        }
        // Cut whoever is still running, now.
        drop(merged);
        attempts.finish();
        if completed == 0 {
            yield Err(UpstreamError::Exhausted(attempts.summary()));
            return;
        }
        let outcomes: Vec<Value> = {
            let list = attempts.list();
            route.targets.iter().enumerate().map(|(i, target)| {
                let attempt = index_of_attempt[i].and_then(|a| list.get(a));
                json!({
                    "index": i,
                    "target": target.name,
                    "status": attempt.map_or("skipped", |a| a.outcome),
                    "detail": attempt.and_then(|a| a.detail.clone()),
                    "first_token_ms": attempt.and_then(|a| a.first_token_ms),
                    "ended_ms": attempt.and_then(|a| a.ended_ms),
                    "content": texts[i],
                })
            }).collect()
        };
        let summary = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "model": route.name,
            "choices": [],
            "sluice_gather": outcomes,
        });
        yield Ok(Chunk { data: summary.to_string(), content: String::new(), finish_reason: None, usage: None });
    })
}

/// `upstream`, failing with [`UpstreamError::Exhausted`] if no chunk comes within `limit`.
fn with_first_token(mut upstream: ChunkStream, limit: Duration) -> ChunkStream {
    Box::pin(stream! {
        match first_chunk(&mut upstream, limit).await {
            First::Chunk(chunk) => yield Ok(chunk),
            First::Failed(e) => { yield Err(e); return; }
            First::TimedOut(limit) => { yield Err(UpstreamError::Exhausted(timed_out_detail(limit))); return; }
        }
        while let Some(item) = upstream.next().await {
            let failed = item.is_err();
            yield item;
            if failed { return; }
        }
    })
}

/// A gathered chunk as choice `index` of the answer, tagged with its target. Its text is not
/// the route's answer (each target has its own), so `content` goes empty for the relay's
/// assembled text; the client reads each choice's deltas.
fn tag(chunk: Chunk, index: usize, target: &str) -> Chunk {
    let mut data: Value = serde_json::from_str(&chunk.data).unwrap_or(Value::Null);
    if let Some(obj) = data.as_object_mut() {
        if let Some(Value::Array(choices)) = obj.get_mut("choices") {
            for c in choices.iter_mut() {
                if let Some(c) = c.as_object_mut() {
                    c.insert("index".into(), json!(index));
                }
            }
        }
        obj.insert("sluice_target".into(), Value::String(target.to_string()));
    }
    Chunk {
        data: data.to_string(),
        content: String::new(),
        finish_reason: None,
        usage: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_yields_to_retry_after() {
        let r = Retry {
            retries: 3,
            backoff: Duration::from_millis(100),
        };
        for _ in 0..50 {
            let first = r.wait(1, None);
            assert!(first >= Duration::from_millis(50) && first < Duration::from_millis(100));
            let third = r.wait(3, None);
            assert!(third >= Duration::from_millis(200) && third < Duration::from_millis(400));
        }
        assert_eq!(
            r.wait(1, Some(Duration::from_secs(2))),
            Duration::from_secs(2),
            "Retry-After, when longer, is waited instead"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_breaker_opens_after_failures_in_a_row_and_half_opens_later() {
        let b = Breaker::new("t", 2, Duration::from_secs(10));
        b.failed();
        b.succeeded();
        b.failed();
        assert!(!b.is_open(), "a success in between resets the count");
        b.failed();
        assert!(b.is_open());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!b.is_open(), "half open: one attempt goes through");
        b.failed();
        assert!(b.is_open(), "and its failure opens it again");
    }

    #[test]
    fn a_backoff_ending_in_the_deadlines_last_tick_is_not_waited() {
        let deadline = Instant::now() + Duration::from_secs(1);
        assert!(ends_before(deadline - Duration::from_millis(2), deadline));
        assert!(ends_before(deadline - TIMER_TICK, deadline));
        assert!(
            !ends_before(deadline - Duration::from_micros(400), deadline),
            "its timer would fire on the deadline's tick, with the stream's"
        );
        assert!(!ends_before(deadline, deadline));
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_counts_from_the_streams_start_not_from_the_routes_first_poll() {
        let broken = Target {
            name: "broken".into(),
            upstream: Upstream::Sim(crate::upstream::sim::SimDefaults {
                http_status: Some(503),
                ..Default::default()
            }),
            upstream_model: None,
            first_token: Duration::from_secs(1),
            can_continue: false,
            breaker: Arc::new(Breaker::new("broken", 1_000, Duration::ZERO)),
        };
        let route = Arc::new(Route {
            name: "r".into(),
            strategy: Strategy::Fallback,
            targets: vec![broken],
            total: Duration::from_secs(1),
            hedge_after: Duration::ZERO,
            retry: Retry {
                retries: 50,
                backoff: Duration::from_millis(20),
            },
        });
        let started = Instant::now();
        // The stream's record took most of the deadline before the route was first polled.
        tokio::time::advance(Duration::from_millis(900)).await;
        let attempts = Attempts::since(started);
        let mut stream = open(
            route,
            UpstreamRequest {
                body: serde_json::Map::new(),
            },
            attempts.clone(),
        );
        let mut last = None;
        while let Some(item) = stream.next().await {
            last = Some(item);
        }
        assert!(
            matches!(last, Some(Err(UpstreamError::Exhausted(_)))),
            "{last:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the route gave up within its deadline from the stream's start: {:?}",
            started.elapsed()
        );
        let tried = attempts.finish().unwrap_or_default();
        let tried = tried.as_array().map(Vec::as_slice).unwrap_or_default();
        assert!(tried.len() >= 2, "it retried in the time left: {tried:?}");
        assert!(
            tried.iter().all(|a| {
                let at = a["started_ms"].as_f64().unwrap_or(0.0);
                (900.0..1000.0).contains(&at)
            }),
            "attempts are timed from the stream's start: {tried:?}"
        );
    }

    #[test]
    fn a_continuing_request_carries_the_partial_answer_and_vllms_flags() {
        let target = Target {
            name: "b".into(),
            upstream: Upstream::Sim(crate::upstream::sim::SimDefaults::default()),
            upstream_model: Some("served-b".into()),
            first_token: Duration::from_secs(1),
            can_continue: true,
            breaker: Arc::new(Breaker::new("b", 1, Duration::ZERO)),
        };
        let mut body = serde_json::Map::new();
        body.insert("model".into(), json!("route"));
        body.insert(
            "messages".into(),
            json!([{"role": "user", "content": "hi"}]),
        );
        let base = UpstreamRequest { body };
        let plain = request_for(&target, &base, None);
        assert_eq!(plain.body["model"], "served-b");
        assert!(!plain.body.contains_key("continue_final_message"));
        let cont = request_for(&target, &base, Some("Hello from"));
        assert_eq!(
            cont.body["messages"][1],
            json!({"role": "assistant", "content": "Hello from"})
        );
        assert_eq!(cont.body["continue_final_message"], true);
        assert_eq!(cont.body["add_generation_prompt"], false);
        assert_eq!(crate::upstream::sim::continued_from(&cont.body), 2);
    }
}
