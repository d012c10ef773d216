//! An upstream's connections: opened, driven and kept for reuse by the streams that use them,
//! over HTTP/1.1 or HTTP/2.
//!
//! Why not hyper-util's pooled client, which sluice used before? It runs every connection as a
//! task of its own: each chunk the upstream sends is read by that task and handed to the relay's
//! task through a channel (a wake-up per chunk), the request is handed to it and the response
//! back (two more per stream), and a stream that ends early closes its connection only once
//! that task runs again. Here a stream polls its HTTP/1 connection itself, in its own task
//! ([`Lease::drive`]): the bytes a chunk arrives in are read by the task that relays it, and
//! dropping the stream closes the socket there and then.
//!
//! The pool keeps HTTP/1 connections between streams (keep-alive): at most `max_idle` of them,
//! each for at most `idle_for`. An idle connection is not polled while it waits, so one the
//! upstream closed meanwhile is found when it is next taken (it is polled once, without
//! waiting, and dropped if it has ended) or when the sweep drops it at its age limit. A request
//! that a reused connection could not send is sent again on a new one, as hyper-util did; a
//! request that was sent is never sent twice.
//!
//! An HTTP/2 connection (an `https` upstream that offers `h2` in TLS's ALPN, or any upstream
//! configured with `http_version = "2"`, over plain TCP with prior knowledge: h2c) carries up to
//! [`H2_STREAMS`] streams at once, so a thousand streams to one upstream hold ten connections, not
//! a thousand. It is shared, so it is driven by a task of its own (the hop per chunk that HTTP/1
//! avoids); a stream that ends early resets its HTTP/2 stream (`RST_STREAM`), the connection
//! stays up for the others. While an upstream may speak HTTP/2, one stream at a time opens a
//! connection, so that a burst of streams shares it instead of opening one each. An HTTP/2
//! connection with no stream is closed after `idle_for`, and one the upstream stops answering
//! pings for [`H2_PING_TIMEOUT`] is closed with its streams failed. What an HTTP/2 stream may
//! hold unread is bounded by its flow-control window ([`H2_STREAM_WINDOW`]): a slow client's
//! stream stops the upstream's sending there, as a full socket buffer does over HTTP/1.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::http::uri::{Parts, Scheme};
use hyper::{header, Request, Response, Uri};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower_service::Service;

/// What a connection runs over: TCP, or TLS over TCP for `https`.
type Io = MaybeHttpsStream<TokioIo<TcpStream>>;
type Sender = http1::SendRequest<Full<Bytes>>;
/// Boxed: about 1.8 KB (the TLS state is in it), which a stream's future would otherwise hold
/// inline, in every state, even over HTTP/2 or before its connection exists.
type Connection = Box<http1::Connection<Io, Full<Bytes>>>;
type Sender2 = http2::SendRequest<Full<Bytes>>;

/// Why an exchange failed before a response came: the connection could not be opened, or broke.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The most streams sluice opens at once on one HTTP/2 connection (a connection at this many
/// opens another). Also the default of most servers' `SETTINGS_MAX_CONCURRENT_STREAMS`; a
/// server that allows fewer makes the extra streams wait for a place on that connection.
pub const H2_STREAMS: usize = 100;

/// How much of its answer one HTTP/2 stream may have received and not yet read (its
/// flow-control window): 128 KiB.
pub const H2_STREAM_WINDOW: u32 = 128 * 1024;

/// How often an HTTP/2 connection with streams pings the upstream, and how long it waits for the
/// answer before it closes the connection and fails its streams.
pub const H2_PING_INTERVAL: Duration = Duration::from_secs(20);

/// See [`H2_PING_INTERVAL`].
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The largest response head an HTTP/2 upstream may send (hyper's default, said here).
const H2_MAX_HEADERS: u32 = 16 * 1024;

/// Which HTTP versions an upstream's connections speak (`http_version` in the config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum HttpVersion {
    /// HTTP/2 when an `https` upstream offers it (TLS's ALPN), else HTTP/1.1; plain `http` is
    /// HTTP/1.1, as an upstream cannot offer anything there.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// HTTP/1.1 only.
    #[serde(rename = "1.1")]
    Http1,
    /// HTTP/2 only: over `https` by ALPN (an upstream that does not offer it fails to
    /// connect), over plain `http` with prior knowledge (h2c).
    #[serde(rename = "2")]
    Http2,
}

/// The connections to one upstream (one scheme, host and port).
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// Where connections go (its scheme, host and port; the path is the request's).
    address: Uri,
    version: HttpVersion,
    max_idle: usize,
    idle_for: Duration,
    idle: Mutex<Idle>,
    /// Held by the stream that opens a connection while the upstream may speak HTTP/2.
    connecting: tokio::sync::Mutex<()>,
    /// A connection of this upstream negotiated HTTP/1.1 (`auto` over TLS): connections are not
    /// shared, so they are opened without waiting for each other.
    spoke_http1: AtomicBool,
}

/// The connections waiting for their next request, oldest first, and the HTTP/2 connections.
#[derive(Default)]
struct Idle {
    connections: Vec<Waiting>,
    shared: Vec<Shared>,
    /// Whether a sweep task is running (it ends when nothing is left to sweep).
    sweeping: bool,
    /// The id of the next HTTP/2 connection.
    next_id: u64,
}

struct Waiting {
    sender: Sender,
    connection: Connection,
    since: Instant,
}

/// An HTTP/2 connection (driven by a task of its own) and the streams it carries.
struct Shared {
    id: u64,
    sender: Sender2,
    streams: usize,
    /// Since when it has carried no stream.
    since: Instant,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("version", &self.version)
            .field("max_idle", &self.max_idle)
            .field("idle_for", &self.idle_for)
            .field("idle", &self.idle_count())
            .field("http2", &self.http2_count())
            .finish()
    }
}

/// One exchange's hold on its connection. Dropping it closes an HTTP/1 connection (an HTTP/2
/// stream is reset when its response or body is dropped; the connection stays).
pub struct Lease {
    kind: LeaseKind,
}

enum LeaseKind {
    /// An HTTP/1 connection of its own, driven by whoever drives the lease.
    Http1 {
        sender: Sender,
        /// `None` once the connection has ended (closed, or failed: whoever waits on it has
        /// been told how).
        connection: Option<Connection>,
        pool: Weak<Pool>,
    },
    /// A place on a shared HTTP/2 connection, held for its `Drop`.
    Http2 { _place: Place },
}

/// A stream's place on an HTTP/2 connection, given back when dropped.
struct Place {
    id: u64,
    pool: Weak<Pool>,
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.leave(self.id);
        }
    }
}

impl Pool {
    /// A pool that opens connections to `address` with `connector` (which must offer in ALPN
    /// what `version` allows: see [`connector`]) and keeps at most `max_idle` idle HTTP/1
    /// connections for at most `idle_for` each (an HTTP/2 connection with no stream, too).
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        address: Uri,
        version: HttpVersion,
        max_idle: usize,
        idle_for: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            connector,
            address,
            version,
            max_idle,
            idle_for,
            idle: Mutex::new(Idle::default()),
            connecting: tokio::sync::Mutex::new(()),
            spoke_http1: AtomicBool::new(false),
        })
    }

    /// The HTTP versions its connections speak.
    pub fn version(&self) -> HttpVersion {
        self.version
    }

    /// How many HTTP/1 connections wait for a request.
    pub fn idle_count(&self) -> usize {
        self.lock().connections.len()
    }

    /// How many HTTP/2 connections are open (with streams or not), not counting one that has
    /// ended and is not yet dropped.
    pub fn http2_count(&self) -> usize {
        self.lock()
            .shared
            .iter()
            .filter(|s| !s.sender.is_closed())
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether this upstream can have HTTP/2 connections at all (plain `http` only if
    /// configured for it).
    fn can_share(&self) -> bool {
        match self.version {
            HttpVersion::Http1 => false,
            HttpVersion::Http2 => true,
            HttpVersion::Auto => self.address.scheme() == Some(&Scheme::HTTPS),
        }
    }

    /// Whether a new connection to this upstream may turn out to be HTTP/2: it can have them,
    /// and has not answered HTTP/1.1 to `auto` (only `auto` learns that).
    pub(crate) fn may_share(&self) -> bool {
        self.can_share() && !self.spoke_http1.load(Ordering::Relaxed)
    }

    /// Sends `request` (its URI in origin form, with a `Host` header) on an HTTP/2 connection
    /// with room, an idle HTTP/1 connection, or a new one; returns the response's head, and the
    /// lease, which the caller drives while it reads the body ([`Lease::drive`]).
    pub async fn send(
        self: Arc<Self>,
        mut request: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, Lease), Error> {
        // If it cannot have HTTP/2 connections, no lock is taken to look for one.
        let can_share = self.can_share();
        loop {
            if let Some((sender, place)) = can_share.then(|| self.take_shared()).flatten() {
                // Boxed, as below: an HTTP/1 stream's future keeps no room for HTTP/2's states.
                match Box::pin(self.send_shared(sender, place, request)).await? {
                    Ok(sent) => return Ok(sent),
                    // Not sent: that connection has ended (it is no longer offered).
                    Err(unsent) => {
                        request = unsent;
                        continue;
                    }
                }
            }
            // Each exchange is boxed, so that this future, which waits for the response, holds
            // only the state of the one it waits on: the connection (about 1.8 KB) while it is
            // sent, and none of it while another is opened.
            loop {
                let Some(lease) = self.take() else { break };
                match Box::pin(send_http1(lease, request)).await? {
                    Ok(sent) => return Ok(sent),
                    // Not sent: the connection had ended. Try the next.
                    Err(unsent) => request = unsent,
                }
            }
            // One stream at a time opens a connection that may be shared; the others then
            // find room on it above.
            let gate = if self.may_share() {
                let gate = self.connecting.lock().await;
                if self.has_room() {
                    continue;
                }
                // The connection opened meanwhile may have been HTTP/1.1 (`auto` over TLS):
                // then nothing will be shared, and no one need wait for this one.
                self.may_share().then_some(gate)
            } else {
                None
            };
            // Boxed: a stream that finds a connection keeps no room for opening one.
            let opened = Box::pin(self.connect()).await?;
            drop(gate);
            let sent = match opened {
                Opened::Http1(lease) => Box::pin(send_http1(lease, request)).await?,
                Opened::Http2(sender, place) => {
                    Box::pin(self.send_shared(sender, place, request)).await?
                }
            };
            return sent.map_err(|_| "the upstream closed a new connection at once".into());
        }
    }

    /// Sends `request` on an HTTP/2 connection: the response's head and the lease, or, if the
    /// connection had ended before the request was sent, the request back (`Ok(Err(request))`).
    async fn send_shared(
        &self,
        mut sender: Sender2,
        place: Place,
        mut request: Request<Full<Bytes>>,
    ) -> Result<Result<(Response<Incoming>, Lease), Request<Full<Bytes>>>, Error> {
        // HTTP/2 names the upstream in the request's `:authority`, from an absolute URI.
        let mut parts = Parts::default();
        parts.scheme = self.address.scheme().cloned();
        parts.authority = self.address.authority().cloned();
        parts.path_and_query = request.uri().path_and_query().cloned();
        *request.uri_mut() = Uri::from_parts(parts)?;
        // HTTP/2 says it in `:authority`. (hyper leaves out the connection-specific headers
        // HTTP/2 forbids, which an upstream's extra headers might name.)
        request.headers_mut().remove(header::HOST);
        match sender.try_send_request(request).await {
            Ok(response) => Ok(Ok((
                response,
                Lease {
                    kind: LeaseKind::Http2 { _place: place },
                },
            ))),
            Err(mut e) => match e.take_message() {
                Some(unsent) => {
                    // That connection takes no more streams: it is not offered again, even if it
                    // has not yet told its handle that it has ended.
                    self.lock().shared.retain(|s| s.id != place.id);
                    Ok(Err(unsent))
                }
                None => Err(e.into_error().into()),
            },
        }
    }

    /// Whether an HTTP/2 connection that is open has room for another stream.
    fn has_room(&self) -> bool {
        self.lock()
            .shared
            .iter()
            .any(|s| s.streams < H2_STREAMS && !s.sender.is_closed())
    }

    /// A place on the HTTP/2 connection with the most streams that still has room, if any
    /// (filling one connection before the next lets the others close when idle).
    fn take_shared(self: &Arc<Self>) -> Option<(Sender2, Place)> {
        let mut idle = self.lock();
        idle.shared.retain(|s| !s.sender.is_closed());
        let shared = idle
            .shared
            .iter_mut()
            .filter(|s| s.streams < H2_STREAMS)
            .max_by_key(|s| s.streams)?;
        shared.streams += 1;
        let place = Place {
            id: shared.id,
            pool: Arc::downgrade(self),
        };
        Some((shared.sender.clone(), place))
    }

    /// A stream left HTTP/2 connection `id`.
    fn leave(self: &Arc<Self>, id: u64) {
        let sweep = {
            let mut idle = self.lock();
            let Some(shared) = idle.shared.iter_mut().find(|s| s.id == id) else {
                return;
            };
            shared.streams = shared.streams.saturating_sub(1);
            if shared.streams > 0 {
                return;
            }
            shared.since = Instant::now();
            !std::mem::replace(&mut idle.sweeping, true)
        };
        if sweep {
            self.start_sweep();
        }
    }

    /// The newest idle HTTP/1 connection that is still open, if any.
    fn take(self: &Arc<Self>) -> Option<Lease> {
        loop {
            let Waiting {
                sender,
                mut connection,
                since,
            } = self.lock().connections.pop()?;
            if since.elapsed() >= self.idle_for {
                // The newest is too old, so all are.
                self.lock().connections.clear();
                return None;
            }
            // Has the upstream closed it meanwhile? One poll reads what is there, no waiting.
            let mut cx = Context::from_waker(Waker::noop());
            if Pin::new(&mut *connection).poll(&mut cx).is_ready() || !sender.is_ready() {
                continue;
            }
            return Some(Lease {
                kind: LeaseKind::Http1 {
                    sender,
                    connection: Some(connection),
                    pool: Arc::downgrade(self),
                },
            });
        }
    }

    /// Opens a connection: HTTP/2 if the upstream is configured for it or offered it in ALPN
    /// (then it is started, offered to other streams, and a place on it is taken), else HTTP/1.
    async fn connect(self: &Arc<Self>) -> Result<Opened, Error> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx)).await?;
        // In a block of its own: a local that was borrowed keeps its place in this future
        // until its scope ends, and the connection (about 1.1 KB) would then be held twice
        // while its handshake runs.
        let (io, h2) = {
            let io = connector.call(self.address.clone()).await?;
            let h2 = match self.version {
                HttpVersion::Http1 => false,
                HttpVersion::Auto => io.connected().is_negotiated_h2(),
                HttpVersion::Http2 => {
                    if matches!(io, MaybeHttpsStream::Https(_))
                        && !io.connected().is_negotiated_h2()
                    {
                        return Err("the upstream did not offer HTTP/2 (ALPN), which \
                                    http_version = \"2\" requires"
                            .into());
                    }
                    true
                }
            };
            (io, h2)
        };
        metrics::counter!(
            "sluice_upstream_connections_opened_total",
            "version" => if h2 { "2" } else { "1.1" }
        )
        .increment(1);
        if !h2 {
            if self.version == HttpVersion::Auto {
                self.spoke_http1.store(true, Ordering::Relaxed);
            }
            let (sender, connection) = http1::handshake(io).await?;
            let connection = Box::new(connection);
            return Ok(Opened::Http1(Lease {
                kind: LeaseKind::Http1 {
                    sender,
                    connection: Some(connection),
                    pool: Arc::downgrade(self),
                },
            }));
        }
        // Boxed (and its builder dropped before the wait): an HTTP/1 stream's future keeps no
        // room for HTTP/2's handshake.
        let handshake = Box::pin(
            http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(H2_STREAM_WINDOW)
                // Every stream's whole window: a stream whose client reads slowly never holds up
                // the others on its connection.
                .initial_connection_window_size(H2_STREAM_WINDOW.saturating_mul(H2_STREAMS as u32))
                .max_header_list_size(H2_MAX_HEADERS)
                .keep_alive_interval(H2_PING_INTERVAL)
                .keep_alive_timeout(H2_PING_TIMEOUT)
                .handshake(io),
        );
        let (sender, connection) = handshake.await?;
        // Shared by the streams on it, so driven by a task of its own. It ends when the
        // upstream closes it, or once the pool has let it go and its last stream has ended.
        #[allow(
            clippy::disallowed_methods,
            reason = "a shared connection's driver: it ends with the connection, nothing waits for it"
        )]
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "an HTTP/2 upstream connection ended");
            }
        });
        let id = {
            let mut idle = self.lock();
            let id = idle.next_id;
            idle.next_id += 1;
            idle.shared.push(Shared {
                id,
                sender: sender.clone(),
                streams: 1,
                since: Instant::now(),
            });
            id
        };
        let place = Place {
            id,
            pool: Arc::downgrade(self),
        };
        Ok(Opened::Http2(sender, place))
    }

    /// Keeps `waiting` for the next request, unless the pool is full.
    fn keep(self: &Arc<Self>, waiting: Waiting) {
        let sweep = {
            let mut idle = self.lock();
            if idle.connections.len() >= self.max_idle {
                return;
            }
            idle.connections.push(waiting);
            !std::mem::replace(&mut idle.sweeping, true)
        };
        if sweep {
            self.start_sweep();
        }
    }

    fn start_sweep(self: &Arc<Self>) {
        // Only ever called from a stream, so in the runtime. Not tracked: it holds nothing
        // but idle connections, which shutdown may drop as they are.
        #[allow(
            clippy::disallowed_methods,
            reason = "the sweep ends when the pool is empty or gone; nothing waits for it"
        )]
        tokio::spawn(sweep_loop(Arc::downgrade(self)));
    }

    /// Drops the connections idle for `idle_for` or longer; returns how long until the next
    /// one is, or `None` (and the sweep ends) if none is left.
    fn sweep(&self) -> Option<Duration> {
        let mut idle = self.lock();
        let now = Instant::now();
        let fresh = |since: Instant| now.saturating_duration_since(since) < self.idle_for;
        idle.connections.retain(|w| fresh(w.since));
        idle.shared
            .retain(|s| (s.streams > 0 || fresh(s.since)) && !s.sender.is_closed());
        let oldest = idle
            .connections
            .first()
            .map(|w| w.since)
            .into_iter()
            .chain(
                idle.shared
                    .iter()
                    .filter(|s| s.streams == 0)
                    .map(|s| s.since),
            )
            .min();
        match oldest {
            Some(since) => Some(
                self.idle_for
                    .saturating_sub(now.saturating_duration_since(since)),
            ),
            None => {
                idle.sweeping = false;
                None
            }
        }
    }
}

/// A new connection: HTTP/1, or a place on a new HTTP/2 one.
enum Opened {
    Http1(Lease),
    Http2(Sender2, Place),
}

/// Sends `request` on the HTTP/1 connection of `lease`: the response's head and the lease, or,
/// if the connection had ended before the request was sent, the request back
/// (`Ok(Err(request))`).
async fn send_http1(
    mut lease: Lease,
    request: Request<Full<Bytes>>,
) -> Result<Result<(Response<Incoming>, Lease), Request<Full<Bytes>>>, Error> {
    let LeaseKind::Http1 { sender, .. } = &mut lease.kind else {
        return Err("an HTTP/2 stream taken for an HTTP/1 connection".into());
    };
    let sent = sender.try_send_request(request);
    match lease.drive(sent).await {
        Ok(response) => Ok(Ok((response, lease))),
        Err(mut e) => match e.take_message() {
            Some(unsent) => Ok(Err(unsent)),
            None => Err(e.into_error().into()),
        },
    }
}

/// What opens an upstream's connections for `version`: TCP (no Nagle delay), and TLS over it
/// for `https` (the Mozilla root certificates), offering in ALPN the versions `version` allows.
pub fn connector(version: HttpVersion) -> Result<HttpsConnector<HttpConnector>, rustls::Error> {
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        .https_or_http();
    Ok(offering(builder, version))
}

/// `builder`'s connector, offering in ALPN the versions `version` allows.
fn offering(
    builder: hyper_rustls::HttpsConnectorBuilder<hyper_rustls::builderstates::WantsProtocols1>,
    version: HttpVersion,
) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    // The TLS connector takes `https` URLs; this one must let them through to it.
    http.enforce_http(false);
    match version {
        HttpVersion::Http1 => builder.enable_http1().wrap_connector(http),
        HttpVersion::Auto => builder.enable_all_versions().wrap_connector(http),
        HttpVersion::Http2 => builder.enable_http2().wrap_connector(http),
    }
}

/// A connector that trusts `roots` instead of the Mozilla roots (tests' own certificates).
#[cfg(test)]
pub(crate) fn connector_trusting(
    roots: rustls::RootCertStore,
    version: HttpVersion,
) -> HttpsConnector<HttpConnector> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|c| c.with_root_certificates(roots).with_no_client_auth());
    match config {
        Ok(config) => offering(
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(config)
                .https_or_http(),
            version,
        ),
        Err(e) => panic!("no TLS config: {e}"),
    }
}

/// Drops idle connections as they reach their age limit, so that none is held past it when no
/// stream comes to take it; ends when the pool is empty or gone.
async fn sweep_loop(pool: Weak<Pool>) {
    let mut wait = Duration::ZERO;
    loop {
        tokio::time::sleep(wait).await;
        let Some(pool) = pool.upgrade() else { return };
        match pool.sweep() {
            Some(next) => wait = next,
            None => return,
        }
    }
}

impl Lease {
    /// Waits for `work` (the response, or the next frame of its body) while polling the
    /// connection, which does the reading and writing they wait on (an HTTP/2 connection is
    /// driven by its own task).
    pub async fn drive<F: Future>(&mut self, work: F) -> F::Output {
        let mut work = pin!(work);
        poll_fn(|cx| {
            self.poll_connection(cx);
            work.as_mut().poll(cx)
        })
        .await
    }

    fn poll_connection(&mut self, cx: &mut Context<'_>) {
        if let LeaseKind::Http1 {
            connection: slot @ Some(_),
            ..
        } = &mut self.kind
        {
            // Ended: closed or failed; the response or body waiting on it gets the error.
            if slot
                .as_mut()
                .is_some_and(|c| Pin::new(c).poll(cx).is_ready())
            {
                *slot = None;
            }
        }
    }

    /// Gives an HTTP/1 connection back to the pool if `body` has ended and the connection can
    /// take another request; otherwise closes it. Does not wait: what the upstream has not sent
    /// yet (the end of a chunked body after the stream's `[DONE]`, say) is not waited for. An
    /// HTTP/2 stream's place is given back (its stream reset if the body has not ended).
    pub fn release(mut self, body: &mut Incoming) {
        use http_body_util::BodyExt;
        if matches!(self.kind, LeaseKind::Http2 { .. }) {
            return;
        }
        let mut cx = Context::from_waker(Waker::noop());
        // What is already here of the body's end is read now. Anything else (more data after
        // the stream's end, a trailer, nothing yet): the connection is not kept.
        self.poll_connection(&mut cx);
        if !matches!(Pin::new(&mut body.frame()).poll(&mut cx), Poll::Ready(None)) {
            return;
        }
        // Once more, so that the connection takes in that its exchange is over.
        self.poll_connection(&mut cx);
        let LeaseKind::Http1 {
            sender,
            connection,
            pool,
        } = self.kind
        else {
            return;
        };
        let (Some(connection), Some(pool)) = (connection, pool.upgrade()) else {
            return;
        };
        if sender.is_ready() {
            pool.keep(Waiting {
                sender,
                connection,
                since: Instant::now(),
            });
        }
    }
}
