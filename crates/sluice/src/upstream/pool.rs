//! An upstream's HTTP/1 connections: opened, driven and kept for reuse by the streams that use
//! them.
//!
//! Why not hyper-util's pooled client, which sluice used before? It runs every connection as a
//! task of its own: each chunk the upstream sends is read by that task and handed to the relay's
//! task through a channel (a wake-up per chunk), the request is handed to it and the response
//! back (two more per stream), and a stream that ends early closes its connection only once
//! that task runs again. Here a stream polls its connection itself, in its own task
//! ([`Lease::drive`]): the bytes a chunk arrives in are read by the task that relays it, and
//! dropping the stream closes the socket there and then.
//!
//! The pool keeps connections between streams (HTTP/1 keep-alive): at most `max_idle` of them,
//! each for at most `idle_for`. An idle connection is not polled while it waits, so one the
//! upstream closed meanwhile is found when it is next taken (it is polled once, without
//! waiting, and dropped if it has ended) or when the sweep drops it at its age limit. A request
//! that a reused connection could not send is sent again on a new one, as hyper-util did; a
//! request that was sent is never sent twice.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::{Request, Response, Uri};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower_service::Service;

/// What a connection runs over: TCP, or TLS over TCP for `https`.
type Io = MaybeHttpsStream<TokioIo<TcpStream>>;
type Sender = http1::SendRequest<Full<Bytes>>;
type Connection = http1::Connection<Io, Full<Bytes>>;

/// Why an exchange failed before a response came: the connection could not be opened, or broke.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The connections to one upstream (one scheme, host and port).
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// Where connections go (its scheme, host and port; the path is the request's).
    address: Uri,
    max_idle: usize,
    idle_for: Duration,
    idle: Mutex<Idle>,
}

/// The connections waiting for their next request, oldest first.
#[derive(Default)]
struct Idle {
    connections: Vec<Waiting>,
    /// Whether a sweep task is running (it ends when nothing is left to sweep).
    sweeping: bool,
}

struct Waiting {
    sender: Sender,
    connection: Connection,
    since: Instant,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("max_idle", &self.max_idle)
            .field("idle_for", &self.idle_for)
            .field("idle", &self.idle_count())
            .finish()
    }
}

/// One connection, in use by one exchange. Dropping it closes the connection.
pub struct Lease {
    sender: Sender,
    /// `None` once the connection has ended (closed, or failed: whoever waits on it has been
    /// told how).
    connection: Option<Connection>,
    pool: Weak<Pool>,
}

impl Pool {
    /// A pool that opens connections to `address` with `connector` and keeps at most
    /// `max_idle` of them for at most `idle_for` each.
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        address: Uri,
        max_idle: usize,
        idle_for: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            connector,
            address,
            max_idle,
            idle_for,
            idle: Mutex::new(Idle::default()),
        })
    }

    /// How many connections wait for a request.
    pub fn idle_count(&self) -> usize {
        self.lock().connections.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `request` (its URI in origin form, with a `Host` header) on an idle connection,
    /// or a new one; returns the response's head, and the connection, which the caller drives
    /// while it reads the body ([`Lease::drive`]).
    pub async fn send(
        self: Arc<Self>,
        mut request: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, Lease), Error> {
        while let Some(mut lease) = self.take() {
            let sent = lease.sender.try_send_request(request);
            match lease.drive(sent).await {
                Ok(response) => return Ok((response, lease)),
                Err(mut e) => match e.take_message() {
                    // Not sent: the connection had ended. Try the next.
                    Some(unsent) => request = unsent,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        let mut lease = self.connect().await?;
        let sent = lease.sender.send_request(request);
        let response = lease.drive(sent).await?;
        Ok((response, lease))
    }

    /// The newest idle connection that is still open, if any.
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
            if Pin::new(&mut connection).poll(&mut cx).is_ready() || !sender.is_ready() {
                continue;
            }
            return Some(Lease {
                sender,
                connection: Some(connection),
                pool: Arc::downgrade(self),
            });
        }
    }

    async fn connect(self: &Arc<Self>) -> Result<Lease, Error> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx)).await?;
        let io = connector.call(self.address.clone()).await?;
        let (sender, connection) = http1::handshake(io).await?;
        Ok(Lease {
            sender,
            connection: Some(connection),
            pool: Arc::downgrade(self),
        })
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
            // Only ever called from a stream, so in the runtime. Not tracked: it holds nothing
            // but idle connections, which shutdown may drop as they are.
            #[allow(
                clippy::disallowed_methods,
                reason = "the sweep ends when the pool is empty or gone; nothing waits for it"
            )]
            tokio::spawn(sweep_loop(Arc::downgrade(self)));
        }
    }

    /// Drops the connections idle for `idle_for` or longer; returns how long until the next
    /// one is, or `None` (and the sweep ends) if none is left.
    fn sweep(&self) -> Option<Duration> {
        let mut idle = self.lock();
        let now = Instant::now();
        idle.connections
            .retain(|w| now.saturating_duration_since(w.since) < self.idle_for);
        match idle.connections.first() {
            Some(oldest) => Some(
                self.idle_for
                    .saturating_sub(now.saturating_duration_since(oldest.since)),
            ),
            None => {
                idle.sweeping = false;
                None
            }
        }
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
    /// connection, which does the reading and writing they wait on.
    pub async fn drive<F: Future>(&mut self, work: F) -> F::Output {
        let mut work = pin!(work);
        poll_fn(|cx| {
            self.poll_connection(cx);
            work.as_mut().poll(cx)
        })
        .await
    }

    fn poll_connection(&mut self, cx: &mut Context<'_>) {
        if let Some(connection) = &mut self.connection {
            // Ended: closed or failed; the response or body waiting on it gets the error.
            if Pin::new(connection).poll(cx).is_ready() {
                self.connection = None;
            }
        }
    }

    /// Gives the connection back to the pool if `body` has ended and the connection can take
    /// another request; otherwise closes it. Does not wait: what the upstream has not sent yet
    /// (the end of a chunked body after the stream's `[DONE]`, say) is not waited for.
    pub fn release(mut self, body: &mut Incoming) {
        use http_body_util::BodyExt;
        let mut cx = Context::from_waker(Waker::noop());
        // What is already here of the body's end is read now. Anything else (more data after
        // the stream's end, a trailer, nothing yet): the connection is not kept.
        self.poll_connection(&mut cx);
        if !matches!(Pin::new(&mut body.frame()).poll(&mut cx), Poll::Ready(None)) {
            return;
        }
        // Once more, so that the connection takes in that its exchange is over.
        self.poll_connection(&mut cx);
        let (Some(connection), Some(pool)) = (self.connection.take(), self.pool.upgrade()) else {
            return;
        };
        if self.sender.is_ready() {
            pool.keep(Waiting {
                sender: self.sender,
                connection,
                since: Instant::now(),
            });
        }
    }
}
