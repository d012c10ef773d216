//! # sluice: a streaming chat gateway
//!
//! Users point any OpenAI-compatible client at sluice instead of at their model server. sluice
//! relays each chunk the moment it arrives and gets the hard parts of streaming right: deadlines
//! around the whole stream, prompt upstream cancellation when a client leaves, backpressure for
//! slow clients, and a transcript of every stream that is written even when the request is
//! cancelled or the server stops.
//!
//! One request, end to end:
//! ```text
//! client ──HTTP──▶ api ──▶ relay ──▶ upstream (openai | sim) ──▶ model server
//!                           │
//!                           ▼
//!                         store (SQLite) ◀── shielded final write
//! ```
//! - [`api`] parses and validates, and turns relay outcomes into HTTP and SSE (its
//!   [`edge`](api::edge) checks Host and Origin, and logs every request, before any handler);
//! - [`relay`] composes the `sluice-flow` patterns for one stream;
//! - [`upstream`] turns a provider into a stream of chunks;
//! - [`store`] persists streams and chunks;
//! - [`server`] owns the lifecycle (start, crash recovery, serving connections);
//! - [`shutdown`] is how the server stops: phases, each bounded, no transcript lost;
//! - [`hub`] lets resumers follow, and the cancel API stop, a running stream;
//! - [`follow`] reads a stream from any point: replay from the store, then the live feed;
//! - [`auth`] maps API keys to tenants and enforces per-key limits;
//! - [`redact`] keeps upstream keys out of everything that leaves the process;
//! - [`config`], [`metrics`], [`stream`], [`mock_upstream`], [`cli`] do what they say.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;

pub mod follow;
#[doc(hidden)]
pub mod fuzzing;
pub mod hub;
pub mod metrics;
pub mod mock_upstream;
pub mod redact;
pub mod relay;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod stream;
pub mod upstream;

pub use config::{Config, Overrides};
pub use server::{Server, ShutdownReport};
