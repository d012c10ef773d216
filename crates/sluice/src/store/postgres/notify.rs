//! What crosses nodes, through PostgreSQL's `LISTEN`/`NOTIFY`: small news, never chunks.
//!
//! - `sluice_progress`, payload a stream id: sent by the writer inside each batch's transaction,
//!   once per stream the batch touched (chunks or an ending), so it arrives after the commit. A
//!   node following a stream that another node runs reads the new chunks from the store when
//!   this arrives. One notification per stream per batch, not per chunk: `NOTIFY` takes a
//!   database-wide lock at commit, and a batch commits once.
//! - `sluice_cancel`, payload `[tenant, id]`: a node asked to cancel a stream it does not run
//!   tells the others; the one running it cancels it.
//!
//! The listening connection is opened again when it is lost (every [`RELISTEN`]); news sent
//! meanwhile is missed, which followers survive by re-reading the store on their own.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::broadcast;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::store::{Change, StoreError};

/// The channel of progress news.
pub(super) const PROGRESS: &str = "sluice_progress";
/// The channel of cancel requests.
pub(super) const CANCEL: &str = "sluice_cancel";

/// How many pieces of news a slow listener may fall behind (then it re-reads the store).
const NEWS_BUFFER: usize = 4096;

/// How long the listener waits before it listens again after losing its connection.
const RELISTEN: Duration = Duration::from_secs(1);

/// Starts listening (failing if the first connection fails) and returns the sender that news
/// is republished on. The listener lasts until `stop` resolves (its sender, which the store
/// holds, is dropped with the store's last handle).
pub(super) async fn listen(
    url: &str,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<broadcast::Sender<Change>, StoreError> {
    let (news, _) = broadcast::channel(NEWS_BUFFER);
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(StoreError::postgres)?;
    let (url, out) = (url.to_string(), news.downgrade());
    let (ready, listening) = tokio::sync::oneshot::channel();
    #[allow(
        clippy::disallowed_methods,
        reason = "the listener: it ends when the store's last handle is dropped (`stop`)"
    )]
    tokio::spawn(async move {
        let mut session = Some((client, connection));
        let mut ready = Some(ready);
        loop {
            let (client, connection) = match session.take() {
                Some(s) => s,
                None => match tokio_postgres::connect(&url, NoTls).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for other nodes' news; trying again");
                        tokio::select! {
                            _ = &mut stop => return,
                            () = tokio::time::sleep(RELISTEN) => continue,
                        }
                    }
                },
            };
            let listened = tokio::select! {
                _ = &mut stop => return,
                listened = serve(client, connection, &out, ready.take()) => listened,
            };
            tracing::warn!(
                listened,
                "lost the connection that listens for other nodes' news; listening again"
            );
            tokio::select! {
                _ = &mut stop => return,
                () = tokio::time::sleep(RELISTEN) => {}
            }
        }
    });
    match listening.await {
        Ok(Ok(())) => Ok(news),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(StoreError::Internal(
            "the listener stopped before it listened".into(),
        )),
    }
}

/// Listens on one connection and republishes its news until the connection ends (or nobody
/// holds the news sender any more). Says on `ready` whether `LISTEN` worked; returns whether it
/// did.
async fn serve(
    client: tokio_postgres::Client,
    mut connection: tokio_postgres::Connection<
        tokio_postgres::Socket,
        tokio_postgres::tls::NoTlsStream,
    >,
    out: &broadcast::WeakSender<Change>,
    ready: Option<tokio::sync::oneshot::Sender<Result<(), StoreError>>>,
) -> bool {
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let sql = format!("LISTEN {PROGRESS}; LISTEN {CANCEL};");
    let listen = client.batch_execute(&sql);
    tokio::pin!(listen);
    let mut ready = ready;
    let mut listened = false;
    loop {
        tokio::select! {
            done = &mut listen, if !listened => {
                let result = done.map_err(StoreError::postgres);
                listened = result.is_ok();
                if let Some(ready) = ready.take() {
                    // The caller may have given up waiting.
                    let _ = ready.send(result);
                }
                if !listened {
                    return false;
                }
            }
            message = messages.next() => {
                let Some(news) = out.upgrade() else { return listened };
                match message {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        let change = match n.channel() {
                            PROGRESS => Some(Change::Progress(Arc::from(n.payload()))),
                            CANCEL => serde_json::from_str::<(String, String)>(n.payload())
                                .ok()
                                .map(|(tenant, id)| Change::Cancel { tenant, id }),
                            _ => None,
                        };
                        if let Some(change) = change {
                            // No subscriber right now is fine.
                            let _ = news.send(change);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "the listening connection failed");
                        return listened;
                    }
                    None => return listened,
                }
            }
        }
    }
}
