//! What crosses nodes, through PostgreSQL's `LISTEN`/`NOTIFY`: small news, never chunks.
//!
//! - `sluice_progress`, payload a stream id: sent by the writer inside each batch's transaction,
//!   once per stream the batch touched (chunks or an ending), so it arrives after the commit. A
//!   node following a stream that another node runs reads the new chunks from the store when
//!   this arrives. One notification per stream per batch, not per chunk: `NOTIFY` takes a
//!   database-wide lock at commit, and a batch commits once.
//! - `sluice_cancel`, payload `{"tenant", "id"}`: a node asked to cancel a stream it does not run
//!   tells the others; the one running it cancels it.

use std::sync::Arc;

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

/// Listens on its own connection and republishes what arrives on the returned sender. The
/// session lasts as long as the returned client: the store holds it, and when the store's last
/// handle goes, the connection closes and the listener ends.
pub(super) async fn listen(
    url: &str,
) -> Result<(tokio_postgres::Client, broadcast::Sender<Change>), StoreError> {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(StoreError::postgres)?;
    let (news, _) = broadcast::channel(NEWS_BUFFER);
    let out = news.downgrade();
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    #[allow(
        clippy::disallowed_methods,
        reason = "the listener: it ends with its connection, which ends when the store's last handle goes"
    )]
    tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            let Some(news) = out.upgrade() else { return };
            match message {
                Ok(AsyncMessage::Notification(n)) => {
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
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "PostgreSQL listener lost: cross-node follow and cancel stop until restart");
                    return;
                }
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN {PROGRESS}; LISTEN {CANCEL};"))
        .await
        .map_err(StoreError::postgres)?;
    Ok((client, news))
}
