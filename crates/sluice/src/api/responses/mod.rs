//! OpenAI's Responses API over any model: `POST /v1/responses` (plain, streaming, background),
//! `GET /v1/responses/{id}` (the object, or its event stream from `starting_after`), `POST
//! /v1/responses/{id}/cancel`, `DELETE /v1/responses/{id}` and `GET
//! /v1/responses/{id}/input_items`.
//!
//! A response is a sluice stream whose id is the response id (`resp_…`): the upstream is called
//! with chat completions, the stream is recorded, resumed, cancelled and listed like any other,
//! and its Responses events are made from its chunks (see `shape` for their numbering), so a
//! replay from the store, on any node, numbers them exactly as the live stream did.

use std::sync::Arc;

use async_stream::stream;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sluice_flow::QueueError;
use tokio::time::Instant;

use crate::auth::Caller;
use crate::follow::{follow, Followed};
use crate::relay::{Frame, Frames};
use crate::store::Transcript;
use crate::stream::{Ending, Status, StreamId, Tenant, Terminal};

use super::chat::{chat_request, json_object, start_stream};
use super::error::not_found;
use super::sse::sse_response;
use super::streams::{stop, stream_id};
use super::{ApiError, AppState};

mod shape;

use shape::{Event, Meta, State as Standing};

/// The recorded request's field holding the conversation so far (for `previous_response_id`).
const CONVERSATION: &str = "sluice_conversation";

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A response as the store holds it.
async fn stored(state: &AppState, caller: &Caller, id: &str) -> Result<Transcript, ApiError> {
    state
        .relay
        .store
        .get(Tenant(&caller.tenant), StreamId(id))
        .await
        .map_err(|e| ApiError::store("the store could not be read", &e))?
        .filter(|t| t.request.get(CONVERSATION).is_some())
        .ok_or_else(|| not_found(id))
}

/// A response's head (its request and status, without its chunks), for what needs no text: a
/// large response is not read whole to cancel, delete or list its input.
async fn head(state: &AppState, caller: &Caller, id: &str) -> Result<(Meta, Status), ApiError> {
    let h = state
        .relay
        .store
        .head(Tenant(&caller.tenant), StreamId(id))
        .await
        .map_err(|e| ApiError::store("the store could not be read", &e))?
        .ok_or_else(|| not_found(id))?;
    let request: Value = serde_json::from_str(&h.request).unwrap_or(Value::Null);
    if request.get(CONVERSATION).is_none() {
        return Err(not_found(id));
    }
    Ok((
        Meta {
            id: h.id,
            created_at: h.created,
            model: h.model,
            request,
        },
        h.status,
    ))
}

fn meta_of(t: &Transcript) -> Meta {
    Meta {
        id: t.id.clone(),
        created_at: t.created,
        model: t.model.clone(),
        request: t.request.clone(),
    }
}

fn standing_of(t: &Transcript) -> Standing {
    let mut standing = Standing::running();
    for c in &t.chunks {
        standing.note(&c.data);
    }
    standing.status = t.status;
    standing.reason = t.reason;
    standing.detail.clone_from(&t.detail);
    if t.usage.is_some() {
        standing.usage.clone_from(&t.usage);
    }
    standing
}

/// `POST /v1/responses`.
pub(super) async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let mut body = json_object(&state, &headers, body).await?;
    let previous = match body.get("previous_response_id") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(prev)) => {
            let t = stored(&state, &caller, prev).await.map_err(|_| ApiError {
                param: Some("previous_response_id".into()),
                ..not_found(prev)
            })?;
            let mut conversation = t.request[CONVERSATION]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let calls: Vec<Value> = standing_of(&t)
                .calls
                .iter()
                .map(|c| json!({"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                .collect();
            let mut answer = json!({"role": "assistant", "content": t.content});
            if !calls.is_empty() {
                // A tool's output that follows must answer a call the conversation holds.
                answer["tool_calls"] = Value::Array(calls);
            }
            conversation.push(answer);
            conversation
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "previous_response_id",
                "must be a response id",
            ))
        }
    };
    let (chat, conversation) = shape::chat_body(&body, previous)?;
    let chat = chat_request(chat)?;
    let streaming = body.get("stream").and_then(Value::as_bool) == Some(true);
    let background = body.get("background").and_then(Value::as_bool) == Some(true);
    body.insert(CONVERSATION.into(), Value::Array(conversation));
    let request = Value::Object(body);
    let id = format!("resp_{}", crate::stream::new_stream_uuid().simple());
    let (frames, model) = match start_stream(
        &state,
        &caller,
        chat,
        request.to_string(),
        Arc::from(id.as_str()),
        started,
    )
    .await?
    {
        Ok(started) => started,
        Err(refusal) => return Ok(refusal),
    };
    let meta = Meta {
        id,
        created_at: now_unix(),
        model,
        request,
    };
    if streaming {
        let id = meta.id.clone();
        let events = live_events(meta, frames).map(Ok::<_, std::convert::Infallible>);
        return Ok(sse_response(Body::from_stream(events), &id));
    }
    if background {
        // The answer goes on without this request (its disconnect policy is `continue`).
        drop(frames);
        return Ok(Json(shape::response(&meta, &Standing::running(), "")).into_response());
    }
    let (standing, text, _) = collect(frames).await;
    Ok(Json(shape::response(&meta, &standing, &text)).into_response())
}

/// What a stream's frames came to: how it ended, its text, and its ending's event id.
async fn collect(mut frames: Frames) -> (Standing, String, u64) {
    let mut answer = Answer::default();
    loop {
        match next_chunk(&mut frames).await {
            Next::Chunk { seq, data } => answer.chunk(seq, data.as_ref()),
            Next::KeepAlive => {}
            Next::End(t) => {
                let terminal = answer.end(&t);
                return (answer.standing, answer.text, terminal);
            }
        }
    }
}

/// An answer so far: its text, how it stands, its last event id.
struct Answer {
    text: String,
    standing: Standing,
    last: u64,
}

impl Default for Answer {
    fn default() -> Self {
        Self {
            text: String::new(),
            standing: Standing::running(),
            last: 0,
        }
    }
}

impl Answer {
    fn chunk(&mut self, seq: u64, data: Option<&Value>) {
        self.last = seq;
        if let Some(data) = data {
            if let Some(text) = data["choices"][0]["delta"]["content"].as_str() {
                self.text.push_str(text);
            }
            self.standing.note(data);
        }
    }

    /// Notes the ending; returns its event id.
    fn end(&mut self, t: &Terminal) -> u64 {
        end(&mut self.standing, &t.ending);
        t.seq.max(self.last + 1)
    }
}

enum Next {
    /// A chunk's event id and JSON (`None`: the store lost it, so it is not sent).
    Chunk {
        seq: u64,
        data: Option<Value>,
    },
    KeepAlive,
    End(Terminal),
}

/// The next frame, once it is in the transcript (a chunk the store lost comes as `None`).
async fn next_chunk(frames: &mut Frames) -> Next {
    match frames.recv().await {
        Some(Ok(Frame::Chunk(c))) => {
            let mut stored = true;
            if let Some(committed) = &c.committed {
                committed.reached(c.seq).await;
                stored = committed.is_stored(c.seq);
            }
            let data = if stored {
                serde_json::from_str(&c.data).ok()
            } else {
                None
            };
            Next::Chunk { seq: c.seq, data }
        }
        Some(Ok(Frame::KeepAlive)) => Next::KeepAlive,
        Some(Err(QueueError::Failed(t))) => Next::End(t),
        Some(Err(QueueError::Abandoned)) => Next::End(Terminal {
            seq: 0,
            ending: Ending::abnormal(
                crate::stream::Reason::Shutdown,
                "the relay stopped before the response ended",
            ),
        }),
        None => Next::End(Terminal {
            seq: 0,
            ending: Ending::Completed,
        }),
    }
}

fn end(standing: &mut Standing, ending: &Ending) {
    standing.status = ending.status();
    standing.reason = ending.reason();
    standing.detail = ending.detail().map(str::to_string);
}

/// A live response's events: the prefix, a delta per chunk as it is committed, the ending.
fn live_events(meta: Meta, mut frames: Frames) -> impl futures_util::Stream<Item = String> {
    stream! {
        for e in shape::prefix(&meta) {
            yield shape::sse(&e);
        }
        let mut answer = Answer::default();
        loop {
            match next_chunk(&mut frames).await {
                Next::Chunk { seq, data } => {
                    if let Some(data) = &data {
                        for e in shape::chunk_events(&meta, seq, data) {
                            yield shape::sse(&e);
                        }
                    }
                    answer.chunk(seq, data.as_ref());
                }
                Next::KeepAlive => yield ": keep-alive\n\n".to_string(),
                Next::End(t) => {
                    let terminal = answer.end(&t);
                    for e in shape::suffix(&meta, terminal, &answer.standing, &answer.text) {
                        yield shape::sse(&e);
                    }
                    return;
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct RetrieveQuery {
    stream: Option<bool>,
    starting_after: Option<u64>,
}

/// `GET /v1/responses/{id}`: the Response object; with `stream=true`, its events after
/// `starting_after` (from the start when absent), then the live tail, each exactly once.
pub(super) async fn retrieve(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<RetrieveQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = stream_id(path)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request("query", e.body_text()))?;
    if q.stream != Some(true) {
        let t = stored(&state, &caller, &id).await?;
        return Ok(
            Json(shape::response(&meta_of(&t), &standing_of(&t), &t.content)).into_response(),
        );
    }
    let after = q.starting_after.unwrap_or(0);
    let has_after = q.starting_after.is_some();
    let (meta, _) = head(&state, &caller, &id).await?;
    let followed = follow(
        &state.relay.hub,
        &state.relay.store,
        Tenant(&caller.tenant),
        StreamId(&id),
        shape::chunk_after(after),
    )
    .await
    .map_err(|e| ApiError::store("the store could not be read", &e))?
    .ok_or_else(|| not_found(&id))?;
    let wanted = move |e: &Event| !has_after || e.0 > after;
    let (store_state, tenant) = (state.clone(), caller.clone());
    let events = stream! {
        for e in shape::prefix(&meta).iter().filter(|e| wanted(e)) {
            yield Ok::<_, std::io::Error>(shape::sse(e));
        }
        let mut last = 0;
        futures_util::pin_mut!(followed);
        while let Some(item) = followed.next().await {
            match item {
                Ok(Followed::Chunk { seq, data }) => {
                    last = seq;
                    if let Ok(data) = serde_json::from_str::<Value>(&data) {
                        for e in shape::chunk_events(&meta, seq, &data).iter().filter(|e| wanted(e)) {
                            yield Ok(shape::sse(e));
                        }
                    }
                }
                Ok(Followed::End(terminal)) => {
                    // The whole text and the final figures, as recorded.
                    let t = stored(&store_state, &tenant, &meta.id).await;
                    let (standing, text) = match &t {
                        Ok(t) => (standing_of(t), t.content.clone()),
                        Err(_) => {
                            let mut s = Standing::running();
                            end(&mut s, &terminal.ending);
                            (s, String::new())
                        }
                    };
                    for e in shape::suffix(&meta, terminal.seq.max(last + 1), &standing, &text).iter().filter(|e| wanted(e)) {
                        yield Ok(shape::sse(e));
                    }
                    return;
                }
                Err(e) => {
                    yield Err(std::io::Error::other(e.report()));
                    return;
                }
            }
        }
    };
    Ok(sse_response(Body::from_stream(events), &id))
}

/// `POST /v1/responses/{id}/cancel`: stops a response in progress and answers with it. A
/// response that has ended cannot be cancelled: `400`, as OpenAI answers.
pub(super) async fn cancel(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = stream_id(path)?;
    let (meta, status) = head(&state, &caller, &id).await?;
    if status != Status::Streaming {
        let mut standing = Standing::running();
        standing.status = status;
        let finished = shape::response(&meta, &standing, "");
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!(
                "the response is {}: only a response in progress can be cancelled",
                finished["status"].as_str().unwrap_or("finished")
            ),
        ));
    }
    stop(&state, Tenant(&caller.tenant), StreamId(&id)).await?;
    let t = stored(&state, &caller, &id).await?;
    Ok(Json(shape::response(&meta_of(&t), &standing_of(&t), &t.content)).into_response())
}

/// `DELETE /v1/responses/{id}`: forgets a response (cancelling it first if it is in progress).
pub(super) async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = stream_id(path)?;
    let (_, status) = head(&state, &caller, &id).await?;
    let (tenant, sid) = (Tenant(&caller.tenant), StreamId(&id));
    if status == Status::Streaming {
        stop(&state, tenant, sid).await?;
    }
    state
        .relay
        .store
        .delete(tenant, sid)
        .await
        .map_err(|e| ApiError::store("the response could not be deleted", &e))?;
    Ok(Json(
        json!({"id": id, "object": "response", "deleted": true}),
    ))
}

/// `GET /v1/responses/{id}/input_items`: the input the response was given (after the
/// conversation of `previous_response_id`), as message items, oldest first.
pub(super) async fn input_items(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = stream_id(path)?;
    let (meta, _) = head(&state, &caller, &id).await?;
    let input = meta.request.get("input").cloned().unwrap_or(Value::Null);
    let messages = shape::input_messages(&input).unwrap_or_default();
    let short = id.trim_start_matches("resp_");
    let data: Vec<Value> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m["role"].as_str().unwrap_or("user");
            let kind = if role == "assistant" { "output_text" } else { "input_text" };
            json!({"id": format!("msg_{short}_{i}"), "type": "message", "role": role, "status": "completed",
                   "content": [{"type": kind, "text": m["content"]}]})
        })
        .collect();
    let (first, last) = (
        data.first().map(|d| d["id"].clone()),
        data.last().map(|d| d["id"].clone()),
    );
    let mut list = Map::new();
    list.insert("object".into(), json!("list"));
    list.insert("data".into(), Value::Array(data));
    list.insert("first_id".into(), first.unwrap_or(Value::Null));
    list.insert("last_id".into(), last.unwrap_or(Value::Null));
    list.insert("has_more".into(), json!(false));
    Ok(Json(Value::Object(list)))
}
