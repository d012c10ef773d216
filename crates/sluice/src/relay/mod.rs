//! The relay: the one place that composes the `flow` patterns for one stream.
//!
//! ```text
//! upstream ──▶ StreamLimits (first_token, idle, total, keep-alive)
//!                 │  each chunk: queued for the transcript, then
//!                 ▼
//!          bounded queue (backpressure; slow_client_timeout) ──▶ api (SSE to the client,
//!                 │                                              once the chunk is committed)
//!                 └──▶ hub (resumers), in commit order, once someone follows
//! ```
//! A relay runs as its own tracked task, apart from the HTTP request, so that it sees the client
//! leave (the queue's consumer departs) instead of being silently dropped with the request; the
//! same task records the stream first, so the record, the relay and the final status are all
//! shielded from the request's task by running in this one. On
//! any ending (the upstream's `[DONE]`, a limit, a disconnect, a slow client, shutdown, an
//! upstream failure) it drops the upstream stream at once (closing its connection), writes the
//! final status, and only then tells the client how the stream ended: when a
//! client sees `[DONE]` or an error event, the transcript already says so. If the relay task
//! itself is dropped before its final write, a cleanup guard writes `interrupted(shutdown)`.
//! The ending travels as an [`Ending`] value from where it happens to the store and the client.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use sluice_flow::{
    queue, CancelCause, CancelToken, CleanupGuard, Consumer, Event, Producer, StreamLimits, Tasks,
    Timed, TrySendError,
};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::hub::{Hub, Live, Publisher};
use crate::redact::Redactor;
use crate::store::{Arrival, Finish, NewStream, Store, StoreError, StreamKey, Watermark};
use crate::stream::{Ending, OnDisconnect, Reason, Terminal, Timeouts};
use crate::upstream::route::Attempts;
use crate::upstream::{ChunkStream, Upstream, UpstreamRequest};

use departure::Departure;

mod departure;

/// What the relay hands the client side, in order.
#[derive(Debug)]
pub enum Frame {
    /// A chunk. Boxed: a queue allocates room for 32 frames at once whatever its use, so a
    /// frame is one pointer (8 bytes) and a waiting stream's queue 0.3 KB instead of 1.8 KB.
    Chunk(Box<ChunkFrame>),
    /// The upstream has been silent past the keep-alive threshold.
    KeepAlive,
}

impl Frame {
    /// What the frame counts against its stream's buffer, in bytes: a chunk its JSON.
    fn bytes(&self) -> usize {
        match self {
            Frame::Chunk(c) => c.data.len(),
            Frame::KeepAlive => 0,
        }
    }
}

/// A chunk for the client side: its event id, its JSON, and the text it adds. The client side
/// writes it out only once `committed` has reached `seq` (it is in the transcript).
#[derive(Debug)]
pub struct ChunkFrame {
    /// The stream's commit watermark; the chunk may go out once it reaches `seq` (`None`:
    /// chunks are not recorded).
    pub committed: Option<Watermark>,
    /// The event id (1, 2, ...).
    pub seq: u64,
    /// The chunk JSON (a non-streaming response parses what it needs from it).
    pub data: Arc<str>,
}

#[cfg(test)]
impl ChunkFrame {
    /// A chunk frame (for tests of the client side).
    pub(crate) fn for_test(seq: u64, data: &str, committed: Option<Watermark>) -> Box<Self> {
        Box::new(Self {
            committed,
            seq,
            data: Arc::from(data),
        })
    }
}

/// The frames of one stream, for the client side.
pub type Frames = Consumer<Frame, Terminal>;

/// What the relays of one server share.
#[derive(Debug, Clone)]
pub struct RelayContext {
    /// The transcript store.
    pub store: Store,
    /// Tracked tasks: relays, shielded writes.
    pub tasks: Tasks,
    /// Cancelled (cause: shutdown) when in-flight streams must end; each stream's own token
    /// (which the cancel API cancels) is a child of it.
    pub shutdown: CancelToken,
    /// Running streams, for resumers and the cancel API.
    pub hub: Arc<Hub>,
    /// Buffer between upstream and client, in chunks.
    pub buffer_chunks: usize,
    /// Buffer between upstream and client, in bytes (a larger chunk goes through alone).
    pub buffer_bytes: usize,
    /// Keeps upstream keys out of chunks and error messages.
    pub redactor: Arc<Redactor>,
    /// How long a full buffer may stay unread.
    pub slow_client_timeout: Duration,
    /// Upstream silence before a keep-alive.
    pub keep_alive: Duration,
    /// Whether chunks are recorded (see [`Config::record_chunks`](crate::config::Config)).
    pub record_chunks: bool,
}

/// One stream to relay.
#[derive(Debug, Clone)]
pub struct StreamRequest {
    /// The stream's id.
    pub id: Arc<str>,
    /// Its tenant.
    pub tenant: String,
    /// The model the client asked for.
    pub model: String,
    /// The client's request body as JSON text, for the transcript (taken by [`start`] when it
    /// records it).
    pub client_request: String,
    /// Where the answer comes from.
    pub upstream: Upstream,
    /// What is sent there (taken by the relay when it opens the upstream: a waiting stream
    /// does not keep a copy).
    pub upstream_request: UpstreamRequest,
    /// The three timers.
    pub timeouts: Timeouts,
    /// When the request arrived: the timers' start.
    pub started: Instant,
    /// What to do when the client leaves.
    pub on_disconnect: OnDisconnect,
    /// The key it runs under (taken by [`start`] when it records the stream).
    pub key: Option<StreamKey>,
}

/// What the relay knows so far; read by the cleanup guard if the relay is dropped.
#[derive(Debug, Default, Clone)]
struct Progress {
    chunks: u64,
    /// A routed stream's attempts (the route notes them as it goes); `None` for other streams.
    attempts: Option<Attempts>,
    first_token: Option<Duration>,
    usage: Option<Value>,
}

/// Records the stream, starts its relay task, and returns its frames. The request is in the
/// store before the upstream is called; a key with no place left among its running streams
/// gets [`StoreError::KeyBusy`].
///
/// Shielded: the stream's own tracked task records it and then relays it, so once `start` is
/// called the stream gets its relay (and so a final status) even if the caller is dropped
/// meanwhile; the relay then finds its client gone. One task per stream does both (rather than
/// a shielded task for the record and then one for the relay): a task spawned and joined is a
/// hand-off between threads that every stream paid before its first token.
pub async fn start(ctx: &Arc<RelayContext>, req: StreamRequest) -> Result<Frames, StoreError> {
    let (started, begun) = oneshot::channel();
    ctx.tasks.spawn(run(Box::new((ctx.clone(), req, started))));
    begun.await.unwrap_or_else(|_| {
        Err(StoreError::Internal(
            "starting the stream failed: its task ended before it was recorded".into(),
        ))
    })
}

/// What a stream's task starts from, in one box: a task's captured values take room in its
/// future for the task's whole life, and these are only needed at its start.
type Starting = (
    Arc<RelayContext>,
    StreamRequest,
    oneshot::Sender<Result<Frames, StoreError>>,
);

/// What the relay works with once its stream is recorded.
struct Begun {
    req: Running,
    source: ChunkStream,
    progress: Progress,
    tx: Producer<Frame, Terminal>,
    cancel: CancelToken,
    publisher: Publisher,
}

/// Records the stream; returns its frames, and what the relay works with.
async fn record(ctx: &RelayContext, req: StreamRequest) -> Result<(Frames, Begun), StoreError> {
    let StreamRequest {
        id,
        tenant,
        model,
        client_request,
        upstream,
        upstream_request,
        timeouts,
        started,
        on_disconnect,
        key,
    } = req;
    let tenant_name: Arc<str> = Arc::from(tenant.as_str());
    ctx.store
        .begin(NewStream {
            id: id.to_string(),
            tenant,
            model,
            // Recorded once; the relay does not need it afterwards.
            request: client_request,
            key,
        })
        .await?;
    let cancel = ctx.shutdown.child();
    let publisher = ctx.hub.register(id.clone(), tenant_name, cancel.clone());
    // The stream's buffer toward the client, bounded in chunks and in bytes: a relay waits for
    // room before it queues a chunk (backpressure), and a chunk larger than the byte bound
    // goes through alone.
    let (tx, rx) = queue::bounded_in_bytes(ctx.buffer_chunks, ctx.buffer_bytes, Frame::bytes);
    let progress = Progress {
        attempts: upstream.is_route().then(|| Attempts::since(started)),
        ..Progress::default()
    };
    let begun = Begun {
        // Opened here (nothing happens until the relay polls it), so the upstream request goes
        // into the stream that sends it and the relay keeps only what it uses.
        source: upstream.open(upstream_request, progress.attempts.as_ref()),
        req: Running {
            id,
            timeouts,
            started,
            on_disconnect,
        },
        progress,
        tx,
        cancel,
        publisher,
    };
    Ok((rx, begun))
}

/// What a relay keeps of its request while it runs.
#[derive(Debug)]
struct Running {
    id: Arc<str>,
    timeouts: Timeouts,
    /// When the request arrived: the timers' start.
    started: Instant,
    on_disconnect: OnDisconnect,
}

/// The stream's task: records the stream (that wait boxed, so it takes no room while the
/// stream runs), answers [`start`], relays, then concludes. It takes one box (an `async fn`
/// keeps its arguments for its whole life, besides the locals made of them).
async fn run(starting: Box<Starting>) {
    // Out of its box in a block of its own, so the box is freed now and not when the stream
    // ends (a box moved out of is only freed where it goes out of scope).
    let (ctx, req, started) = {
        let starting = starting;
        *starting
    };
    // In a statement of its own: a value matched on lives (and takes room) until the end of
    // its match, and what follows runs for the stream's whole life.
    let Begun {
        req,
        source,
        progress,
        tx,
        cancel,
        publisher,
    } = match Box::pin(record(&ctx, req)).await {
        Err(e) => {
            // Not recorded: there is nothing to relay and no status to write.
            let _ = started.send(Err(e));
            return;
        }
        Ok((frames, begun)) => {
            // A caller that has gone leaves `frames` unread: the relay sees its client gone.
            let _ = started.send(Ok(frames));
            begun
        }
    };
    let progress = Arc::new(Mutex::new(progress));
    metrics::gauge!("sluice_active_streams").increment(1.0);
    // If this task is dropped before it writes the final status (the runtime is going away),
    // the guard writes interrupted(shutdown) from a tracked task.
    let guard = {
        let (store, id, progress, started) = (
            ctx.store.clone(),
            req.id.clone(),
            progress.clone(),
            req.started,
        );
        ctx.tasks.on_drop(move || async move {
            let p = progress
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let written = store
                .finish(finish(
                    &id,
                    Ending::abnormal(Reason::Shutdown, "the relay was stopped"),
                    &p,
                    started.elapsed(),
                ))
                .await;
            if let Err(e) = written {
                // The next start marks it interrupted(crash) instead.
                tracing::error!(stream = %id, error = %e.report(), "the stopped relay's final status was not written");
            }
        })
    };

    // The relay's outcome in a block, so that nothing of it is held across the last await
    // besides what `conclude` takes.
    let concluded = {
        let (ending, tx) = relay(&ctx, &req, source, tx, &cancel, &publisher, &progress).await;
        record_metrics(&ending);
        conclude(&ctx, &req, &progress, ending, tx, publisher, guard)
    };
    concluded.await;
    metrics::gauge!("sluice_active_streams").decrement(1.0);
}

/// Writes the final status, then tells the client and every other reader how the stream ended.
/// A function of its own so that what it holds takes no room in the relay's task while the
/// stream runs (an async fn's states share room only when they are separate futures).
///
/// The write is shielded by where it runs and by `guard`: the relay's task is tracked (shutdown
/// waits for it) and nothing but the runtime going away drops it; if that happens before the
/// write is queued, the still-armed guard writes `interrupted(shutdown)` instead. Once queued, a
/// write lands whether or not anyone waits for it (and a second final status for the same stream
/// changes nothing: only a `streaming` record takes one).
async fn conclude(
    ctx: &RelayContext,
    req: &Running,
    progress: &Mutex<Progress>,
    ending: Ending,
    tx: Option<Producer<Frame, Terminal>>,
    publisher: Publisher,
    guard: CleanupGuard,
) {
    let total = req.started.elapsed();
    let p = progress
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    // Boxed: the write and its wait are most of a kilobyte, which the relay's task would
    // otherwise carry for its whole life.
    let written = Box::pin(ctx.store.finish(finish(&req.id, ending.clone(), &p, total))).await;
    guard.disarm();
    if let Err(e) = written {
        tracing::error!(stream = %req.id, error = %e.report(), "final status not written");
    }
    // Now that the transcript says how it ended, tell the client and every other reader.
    publisher.publish(Live::End(Terminal {
        seq: p.chunks + 1,
        ending: ending.clone(),
    }));
    drop(publisher);
    if let Some(tx) = tx {
        match ending {
            Ending::Completed => tx.end(),
            ending => tx.fail(Terminal {
                seq: p.chunks + 1,
                ending,
            }),
        }
    }
}

fn finish(id: &str, ending: Ending, p: &Progress, total: Duration) -> Finish {
    Finish {
        id: id.to_string(),
        ending,
        first_token: p.first_token,
        total,
        usage: p.usage.clone(),
        chunks: p.chunks,
        attempts: p.attempts.as_ref().and_then(Attempts::finish),
    }
}

/// Moves chunks until the stream ends; returns how, and the producer if the client may still
/// be listening.
///
/// Not an `async fn`: one of those keeps its arguments twice in its future (as arguments, then
/// as locals); this block uses what it captures in place.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice in the relay's task (see above)"
)]
fn relay<'a>(
    ctx: &'a RelayContext,
    req: &'a Running,
    source: ChunkStream,
    tx: Producer<Frame, Terminal>,
    cancel: &'a CancelToken,
    publisher: &'a Publisher,
    progress: &'a Mutex<Progress>,
) -> impl std::future::Future<Output = (Ending, Option<Producer<Frame, Terminal>>)> + Send + 'a {
    async move {
        // The per-chunk metrics, counted here and added to the totals now and then.
        let mut stats = crate::metrics::ChunkStats::default();
        let limits = StreamLimits {
            first_item: Some(req.timeouts.first_token),
            idle: Some(req.timeouts.idle),
            total: Some(req.timeouts.total),
            keep_alive: Some(ctx.keep_alive),
        };
        let mut limited = limits.apply_from(source, req.started);
        let mut client_wait = Duration::ZERO;
        let mut last_chunk: Option<Instant> = None;
        let mut seq = 0u64;
        // The original client; `None` once it has gone and the policy keeps the stream running.
        let mut client = Some(tx);
        // What the stream does once the client has left.
        let mut departure = Departure::new(req.on_disconnect);
        // Chunks queued for commit but not yet published to the hub, in order; kept only once
        // someone follows the stream (see `Unpublished`).
        let mut unpublished: Unpublished = VecDeque::new();
        let mut followed = false;
        let watermark = Watermark::new();
        // Chunks appended since the relay last had the store commit what it left waiting: it
        // does before it waits for anything (see `Store::append`).
        let mut waiting = 0usize;
        // Made once: a wait made at every turn of the loop would join and leave the token's
        // waiter list for every chunk.
        let mut cancel_wait = std::pin::pin!(cancel.cancelled_owned());

        let ending = 'relay: loop {
            // A chunk the store could not keep: the transcript can no longer be whole, and no one
            // may be sent a chunk that is not in it (invariant 1). End here.
            if let Some(seq) = watermark.lost() {
                break Ending::abnormal(
                    Reason::StoreError,
                    format!(
                        "chunk {seq} could not be stored; the stream ends rather than go on without it"
                    ),
                );
            }
            // The next chunk, and what the stream keeps of it, in a block of their own: whatever
            // the loop's body holds across an `.await` below takes room in the relay's task all its
            // life, in every state, the idle wait included.
            let (data, content, arrival) = {
                let next = tokio::select! {
                    biased;
                    () = departed(&client) => {
                        client = None;
                        match departure.client_left() {
                            Some(ending) => break ending,
                            None => continue,
                        }
                    }
                    cause = cancel_wait.as_mut() => break cancelled(cause),
                    () = next_commit(&unpublished, &watermark) => {
                        publish_committed(&mut unpublished, &watermark, publisher);
                        continue;
                    }
                    () = departure.grace_over() => {
                        match departure.look_for_followers(publisher.readers()) {
                            Some(ending) => break ending,
                            None => continue,
                        }
                    }
                    next = next_or_commit(&mut limited, &ctx.store, &mut waiting) => next,
                };
                let chunk = match next {
                    None => break Ending::Completed,
                    Some(Err(limit)) => {
                        let reason = Reason::for_limit(limit.limit);
                        break Ending::abnormal(
                            reason,
                            format!(
                                "{} timeout of {:?} exceeded after {} chunks",
                                reason.as_str(),
                                limit.limit_after,
                                limit.items
                            ),
                        );
                    }
                    Some(Ok(Event::KeepAlive { .. })) => {
                        // Worth nothing if the client already has frames to read: never wait for room.
                        if let Some(tx) = &client {
                            let _ = tx.try_send(Frame::KeepAlive);
                        }
                        continue;
                    }
                    Some(Ok(Event::Item(Err(e)))) => {
                        break Ending::abnormal(e.reason(), ctx.redactor.message(&e.to_string()))
                    }
                    Some(Ok(Event::Item(Ok(chunk)))) => chunk,
                };

                seq += 1;
                // The chunk's times from the clock read that got it: no read of our own.
                let now = limited.arrived();
                let offset = now.saturating_duration_since(req.started);
                {
                    let mut p = progress.lock().unwrap_or_else(PoisonError::into_inner);
                    p.chunks = seq;
                    p.first_token.get_or_insert(offset);
                    if chunk.usage.is_some() {
                        p.usage = chunk.usage.clone();
                    }
                }
                match last_chunk.replace(now) {
                    None => metrics::histogram!("sluice_time_to_first_token_seconds")
                        .record(offset.as_secs_f64()),
                    Some(prev) => stats.gap(now.saturating_duration_since(prev)),
                }
                // The first chunk is committed where it arrives (see `Arrival`); a later one
                // only if the store's writer has been quiet, which the store decides.
                let after_pause = seq == 1;
                // What the upstream says goes no further than here with a key in it.
                let data: Arc<str> = Arc::from(ctx.redactor.chunk(&chunk.data));
                let content = match ctx.redactor.chunk(&chunk.content) {
                    std::borrow::Cow::Borrowed(_) => chunk.content,
                    std::borrow::Cow::Owned(redacted) => redacted,
                };
                (
                    data,
                    content,
                    Arrival {
                        offset,
                        after_pause,
                        // Committed with the rest of its burst when the relay is about to wait.
                        caller_commits: true,
                    },
                )
            };
            // Nobody gets a chunk before it is committed (invariant 1, even across a crash of the
            // process): the client side waits for `committed`, and the hub publishes in commit
            // order. The relay itself does not wait, so a stream's chunks share commits.
            let committed = if ctx.record_chunks {
                match ctx
                    .store
                    .append(&req.id, seq, arrival, data.clone(), content, &watermark)
                    .await
                {
                    Ok(()) => {
                        if !arrival.after_pause {
                            waiting += 1;
                        }
                        if waiting >= MAX_WAITING {
                            ctx.store.commit_waiting(std::mem::take(&mut waiting));
                        }
                        Some(watermark.clone())
                    }
                    Err(e) => {
                        tracing::error!(stream = %req.id, error = %e.report(), "chunk not recorded");
                        None
                    }
                }
            } else {
                None
            };
            match &committed {
                Some(_) => {
                    if !followed && publisher.is_followed() {
                        followed = true;
                        follow_from_here(&mut unpublished, &watermark, seq, publisher);
                    }
                    if followed {
                        unpublished.push_back((seq, Some(data.clone())));
                    }
                }
                None => publisher.publish(Live::Chunk {
                    seq,
                    data: data.clone(),
                }),
            }
            publish_committed(&mut unpublished, &watermark, publisher);
            stats.relayed(client.as_ref().map(Producer::depth));

            let Some(tx) = &client else {
                continue; // nobody on the original connection: recorded and published is all
            };
            // Room (a place in the queue and bytes), under the slow-client limit. The send goes
            // first: a chunk already committed and published reaches the client if there is
            // room for it; a cancel only interrupts a send that is waiting for room.
            let chunk = Box::new(ChunkFrame {
                committed,
                seq,
                data,
            });
            let sent = match send_now(tx, chunk) {
                Ok(sent) => Timed::Completed(sent),
                Err(chunk) => {
                    // A slow client (or one whose queue holds chunks still waiting for their
                    // commit: made now, before the relay waits). The wait (and its timer) is
                    // boxed: it is the rare case, and inline it would make every relay's task
                    // larger for its whole life. Only a wait is timed: a chunk queued at once
                    // costs the client no time.
                    ctx.store.commit_waiting(std::mem::take(&mut waiting));
                    let sending = Instant::now();
                    let send = Box::pin(sluice_flow::timeout(
                        ctx.slow_client_timeout,
                        send_when_room(tx, chunk),
                    ));
                    let sent = tokio::select! {
                        biased;
                        sent = send => sent,
                        cause = cancel_wait.as_mut() => break cancelled(cause),
                    };
                    client_wait += sending.elapsed();
                    sent
                }
            };
            match sent {
                Timed::Completed(true) => {}
                Timed::Completed(false) => {
                    client = None;
                    if let Some(ending) = departure.client_left() {
                        break 'relay ending;
                    }
                }
                Timed::Expired(_) => {
                    break Ending::abnormal(
                        Reason::SlowClient,
                        format!(
                            "the client left {} chunks ({} bytes) unread for {:?}",
                            tx.depth(),
                            tx.bytes(),
                            ctx.slow_client_timeout
                        ),
                    )
                }
            }
        };
        let upstream_wait = limited.waited();
        // Dropping the upstream stream closes its connection now, before anything else: invariant 5.
        drop(limited);
        // Chunks still waiting for their commit reach the hub before the stream's end does.
        if let Some((last, _)) = unpublished.back() {
            ctx.store.commit_waiting(waiting);
            watermark.reached(*last).await;
        }
        // Otherwise what is left waiting is committed with the final status, in one batch (the
        // final status's write takes whatever is queued before it): a fast stream's last burst
        // costs no commit of its own.
        publish_committed(&mut unpublished, &watermark, publisher);

        let total = req.started.elapsed();
        metrics::histogram!("sluice_gateway_overhead_seconds").record(
            total
                .saturating_sub(upstream_wait + client_wait)
                .as_secs_f64(),
        );
        (ending, client)
    }
}

/// The most chunks a relay appends before it has them committed even though the upstream has
/// more at once: a client sees nothing of a burst until it is committed.
const MAX_WAITING: usize = 32;

/// The upstream's next event; if it has none yet, the chunks the relay appended since its last
/// commit (`waiting`) are committed first, since the relay is about to wait and an idle writer
/// does not commit them by itself (see `Store::append`).
fn next_or_commit<'a, S>(
    limited: &'a mut S,
    store: &'a Store,
    waiting: &'a mut usize,
) -> impl std::future::Future<Output = Option<S::Item>> + 'a
where
    S: futures_util::Stream + Unpin,
{
    std::future::poll_fn(move |cx| {
        let next = limited.poll_next_unpin(cx);
        if next.is_pending() && *waiting > 0 {
            store.commit_waiting(std::mem::take(waiting));
        }
        next
    })
}

/// Queues `chunk` for the client if the queue has room for it now: whether the client is
/// still there; or the chunk back, to wait with.
fn send_now(
    tx: &Producer<Frame, Terminal>,
    chunk: Box<ChunkFrame>,
) -> Result<bool, Box<ChunkFrame>> {
    match tx.try_send(Frame::Chunk(chunk)) {
        Ok(()) => Ok(true),
        Err(TrySendError::Departed(_)) => Ok(false),
        Err(TrySendError::Full(Frame::Chunk(chunk))) => Err(chunk),
        // Not what was sent: the queue gives back the chunk.
        Err(TrySendError::Full(Frame::KeepAlive)) => Ok(true),
    }
}

/// Waits for room in the queue for `chunk` and queues it: whether the client is still there
/// (the wait ends at once if it leaves).
async fn send_when_room(tx: &Producer<Frame, Terminal>, chunk: Box<ChunkFrame>) -> bool {
    tx.send(Frame::Chunk(chunk)).await.is_ok()
}

/// Resolves when the original client has gone; never if it already has (`None`). Polled at
/// every turn of the relay's loop, so it waits in the queue's waker slot for its producer
/// rather than joining a waiter list each time.
fn departed(
    client: &Option<Producer<Frame, Terminal>>,
) -> impl std::future::Future<Output = ()> + '_ {
    std::future::poll_fn(move |cx| match client {
        Some(tx) => tx.poll_departed(cx),
        None => std::task::Poll::Pending,
    })
}

/// Chunks queued for commit but not yet published, in order: their ids, and their JSON if the
/// relay still has it (`None`: published as [`Live::Large`], which sends readers to the store).
///
/// Nothing is kept, and the relay waits for no commit, while nobody follows the stream: most
/// streams are only ever read by their own client, and publishing in commit order would
/// otherwise wake the relay once per commit for nothing. See [`follow_from_here`] for how a
/// follower that comes later still misses nothing.
type Unpublished = VecDeque<(u64, Option<Arc<str>>)>;

/// Someone has started following the stream, which until now published nothing; chunk `next`
/// is about to be queued. What is committed, the follower reads from the store: one placeholder
/// for the newest committed chunk tells a follower that has already read the store to read it
/// again up to there. What is queued but not committed is published as it commits, as
/// placeholders (its JSON is gone). From `next` on, chunks are published as they commit.
fn follow_from_here(
    unpublished: &mut Unpublished,
    watermark: &Watermark,
    next: u64,
    publisher: &Publisher,
) {
    let committed = watermark.get();
    if committed > 0 && watermark.is_stored(committed) {
        publisher.publish(Live::Large { seq: committed });
    }
    unpublished.extend((committed + 1..next).map(|seq| (seq, None)));
}

/// Resolves when the oldest unpublished chunk is committed; never if there is none.
async fn next_commit(unpublished: &Unpublished, watermark: &Watermark) {
    match unpublished.front() {
        Some((seq, _)) => watermark.reached(*seq).await,
        None => std::future::pending().await,
    }
}

/// Publishes, in order, every chunk at the front of `unpublished` that is committed.
fn publish_committed(unpublished: &mut Unpublished, watermark: &Watermark, publisher: &Publisher) {
    let committed = watermark.get();
    while unpublished
        .front()
        .is_some_and(|(seq, _)| *seq <= committed)
    {
        if let Some((seq, data)) = unpublished.pop_front() {
            // A lost chunk is not in the store: followers never see it.
            if watermark.is_stored(seq) {
                publisher.publish(match data {
                    Some(data) => Live::Chunk { seq, data },
                    None => Live::Large { seq },
                });
            }
        }
    }
}

/// The ending for a stream cancelled from outside: by shutdown, or by the cancel API.
fn cancelled(cause: CancelCause) -> Ending {
    match cause {
        CancelCause::Shutdown => Ending::abnormal(
            Reason::Shutdown,
            "the gateway shut down while the stream was running",
        ),
        _ => Ending::abnormal(Reason::Requested, "the stream was cancelled by request"),
    }
}

fn record_metrics(ending: &Ending) {
    let status = ending.status().as_str();
    let reason = ending.reason().map(|r| r.as_str()).unwrap_or("");
    metrics::counter!("sluice_streams_finished_total", "status" => status, "reason" => reason)
        .increment(1);
    match ending.reason() {
        Some(r @ (Reason::FirstToken | Reason::Idle | Reason::Total)) => {
            metrics::counter!("sluice_timeouts_total", "kind" => r.as_str()).increment(1)
        }
        Some(
            r @ (Reason::ClientDisconnected
            | Reason::SlowClient
            | Reason::Requested
            | Reason::Shutdown),
        ) => metrics::counter!("sluice_cancellations_total", "cause" => r.as_str()).increment(1),
        Some(r @ (Reason::UpstreamError | Reason::UpstreamProtocolError)) => {
            metrics::counter!("sluice_upstream_errors_total", "reason" => r.as_str()).increment(1)
        }
        // Store failures are counted where they happen (sluice_store_write_errors_total).
        Some(Reason::StoreError | Reason::Crash) | None => {}
    }
}

#[cfg(test)]
mod tests;
