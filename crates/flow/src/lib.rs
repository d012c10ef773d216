//! # sluice-flow: the async patterns a streaming gateway is made of
//!
//! sluice relays a model's answer to a client chunk by chunk. Every way that can go wrong is an
//! async-I/O pattern done wrong: a timer that silently ends a stream, a cancellation nobody hears
//! about, a final write lost because its task was dropped, a slow client that makes the server
//! buffer without bound. This crate holds those patterns, each in its own module, with no HTTP
//! and no chat in it, so they can be tested on their own with tokio's paused clock. The gateway
//! composes them and re-implements none.
//!
//! ## The lesson, pattern by pattern
//!
//! | Python asyncio | here | module |
//! |---|---|---|
//! | async generator, `async for` | [`stream!`], [`Stream`], [`StreamExt::next`] | [`generator`] |
//! | `async with asyncio.timeout(s)` | [`Deadline::run`] → [`Timed`] | [`deadline`] |
//! | `asyncio.wait_for(coro, s)` | [`timeout`] → [`Timed`] | [`deadline`] |
//! | `Timeout.reschedule(when)` | [`Deadline::reschedule`] | [`deadline`] |
//! | a timeout around a *whole* stream (the war story) | [`StreamLimits::apply`] → [`Limited`] | [`limits`] |
//! | `task.cancel()`, `CancelledError` | [`CancelToken::cancel`] with a [`CancelCause`]; [`CancelToken::run`] → [`Cancellable`] | [`cancel`] |
//! | `except CancelledError: await cleanup(); raise` | [`Tasks::on_drop`] → [`CleanupGuard`] | [`tasks`] |
//! | `asyncio.shield(task)` | [`Tasks::shield`] → [`Shielded`] | [`shield`] |
//! | `asyncio.Queue(maxsize=n)` | [`queue::bounded`] (or [`queue::bounded_in_bytes`]) → [`Producer`], [`Consumer`] | [`queue`] |
//! | `asyncio.gather` under one timeout | [`Gather::all`] → [`Gathered`] | [`gather`] |
//! | first-completed wins | [`Gather::race`] | [`gather`] |
//!
//! The lesson's programs are ported in `examples/` (`cargo run -p sluice-flow --example cancel`).
//!
//! ## Rust's cancellation model, and how cleanup is done here
//!
//! - **Dropping a future is cancelling it.** There is no exception delivered at the next
//!   `.await`: the future is simply never polled again and its state is dropped. `select!`,
//!   `timeout` and aborting a task all cancel this way.
//! - **Cleanup that needs no `.await` goes in `Drop`.** It runs on every path, including
//!   cancellation, exactly once.
//! - **There is no async drop.** Cleanup that must `.await` (a database write, a graceful close)
//!   cannot run in `Drop`. Here such work holds a [`CleanupGuard`]: if the work is dropped, the
//!   guard hands its cleanup future to a tracked task. [`Tasks::shutdown`] waits for all of those,
//!   with a bound.
//! - **Work that must not be cancelled is moved out of the caller's future.** [`Tasks::shield`]
//!   spawns it as a tracked task; the caller can be dropped and the work still finishes.
//! - **A cancellation is never silent.** Every API that can be cut short returns a typed,
//!   `#[must_use]` outcome ([`Timed`], [`Cancellable`], [`Gathered`], [`Drained`]) and cancelled
//!   work records *why* ([`CancelCause`]), so the cause of an ending travels as a value.
//! - **Cancel safety.** A future is cancel-safe if dropping it before completion loses nothing.
//!   Dropping a half-done read in `select!` loses what it read; this crate never drops an inner
//!   stream's `next()` to enforce a timer (see [`limits`] and `tests/pitfalls.rs`).

pub mod cancel;
pub mod deadline;
pub mod gather;
pub mod generator;
pub mod limits;
pub mod queue;
pub mod shield;
pub mod tasks;

pub use cancel::{CancelCause, CancelOnDrop, CancelToken, Cancellable, Cancelled};
pub use deadline::{timeout, Deadline, Expired, Timed};
pub use gather::{Gather, Gathered, TaskOutcome, TaskReport};
pub use generator::{stream, try_stream, FusedStream, Stream, StreamExt};
pub use limits::{Event, Limit, LimitExceeded, Limited, StreamLimits};
pub use queue::{Consumer, Departed, Producer, QueueError, TrySendError};
pub use shield::{ShieldError, Shielded};
pub use tasks::{CleanupGuard, Drained, Tasks};
