//! Per-key limits in the database, so they hold across nodes (the rules are in
//! `store/limits.rs`). Migration 2 creates two functions; each admission is one round trip:
//!
//! - `sluice_begin_limited`: takes a transaction-scoped advisory lock on the key (admissions of one
//!   key take turns, on every node), counts the key's `streaming` streams, and records the new
//!   stream only under the limit. A place is freed by the stream's final status, or by the lease
//!   sweep that marks a dead node's streams `interrupted(crash)`.
//! - `sluice_take_request`: the key's token bucket in `key_buckets`, under its row lock, refilled
//!   by the database's clock (one clock for every node).

use std::time::Duration;

use super::PgStore;
use crate::store::limits::wait_for_token;
use crate::store::records::now_unix;
use crate::store::{NewStream, StoreError};

impl PgStore {
    /// Records `stream` at once (not through the writer) if its key has fewer than `limit`
    /// streams running; else [`StoreError::KeyBusy`].
    pub(crate) async fn begin_limited(
        &self,
        stream: &NewStream,
        key: &str,
        limit: u32,
    ) -> Result<(), StoreError> {
        let admitted: bool = self
            .reader
            .get()
            .await?
            .query_one(
                "SELECT sluice_begin_limited($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &stream.id,
                    &stream.tenant,
                    &stream.model,
                    &stream.request.to_string(),
                    &now_unix(),
                    &&*self.node,
                    &key,
                    &i64::from(limit),
                ],
            )
            .await
            .map_err(StoreError::postgres)?
            .get(0);
        if admitted {
            Ok(())
        } else {
            Err(StoreError::KeyBusy { limit })
        }
    }

    /// Takes one of `key`'s `per_minute` requests: `None` if admitted, else how long until a
    /// request would be.
    pub(crate) async fn take_request(
        &self,
        key: &str,
        per_minute: u32,
    ) -> Result<Option<Duration>, StoreError> {
        let short: Option<f64> = self
            .reader
            .get()
            .await?
            .query_one(
                "SELECT sluice_take_request($1, $2)",
                &[&key, &f64::from(per_minute)],
            )
            .await
            .map_err(StoreError::postgres)?
            .get(0);
        Ok(short.map(|tokens| wait_for_token(tokens, per_minute)))
    }
}
