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
//! - [`config`], [`metrics`], [`stream`], [`mock_upstream`] do what they say.
//!
//! `docs/design.md` in the repository draws the module graph and says which module owns what.
//!
//! The command line (`src/bin/sluice`: `serve`, `chat`, `streams`, `keys`) is built on this
//! library; its HTTP client for a running gateway lives there too.
#![allow(
    rustdoc::private_intra_doc_links,
    reason = "the crate map names internal modules too; `cargo doc --document-private-items` renders them (scripts/test checks those links)"
)]

pub(crate) mod api;
pub mod auth;
pub mod config;

pub(crate) mod follow;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod hub;
pub(crate) mod metrics;
pub mod mock_upstream;
pub(crate) mod redact;
pub(crate) mod relay;
pub mod server;
pub(crate) mod shutdown;
pub mod store;
pub mod stream;
pub mod upstream;

pub use api::STREAM_ID_HEADER;
pub use config::{Config, Overrides};
pub use server::{Server, ShutdownReport};
