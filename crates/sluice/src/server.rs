//! The server's lifecycle: start, serve, shut down without losing a transcript.
//!
//! Shutdown is its own concept, with its phases and their bounds: see [`crate::shutdown`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use sluice_flow::{Drained, Tasks};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::api::{self, AppState};
use crate::auth::Keys;
use crate::config::Config;
use crate::hub::Hub;
use crate::relay::RelayContext;
use crate::shutdown::{Bounds, Shutdown};
use crate::store::{Change, Store, StoreError};
use crate::stream::{StreamId, Tenant};

/// The largest request head (request line and headers) accepted. It also caps each
/// connection's read buffer, which hyper otherwise grows to 16 KB and keeps while the
/// connection idles: at 10,000 open streams that is 80 MB.
const MAX_HEAD_BYTES: usize = 8192;

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened or flushed.
    #[error("the store failed")]
    Store(#[from] StoreError),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// No API keys are configured and the address is not loopback.
    #[error("refusing to listen on {addr} without API keys: anyone who can reach it could use and read every stream. Add [[keys]] to the config (sluice keys new --tenant NAME) or listen on 127.0.0.1")]
    Insecure {
        /// The address.
        addr: SocketAddr,
    },
    /// Serving failed.
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// What shutdown did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Whether every tracked task (relays, shielded writes) finished within the bound.
    pub drained: Drained,
}

/// A running gateway. Dropping it begins its shutdown.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    store: Store,
    recovered: u64,
    shutdown: Shutdown,
    task: JoinHandle<Result<ShutdownReport, ServeError>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.begin();
    }
}

impl Server {
    /// Binds `config.listen` and starts serving.
    pub async fn bind(config: Config) -> Result<Self, ServeError> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| ServeError::Bind {
                addr: config.listen,
                reason: e.to_string(),
            })?;
        Self::start(config, listener).await
    }

    /// Starts serving on `listener`.
    pub async fn start(config: Config, listener: TcpListener) -> Result<Self, ServeError> {
        let addr = listener.local_addr()?;
        let keys = Arc::new(Keys::new(&config.keys));
        if !keys.enabled() && !addr.ip().is_loopback() {
            return Err(ServeError::Insecure { addr });
        }
        // The recorder first: the store looks up its metrics' handles when it opens.
        crate::metrics::handle();
        let (store, recovered) = match &config.store_url {
            Some(url) => Store::connect(url, config.store_options).await?,
            None => Store::open(&config.data_dir)?,
        };
        if recovered > 0 {
            tracing::warn!(
                streams = recovered,
                "marked streams left open by a crash as interrupted(crash)"
            );
        }
        let tasks = Tasks::new();
        let shutdown = Shutdown::new(Bounds::with_grace(config.shutdown_grace));
        let relay = Arc::new(RelayContext {
            store: store.clone(),
            tasks: tasks.clone(),
            shutdown: shutdown.streams().clone(),
            hub: Arc::new(Hub::default()),
            buffer_chunks: config.buffer_chunks,
            buffer_bytes: config.buffer_bytes,
            redactor: config.redactor.clone(),
            slow_client_timeout: config.slow_client_timeout,
            keep_alive: config.keep_alive,
            record_chunks: config.record_chunks,
        });
        if let Some(news) = store.changes() {
            tasks.spawn(forward_cancels(news, relay.hub.clone(), shutdown.clone()));
        }
        if let Some(keep) = config.retention {
            tasks.spawn(expire(store.clone(), keep, shutdown.clone()));
        }
        let send_buffer = config.send_buffer_bytes;
        let app = api::router(AppState {
            config: Arc::new(config),
            relay,
            keys,
        });
        #[allow(
            clippy::disallowed_methods,
            reason = "the serving task: `Server::shutdown` joins it, and dropping the Server begins its shutdown"
        )]
        let task = tokio::spawn(run(
            listener,
            app,
            send_buffer,
            shutdown.clone(),
            tasks,
            store.clone(),
        ));
        tracing::info!(%addr, page = %format!("http://{addr}/"), "sluice is listening; its web page is at `page`");
        Ok(Self {
            addr,
            store,
            recovered,
            shutdown,
            task,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// How many streams a previous crash had left open (now `interrupted(crash)`).
    pub fn recovered(&self) -> u64 {
        self.recovered
    }

    /// Shuts down (see the module docs) and waits until it is done.
    pub async fn shutdown(mut self) -> Result<ShutdownReport, ServeError> {
        self.shutdown.begin();
        self.wait().await
    }

    /// Serves until `signal` completes, then shuts down.
    pub async fn serve_until(
        self,
        signal: impl Future<Output = ()>,
    ) -> Result<ShutdownReport, ServeError> {
        signal.await;
        self.shutdown().await
    }

    async fn wait(&mut self) -> Result<ShutdownReport, ServeError> {
        (&mut self.task)
            .await
            .map_err(|e| ServeError::Io(std::io::Error::other(e.to_string())))?
    }
}

/// Cancels the streams of this node that another node was asked to cancel, until shutdown
/// begins (then every stream here is being ended anyway).
async fn forward_cancels(
    mut news: tokio::sync::broadcast::Receiver<Change>,
    hub: Arc<Hub>,
    shutdown: Shutdown,
) {
    loop {
        let change = tokio::select! {
            () = shutdown.begun() => return,
            change = news.recv() => change,
        };
        match change {
            Ok(Change::Cancel { tenant, id }) => {
                // Not running here is the usual answer: it runs on another node.
                let _ = hub.cancel(Tenant(&tenant), StreamId(&id));
            }
            Ok(Change::Progress(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "cross-node news lagged: some cancel requests may have been missed"
                );
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// How often streams past their retention are forgotten.
const EXPIRE_EVERY: Duration = Duration::from_secs(600);

/// Forgets the streams that ended and started more than `keep` ago, at start and then every
/// [`EXPIRE_EVERY`], until shutdown begins.
async fn expire(store: Store, keep: Duration, shutdown: Shutdown) {
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let before = now.saturating_sub(keep.as_secs()) as i64;
        if let Err(e) = store.expire(before).await {
            tracing::warn!(error = %e.report(), "streams past their retention were not expired");
        }
        tokio::select! {
            () = shutdown.begun() => return,
            () = tokio::time::sleep(EXPIRE_EVERY) => {}
        }
    }
}

/// Serves until shutdown begins, then runs its phases and flushes the store.
async fn run(
    listener: TcpListener,
    app: axum::Router,
    send_buffer: Option<usize>,
    shutdown: Shutdown,
    tasks: Tasks,
    store: Store,
) -> Result<ShutdownReport, ServeError> {
    let stop_accepting = {
        let shutdown = shutdown.clone();
        async move { shutdown.begun().await }
    };
    let connections = serve_connections(listener, app, send_buffer, stop_accepting);
    let drained = shutdown.drive(connections, &tasks).await?;
    store.flush().await?;
    tracing::info!("shutdown complete");
    Ok(ShutdownReport { drained })
}

/// Accepts connections and serves `app` on each (HTTP/1.1) until `signal`; then stops accepting
/// and waits for the open connections to finish (idle keep-alive connections are closed, and
/// each in-flight response is let finish). What `axum::serve` does, plus a cap on each
/// connection's buffers, writes from one buffer (see below) and our socket options.
async fn serve_connections(
    listener: TcpListener,
    app: axum::Router,
    send_buffer: Option<usize>,
    signal: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.max_buf_size(MAX_HEAD_BYTES)
        // A response's body bytes are copied into the connection's write buffer (the 8 KB one
        // hyper keeps for heads anyway) and sent with one `write`, rather than queued as a list
        // for `writev`: that list is an allocation every streaming connection keeps for its
        // whole life (0.4 KB of RSS per idle stream), where the copy costs ~160 instructions
        // per chunk of an event stream (1.3% of a chunk's; docs/benchmarks/idle.md). The
        // buffer holds up to `max_buf_size` plus one piece of a body, which the edge cuts to
        // `api::edge::WRITE_PIECE`: at most 16 KB, kept for the connection's life.
        .writev(false)
        .timer(hyper_util::rt::TokioTimer::new());
    tokio::pin!(signal);
    loop {
        let tcp = tokio::select! {
            () = &mut signal => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot turn off Nagle's algorithm: small chunks may wait");
        }
        if let Some(bytes) = send_buffer {
            if let Err(e) = socket2::SockRef::from(&tcp).set_send_buffer_size(bytes) {
                tracing::warn!(error = %e, bytes, "cannot set send_buffer_bytes on a connection");
            }
        }
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection =
            graceful.watch(http.serve_connection(hyper_util::rt::TokioIo::new(tcp), service));
        #[allow(
            clippy::disallowed_methods,
            reason = "one connection: `graceful` (hyper's GracefulShutdown) waits for each, and shutdown bounds that wait"
        )]
        // The connection future itself is the task (mapped, not awaited in an async block: a
        // block would hold the future twice, as its capture and as what it awaits, 1.6 KB
        // instead of 0.8 KB for every open connection).
        tokio::spawn(connection.map(|ended| {
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }));
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
