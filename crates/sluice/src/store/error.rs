//! [`StoreError`]: why a store operation failed, with what caused it.

use std::path::PathBuf;
use std::sync::Arc;

/// Why a store operation failed. Cheap to clone (one failed batch answers every write in it);
/// each variant keeps its cause as [`source`](std::error::Error::source).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("database error")]
    Db(#[source] Arc<rusqlite::Error>),
    /// PostgreSQL said no, or could not be reached.
    #[error("PostgreSQL error")]
    Postgres(#[source] Arc<tokio_postgres::Error>),
    /// The data directory or a thread of the store could not be made.
    #[error("{what}")]
    Io {
        /// What could not be done.
        what: String,
        /// Why.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A stored block of chunks could not be read back.
    #[error("a stored block of stream {stream} is damaged")]
    Damaged {
        /// The stream whose block it is.
        stream: String,
        /// What is wrong with it.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The store's own machinery failed (a panic in a batch, a lost task, no runtime).
    #[error("{0}")]
    Internal(String),
    /// The writer has stopped (the store was closed).
    #[error("the store is closed")]
    Closed,
    /// A new stream's key already has `limit` streams running (counted across every node
    /// sharing the store).
    #[error("the key already has {limit} streams running, its limit")]
    KeyBusy {
        /// The key's limit.
        limit: u32,
    },
}

impl StoreError {
    /// A PostgreSQL failure.
    pub(crate) fn postgres(e: tokio_postgres::Error) -> Self {
        StoreError::Postgres(Arc::new(e))
    }

    /// An I/O failure while doing `what`.
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            what: what.into(),
            source: Arc::new(source),
        }
    }

    /// Whether the store cannot be reached (as opposed to refusing one operation): PostgreSQL
    /// down or its connection lost, the writer gone, the disk unreachable. The API answers
    /// these with `503`.
    pub fn is_unavailable(&self) -> bool {
        match self {
            // Not a refusal of this statement: the connection is gone, or the server is going
            // away (SQLSTATE classes 08, connection exception, and 57P, operator intervention:
            // a terminated backend, a shutdown, "cannot connect now").
            StoreError::Postgres(e) => {
                e.is_closed()
                    || e.code().is_none_or(|c| {
                        let code = c.code();
                        code.starts_with("08") || code.starts_with("57P")
                    })
            }
            StoreError::Closed | StoreError::Io { .. } => true,
            StoreError::Db(_)
            | StoreError::Damaged { .. }
            | StoreError::Internal(_)
            | StoreError::KeyBusy { .. } => false,
        }
    }

    /// The error and every cause under it, on one line: what a log line or an error message
    /// shows (`Display` alone is only the outermost).
    pub fn report(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(e) = cause {
            out.push_str(": ");
            out.push_str(&e.to_string());
            cause = e.source();
        }
        out
    }

    /// The data directory that could not be created.
    pub(crate) fn data_dir(dir: PathBuf, source: std::io::Error) -> Self {
        Self::io(format!("cannot create {}", dir.display()), source)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Db(Arc::new(e))
    }
}
