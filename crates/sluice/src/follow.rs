//! Following a stream from any point: what a client that comes back (`GET
//! /v1/streams/{id}/events`) reads.
//!
//! [`follow`] replays the stored chunks after the client's last event id, then follows the live
//! feed from the [`hub`](crate::hub) to the end, finishing with the same terminal event as the
//! original client got. There is no gap and no duplicate at the seam:
//! - the live feed is subscribed *before* the store is read, so a chunk published meanwhile is
//!   in the replay, in the feed, or in both (and then skipped by its id);
//! - whatever the feed did not carry (a reader that lagged, a chunk too large for the feed, a
//!   gap) is refilled from the store, which has every chunk before it is published;
//! - a stream that is not running ends with the terminal event its stored status implies, and
//!   so does one whose relay vanished without announcing its end.
//!
//! It owns no HTTP: the API encodes what it yields as SSE.

use std::sync::Arc;
use std::time::Duration;

use async_stream::stream;
use futures_util::Stream;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use crate::hub::{Hub, Live};
use crate::store::{Change, Store, StoreError, PAGE_BYTES, PAGE_CHUNKS};
use crate::stream::{StreamId, Tenant, Terminal};

/// What a follower reads, in order: chunks with increasing ids, then at most one end.
#[derive(Debug, Clone, PartialEq)]
pub enum Followed {
    /// A chunk, exactly as the original client got it.
    Chunk {
        /// Its event id.
        seq: u64,
        /// Its JSON.
        data: Arc<str>,
    },
    /// How the stream ended. Missing only if the store says the stream is still running but no
    /// process here runs it, or if the store failed (then the last item is that error).
    End(Terminal),
}

/// What comes once the follower has caught up with the store.
enum Then {
    /// The next live event.
    Live,
    /// The end the live feed announced.
    End(Terminal),
    /// The end the store records (the stream is not running here, or its relay went away).
    StoredEnd,
}

/// `tenant`'s stream `id` from just after event `after`: `None` if the tenant has no such
/// stream. A store failure midway is the stream's last item.
pub async fn follow(
    hub: &Hub,
    store: &Store,
    tenant: Tenant<'_>,
    id: StreamId<'_>,
    after: u64,
) -> Result<Option<impl Stream<Item = Result<Followed, StoreError>> + Send + 'static>, StoreError> {
    // Subscribe first, then look in the store (see the module docs). A stream another node
    // runs has no feed here: then the store's news says when to read it again.
    let mut live = hub.subscribe(tenant, id);
    let mut news = if live.is_none() {
        store.changes()
    } else {
        None
    };
    if store.state(tenant, id).await?.is_none() {
        return Ok(None);
    }
    let (store, tenant, id) = (store.clone(), tenant.0.to_string(), id.0.to_string());
    Ok(Some(stream! {
        let mut last = after;
        let mut catch_up = true;
        // A live chunk that arrived past a gap: sent after the gap is refilled, unless the store
        // had it too (it is not in the store when chunks are not recorded).
        let mut held: Option<(u64, Arc<str>)> = None;
        let mut then = if live.is_some() { Then::Live } else { Then::StoredEnd };
        loop {
            if catch_up {
                let page = match store.chunks_after(&id, last, PAGE_CHUNKS, PAGE_BYTES).await {
                    Ok(page) => page,
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                };
                if !page.is_empty() {
                    for (seq, data) in page {
                        last = seq;
                        yield Ok(Followed::Chunk { seq, data: Arc::from(data) });
                    }
                    continue;
                }
                catch_up = false;
                if let Some((seq, data)) = held.take() {
                    if seq > last {
                        last = seq;
                        yield Ok(Followed::Chunk { seq, data });
                    }
                }
            }
            match std::mem::replace(&mut then, Then::Live) {
                Then::Live => {}
                Then::End(terminal) => {
                    if terminal.seq > after {
                        yield Ok(Followed::End(terminal));
                    }
                    return;
                }
                Then::StoredEnd => {
                    match store.state(Tenant(&tenant), StreamId(&id)).await {
                        Ok(Some(st)) => {
                            let seq = st.last_seq + 1;
                            match (st.ending(), news.as_mut()) {
                                (Some(ending), _) => {
                                    if seq > after {
                                        yield Ok(Followed::End(Terminal { seq, ending }));
                                    }
                                }
                                // Still running, on another node: wait for news, read again.
                                (None, Some(news)) => {
                                    if news_of(news, &id).await {
                                        catch_up = true;
                                        then = Then::StoredEnd;
                                        continue;
                                    }
                                }
                                (None, None) => {}
                            }
                        }
                        Ok(None) => {}
                        Err(e) => yield Err(e),
                    }
                    return;
                }
            }
            let Some(feed) = live.as_mut() else {
                // Without a feed `then` is always `StoredEnd`, which returned above.
                return;
            };
            match feed.recv().await {
                Ok(Live::Chunk { seq, data }) if seq > last + 1 => {
                    held = Some((seq, data));
                    catch_up = true;
                }
                Ok(Live::Chunk { seq, data }) => {
                    if seq > last {
                        last = seq;
                        yield Ok(Followed::Chunk { seq, data });
                    }
                }
                Ok(Live::Large { seq }) => catch_up = seq > last,
                Ok(Live::End(terminal)) => {
                    catch_up = true;
                    then = Then::End(terminal);
                }
                Err(RecvError::Lagged(_)) => {
                    metrics::counter!("sluice_resume_refills_total").increment(1);
                    catch_up = true;
                }
                Err(RecvError::Closed) => {
                    catch_up = true;
                    then = Then::StoredEnd;
                }
            }
        }
    }))
}

/// How long a follower of a stream on another node waits for news before it reads the store
/// anyway (news can be lost with a listener's connection; this bounds what that costs).
pub const REMOTE_RECHECK: Duration = Duration::from_secs(2);

/// Waits until the store's news mentions stream `id` (or may have: news was lost to lag), for
/// at most [`REMOTE_RECHECK`]. `false` if no more news can come.
pub(crate) async fn news_of(news: &mut broadcast::Receiver<Change>, id: &str) -> bool {
    let heard = async {
        loop {
            match news.recv().await {
                Ok(Change::Progress(p)) if &*p == id => return true,
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => return true,
                Err(RecvError::Closed) => return false,
            }
        }
    };
    match sluice_flow::timeout(REMOTE_RECHECK, heard).await {
        sluice_flow::Timed::Completed(more) => more,
        sluice_flow::Timed::Expired(_) => true,
    }
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]
mod tests {
    use std::time::Duration;

    use futures_util::{pin_mut, StreamExt};
    use sluice_flow::CancelToken;

    use super::*;
    use crate::store::{Finish, NewStream, Watermark};
    use crate::stream::{Ending, Reason};

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Store,
        hub: Arc<Hub>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        Fixture {
            _dir: dir,
            store,
            hub: Arc::new(Hub::default()),
        }
    }

    fn chunk(seq: u64) -> Arc<str> {
        Arc::from(format!("{{\"n\":{seq}}}"))
    }

    impl Fixture {
        async fn begin(&self, id: &str) {
            self.store
                .begin(NewStream {
                    id: id.into(),
                    tenant: "acme".into(),
                    model: "sim".into(),
                    request: "{}".into(),
                    key: None,
                })
                .await
                .expect("begin");
        }

        /// Stores chunks `seqs` of `id` and waits until they are committed.
        async fn store_chunks(&self, id: &str, seqs: impl IntoIterator<Item = u64>) {
            let id: Arc<str> = Arc::from(id);
            let mark = Watermark::new();
            let mut top = 0;
            for seq in seqs {
                self.store
                    .append(&id, seq, Duration::ZERO, chunk(seq), String::new(), &mark)
                    .await
                    .expect("append");
                top = seq;
            }
            mark.reached(top).await;
        }

        async fn finish(&self, id: &str, ending: Ending, chunks: u64) {
            self.store
                .finish(Finish {
                    id: id.into(),
                    ending,
                    first_token: None,
                    total: Duration::ZERO,
                    usage: None,
                    chunks,
                    attempts: None,
                })
                .await
                .expect("finish");
        }
    }

    fn chunk_item(seq: u64) -> Followed {
        Followed::Chunk {
            seq,
            data: chunk(seq),
        }
    }

    async fn all(
        s: impl Stream<Item = Result<Followed, StoreError>>,
    ) -> Vec<Result<Followed, StoreError>> {
        s.collect().await
    }

    #[tokio::test]
    async fn a_finished_stream_replays_after_the_id_then_ends_as_stored() {
        let f = fixture();
        f.begin("s1").await;
        f.store_chunks("s1", 1..=3).await;
        f.finish("s1", Ending::abnormal(Reason::Idle, "idle"), 3)
            .await;
        let s = follow(&f.hub, &f.store, Tenant("acme"), StreamId("s1"), 1)
            .await
            .expect("read")
            .expect("found");
        let end = Followed::End(Terminal {
            seq: 4,
            ending: Ending::abnormal(Reason::Idle, "idle"),
        });
        assert_eq!(
            all(s).await.into_iter().map(Result::ok).collect::<Vec<_>>(),
            vec![Some(chunk_item(2)), Some(chunk_item(3)), Some(end)]
        );
        // Past the terminal event: nothing more to say.
        let s = follow(&f.hub, &f.store, Tenant("acme"), StreamId("s1"), 4)
            .await
            .expect("read")
            .expect("found");
        assert!(all(s).await.is_empty());
    }

    #[tokio::test]
    async fn another_tenants_stream_is_not_found() {
        let f = fixture();
        f.begin("s1").await;
        assert!(follow(&f.hub, &f.store, Tenant("other"), StreamId("s1"), 0)
            .await
            .expect("read")
            .is_none());
        assert!(
            follow(&f.hub, &f.store, Tenant("acme"), StreamId("nope"), 0)
                .await
                .expect("read")
                .is_none()
        );
    }

    /// Polls `s` until it waits on the live feed: the paused clock only moves on once the
    /// follower's store reads are done and nothing else can happen.
    async fn until_waiting(s: &mut (impl Stream<Item = Result<Followed, StoreError>> + Unpin)) {
        let next = tokio::time::timeout(Duration::from_secs(1), s.next()).await;
        assert!(next.is_err(), "expected the follower to wait, got {next:?}");
    }

    /// The next item, which must come (on the paused clock, a missing one fails at once).
    async fn next(s: &mut (impl Stream<Item = Result<Followed, StoreError>> + Unpin)) -> Followed {
        tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("an item in time")
            .expect("an item")
            .expect("no store error")
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_stream_joins_replay_and_feed_without_gap_or_duplicate() {
        let f = fixture();
        f.begin("s1").await;
        let publisher = f
            .hub
            .register("s1".into(), "acme".into(), CancelToken::new());
        f.store_chunks("s1", [1]).await;
        let s = follow(&f.hub, &f.store, Tenant("acme"), StreamId("s1"), 0)
            .await
            .expect("read")
            .expect("found");
        pin_mut!(s);
        assert_eq!(next(&mut s).await, chunk_item(1));
        until_waiting(&mut s).await;

        // 1 again from the feed: skipped. 2 never reaches the feed (a lagging reader loses
        // events); 3 arrives past the gap: 2 comes from the store, then 3, once each.
        publisher.publish(Live::Chunk {
            seq: 1,
            data: chunk(1),
        });
        f.store_chunks("s1", 2..=3).await;
        publisher.publish(Live::Chunk {
            seq: 3,
            data: chunk(3),
        });
        assert_eq!(next(&mut s).await, chunk_item(2));
        assert_eq!(next(&mut s).await, chunk_item(3));
        until_waiting(&mut s).await;

        // 4 is too large for the feed: read from the store.
        f.store_chunks("s1", [4]).await;
        publisher.publish(Live::Large { seq: 4 });
        assert_eq!(next(&mut s).await, chunk_item(4));
        until_waiting(&mut s).await;

        // 6 arrives past a gap the store cannot fill (chunks not recorded): from the feed.
        publisher.publish(Live::Chunk {
            seq: 6,
            data: chunk(6),
        });
        assert_eq!(next(&mut s).await, chunk_item(6));

        let end = Terminal {
            seq: 7,
            ending: Ending::Completed,
        };
        publisher.publish(Live::End(end.clone()));
        assert_eq!(next(&mut s).await, Followed::End(end));
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn a_relay_that_vanishes_ends_with_what_the_store_says() {
        let f = fixture();
        f.begin("s1").await;
        let publisher = f
            .hub
            .register("s1".into(), "acme".into(), CancelToken::new());
        let s = follow(&f.hub, &f.store, Tenant("acme"), StreamId("s1"), 0)
            .await
            .expect("read")
            .expect("found");
        f.store_chunks("s1", [1]).await;
        f.finish("s1", Ending::abnormal(Reason::Shutdown, "stopping"), 1)
            .await;
        drop(publisher); // no `End` published: the feed just closes
        let got: Vec<Followed> = all(s).await.into_iter().map(|r| r.expect("ok")).collect();
        assert_eq!(
            got,
            vec![
                chunk_item(1),
                Followed::End(Terminal {
                    seq: 2,
                    ending: Ending::abnormal(Reason::Shutdown, "stopping"),
                })
            ]
        );
    }
}
