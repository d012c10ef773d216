//! `GET /v1/streams/{id}`: a transcript as one JSON document, written out page by page so that
//! reading one costs memory in proportion to a page, never to the transcript.

use async_stream::stream;
use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{header, HeaderValue};
use axum::response::Response;

use crate::auth::Caller;
use crate::store::TranscriptHead;
use crate::store::{PAGE_BYTES, PAGE_CHUNKS};
use crate::stream::{Reason, Status, StreamId, Tenant};

use super::error::not_found;
use super::streams::stream_id;
use super::{ApiError, AppState};

/// `GET /v1/streams/{id}`: the transcript, streamed out page by page, so reading one costs
/// memory in proportion to a page, never to the transcript. Its chunks are the ones stored when
/// the read began (a running stream's later chunks are for `/events`). If the store fails
/// midway, the body is cut off, so a client never mistakes part of a transcript for all of it.
pub(super) async fn show_stream(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = stream_id(path)?;
    let store = state.relay.store.clone();
    let head = store
        .head(Tenant(&caller.tenant), StreamId(&id))
        .await
        .map_err(|e| ApiError::store("the store could not be read", &e))?
        .ok_or_else(|| not_found(&id))?;
    let body = stream! {
        yield Ok::<_, std::io::Error>(Bytes::from(transcript_prefix(&head)));
        // The answer's text, then the chunks: two passes over the same pages.
        for pass in [Pass::Content, Pass::Chunks] {
            let mut after = 0;
            let mut first = true;
            while after < head.last_seq {
                let page = store
                    .chunk_page(&head.id, after, PAGE_CHUNKS, PAGE_BYTES)
                    .await
                    .map_err(|e| std::io::Error::other(e.report()))?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                let mut out = String::new();
                for chunk in page.iter().filter(|c| c.seq <= head.last_seq) {
                    match pass {
                        Pass::Content => push_json_string_body(&mut out, &chunk.content),
                        Pass::Chunks => {
                            if !std::mem::take(&mut first) {
                                out.push(',');
                            }
                            push_chunk(&mut out, chunk);
                        }
                    }
                }
                yield Ok(Bytes::from(out));
            }
            yield Ok(Bytes::from_static(match pass {
                Pass::Content => b"\",\"chunks\":[",
                Pass::Chunks => b"]",
            }));
        }
        yield Ok(Bytes::from(transcript_suffix(&head)));
    };
    let mut response = Response::new(Body::from_stream(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

#[derive(Clone, Copy)]
enum Pass {
    Content,
    Chunks,
}

/// Stored JSON text as a JSON value, or as a string if it is not valid JSON (it always is,
/// unless the database was edited by hand).
fn raw_or_string(text: &str) -> Box<serde_json::value::RawValue> {
    serde_json::value::RawValue::from_string(text.to_string()).unwrap_or_else(|_| {
        serde_json::value::to_raw_value(text)
            .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned())
    })
}

/// The transcript's JSON up to the opening quote of `content`, in the order of
/// [`crate::store::Transcript`]'s fields.
fn transcript_prefix(head: &TranscriptHead) -> String {
    #[derive(serde::Serialize)]
    struct Prefix<'a> {
        id: &'a str,
        object: &'static str,
        model: &'a str,
        created: i64,
        status: Status,
        reason: Option<Reason>,
        detail: Option<&'a str>,
        request: Box<serde_json::value::RawValue>,
    }
    let mut text = serde_json::to_string(&Prefix {
        id: &head.id,
        object: "sluice.stream",
        model: &head.model,
        created: head.created,
        status: head.status,
        reason: head.reason,
        detail: head.detail.as_deref(),
        request: raw_or_string(&head.request),
    })
    .unwrap_or_else(|_| "{".into());
    text.pop(); // the closing brace
    text.push_str(",\"content\":\"");
    text
}

/// The transcript's JSON after `chunks`.
fn transcript_suffix(head: &TranscriptHead) -> String {
    let timings = serde_json::to_string(&head.timings).unwrap_or_else(|_| "null".into());
    let usage = head
        .usage
        .as_deref()
        .map(raw_or_string)
        .map_or_else(|| "null".to_string(), |u| u.get().to_string());
    match head.attempts.as_deref().map(raw_or_string) {
        Some(attempts) => format!(
            ",\"timings\":{timings},\"usage\":{usage},\"attempts\":{}}}",
            attempts.get()
        ),
        None => format!(",\"timings\":{timings},\"usage\":{usage}}}"),
    }
}

/// Appends `text` escaped as the inside of a JSON string.
fn push_json_string_body(out: &mut String, text: &str) {
    let quoted = serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into());
    out.push_str(&quoted[1..quoted.len() - 1]);
}

/// Appends one chunk as `{"seq":..,"offset_ms":..,"data":..}`.
fn push_chunk(out: &mut String, chunk: &crate::store::ChunkRecord) {
    #[derive(serde::Serialize)]
    struct Chunk {
        seq: u64,
        offset_ms: f64,
        data: Box<serde_json::value::RawValue>,
    }
    let c = Chunk {
        seq: chunk.seq,
        offset_ms: chunk.offset_ms,
        data: raw_or_string(&chunk.data),
    };
    if let Ok(text) = serde_json::to_string(&c) {
        out.push_str(&text);
    }
}
