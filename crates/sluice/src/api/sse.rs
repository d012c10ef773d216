//! Server-sent events out: a chunk becomes `id: N` and `data:` lines, a completed stream ends
//! with `data: [DONE]`, and an abnormal one with OpenAI's error object instead.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use bytes::BytesMut;
use serde_json::json;

use crate::relay::Frame;
use crate::stream::{Ending, Terminal};

use super::STREAM_ID_HEADER;

/// The most bytes of ready frames coalesced into one write.
pub(super) const COALESCE_BYTES: usize = 64 * 1024;

/// One SSE event; multi-line data becomes several `data:` lines.
pub(super) fn sse_event(seq: u64, data: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 24);
    write_event(&mut out, seq, data);
    out.freeze()
}

/// Appends one SSE event to `out`.
fn write_event(out: &mut BytesMut, seq: u64, data: &str) {
    out.reserve(data.len() + 24);
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(seq.to_string().as_bytes());
    out.extend_from_slice(b"\n");
    for line in data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.strip_suffix('\r').unwrap_or(line).as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"\n");
}

pub(super) fn encode_frame(frame: &Frame, out: &mut BytesMut) {
    match frame {
        Frame::Chunk(c) => write_event(out, c.seq, &c.data),
        Frame::KeepAlive => out.extend_from_slice(b": keep-alive\n\n"),
    }
}

/// The event that ends a stream: `[DONE]` if it completed, else the error event.
pub(super) fn encode_terminal(t: &Terminal) -> Bytes {
    match t.ending {
        Ending::Completed => Bytes::from(format!("id: {}\ndata: [DONE]\n\n", t.seq)),
        _ => encode_error(t),
    }
}

/// The error event that ends a failed stream: OpenAI's error object, which the SDKs raise.
pub(super) fn encode_error(t: &Terminal) -> Bytes {
    let body = json!({"error": {
        "message": t.ending.detail().unwrap_or("the stream failed"),
        "type": t.ending.status().as_str(),
        "param": null,
        "code": t.ending.reason().map(|r| r.as_str()),
    }});
    sse_event(t.seq, &body.to_string())
}

pub(super) fn sse_response(body: Body, id: &str) -> Response {
    let mut response = Response::new(body);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert(STREAM_ID_HEADER, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::Reason;

    #[test]
    fn events_carry_ids_and_split_multiline_data() {
        assert_eq!(
            &sse_event(3, "{\"a\":1}")[..],
            b"id: 3\ndata: {\"a\":1}\n\n"
        );
        assert_eq!(&sse_event(1, "a\nb")[..], b"id: 1\ndata: a\ndata: b\n\n");
        let e = encode_error(&Terminal {
            seq: 4,
            ending: Ending::abnormal(Reason::Idle, "idle"),
        });
        let text = String::from_utf8(e.to_vec()).expect("utf8");
        assert!(text.starts_with("id: 4\ndata: {\"error\":"), "{text}");
        assert!(text.contains("\"code\":\"idle\""), "{text}");
        assert!(!text.contains("[DONE]"));
    }
}
