//! The streams endpoints: listing a tenant's streams, following one (replay from the store, then
//! the live feed), and cancelling one.

use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_flow::Timed;
use tokio::sync::broadcast;

use crate::auth::Caller;
use crate::follow::{follow, news_of, Followed};
use crate::hub::{CancelResult, Live};
use crate::redact::truncate;
use crate::store::{Change, Store, StoreError, StreamState};
use crate::stream::{Status, StreamId, Tenant};

use super::error::not_found;
use super::sse::{encode_terminal, sse_event, sse_response};
use super::{ApiError, AppState};

#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    limit: Option<usize>,
    after: Option<String>,
}

pub(super) async fn list_streams(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad_request(
            "limit",
            "`limit` must be between 1 and 100",
        ));
    }
    let store = &state.relay.store;
    let tenant = Tenant(&caller.tenant);
    let (mut data, has_more) = store
        .list(tenant, limit, q.after)
        .await
        .map_err(|e| ApiError::store("the store could not be read", &e))?;
    // A running stream's chunk count and first-token time are written with its ending: until
    // then, they are read from its committed chunks, so a list shows running streams move.
    let running = data
        .iter_mut()
        .filter(|s| s.status == Status::Streaming)
        .map(|s| async move {
            let (state, first) = futures_util::join!(
                store.state(tenant, StreamId(&s.id)),
                store.chunk_page(&s.id, 0, 1, usize::MAX)
            );
            if let Ok(Some(state)) = state {
                s.chunk_count = state.last_seq;
            }
            if let Ok(first) = first {
                s.timings.time_to_first_token_ms = first.first().map(|c| c.offset_ms);
            }
        });
    futures_util::future::join_all(running).await;
    let last_id = data.last().map(|s| s.id.clone());
    Ok(Json(
        json!({"object": "list", "data": data, "has_more": has_more, "last_id": last_id}),
    ))
}

/// The `{id}` of a stream's path; a malformed one (bad percent-encoding) is a 400.
pub(super) fn stream_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id).map_err(|e| {
        ApiError::bad_request(
            "id",
            format!(
                "the stream id in the path is not valid: {}",
                truncate(&e.body_text(), 200)
            ),
        )
    })
}

#[derive(Debug, Deserialize)]
pub(super) struct EventsQuery {
    after: Option<u64>,
}

/// `GET /v1/streams/{id}/events`: the stream after `Last-Event-ID` (or `?after=N`), as
/// [`follow`] reads it, in SSE. If the store fails midway, the body is cut off: a client never
/// mistakes part of a stream for all of it.
pub(super) async fn stream_events(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let id = stream_id(path)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request("after", e.body_text()))?;
    let after = match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                ApiError::bad_request("Last-Event-ID", "must be an event id (a whole number)")
            })?,
        None => q.after.unwrap_or(0),
    };
    let followed = follow(
        &state.relay.hub,
        &state.relay.store,
        Tenant(&caller.tenant),
        StreamId(&id),
        after,
    )
    .await
    .map_err(|e| ApiError::store("the store could not be read", &e))?
    .ok_or_else(|| not_found(&id))?;
    // A stream asked for in Anthropic's shape is replayed in it.
    let head = state
        .relay
        .store
        .head(Tenant(&caller.tenant), StreamId(&id))
        .await
        .map_err(|e| ApiError::store("the store could not be read", &e))?;
    if head.is_some_and(|h| h.request.contains("\"sluice_api\":\"anthropic\"")) {
        let body = super::messages::replay(id.clone(), after == 0, followed);
        return Ok(sse_response(Body::from_stream(body), &id));
    }
    let stream_id = id.clone();
    let body = followed.map(move |item| match item {
        Ok(Followed::Chunk { seq, data }) => Ok(sse_event(seq, &data)),
        Ok(Followed::End(terminal)) => Ok(encode_terminal(&terminal)),
        Err(e) => {
            tracing::error!(stream = %stream_id, error = %e.report(), "following a stream failed");
            Err(std::io::Error::other(e.report()))
        }
    });
    Ok(sse_response(Body::from_stream(body), &id))
}

/// Cancels `tenant`'s stream `id` if another node sharing the store runs it (it is `streaming`
/// in the store but not here), and waits, up to [`CANCEL_WAIT`], for its final status.
async fn cancel_elsewhere(
    store: &Store,
    tenant: Tenant<'_>,
    id: StreamId<'_>,
    mut news: broadcast::Receiver<Change>,
) -> Result<(), StoreError> {
    let running = |st: Option<StreamState>| st.is_some_and(|st| st.ending().is_none());
    if !running(store.state(tenant, id).await?) {
        return Ok(());
    }
    store.request_cancel(tenant, id).await?;
    let ended = async {
        while running(store.state(tenant, id).await?) {
            if !news_of(&mut news, id.0).await {
                break;
            }
        }
        Ok::<_, StoreError>(())
    };
    match sluice_flow::timeout(CANCEL_WAIT, ended).await {
        Timed::Completed(done) => done,
        Timed::Expired(_) => {
            tracing::warn!(stream = %id.0, "a stream cancelled on another node had not ended after {CANCEL_WAIT:?}; answering with its status so far");
            Ok(())
        }
    }
}

/// How long a cancel request waits for the stream's final status to be written.
const CANCEL_WAIT: Duration = Duration::from_secs(30);

/// `POST /v1/streams/{id}/cancel`: stops a running stream (`cancelled(requested)`; the original
/// client and every resumer get the terminal error event) and answers with its final status.
/// Idempotent: on a finished stream it changes nothing and answers with the final status.
pub(super) async fn cancel_stream(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = stream_id(path)?;
    let (tenant, sid) = (Tenant(&caller.tenant), StreamId(&id));
    stop(&state, tenant, sid).await?;
    let st = state
        .relay
        .store
        .state(tenant, sid)
        .await
        .map_err(|e| ApiError::store("the store could not be read", &e))?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(json!({
        "id": id,
        "object": "sluice.stream",
        "status": st.status,
        "reason": st.reason,
        "detail": st.detail,
    })))
}

/// Stops `tenant`'s stream `id` wherever it runs (here, or on another node sharing the store)
/// and waits, up to [`CANCEL_WAIT`], until its final status is written. Nothing happens to a
/// stream that has ended.
pub(super) async fn stop(
    state: &AppState,
    tenant: Tenant<'_>,
    sid: StreamId<'_>,
) -> Result<(), ApiError> {
    let id = sid.0;
    let (hub, store) = (&state.relay.hub, &state.relay.store);
    let live = hub.subscribe(tenant, sid);
    // Subscribed before the store is read, like a follower.
    let news = store.changes();
    if hub.cancel(tenant, sid) == CancelResult::NotRunning {
        if let Some(news) = news {
            cancel_elsewhere(store, tenant, sid, news)
                .await
                .map_err(|e| ApiError::store("the store could not be read", &e))?;
        }
    } else {
        if let Some(mut live) = live {
            // Wait for the final status to be written: the relay publishes its end after that.
            let ended = async {
                loop {
                    match live.recv().await {
                        Ok(Live::End(_))
                        | Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                        _ => {}
                    }
                }
            };
            if let Timed::Expired(_) = sluice_flow::timeout(CANCEL_WAIT, ended).await {
                tracing::warn!(stream = %id, "a cancelled stream had not ended after {CANCEL_WAIT:?}; answering with its status so far");
            }
        }
    }
    Ok(())
}
