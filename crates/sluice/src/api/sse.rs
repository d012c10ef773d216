//! Server-sent events out: a chunk becomes `id: N` and `data:` lines, a completed stream ends
//! with `data: [DONE]`, and an abnormal one with OpenAI's error object instead. [`Events`] is
//! a stream's body in that form.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use bytes::BytesMut;
use futures_util::Stream;
use serde_json::json;
use sluice_flow::QueueError;

use crate::relay::{Frame, Frames};
use crate::stream::{Ending, Reason, Terminal};

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
    out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    out.extend_from_slice(b"\n");
    let mut rest = data.as_bytes();
    loop {
        let (line, next) = match memchr::memchr(b'\n', rest) {
            Some(end) => (&rest[..end], Some(&rest[end + 1..])),
            None => (rest, None),
        };
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
        out.extend_from_slice(b"\n");
        match next {
            Some(next) => rest = next,
            None => break,
        }
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

/// The ending a client sees when the relay vanished without saying how the stream ended.
pub(super) fn abandoned() -> Ending {
    Ending::abnormal(
        Reason::Shutdown,
        "the relay stopped before the stream ended",
    )
}

/// A stream's frames as server-sent events: each chunk once it is committed (only what is in
/// the transcript reaches the client), the frames that are ready coalesced into one write (up
/// to [`COALESCE_BYTES`]), then `[DONE]` or the error event.
///
/// Written out as a state machine rather than a generator: it lives as long as its stream,
/// idle ones included, and a generator keeps room for every wait it has (the commit wait alone
/// was 120 bytes) and a channel to yield through: 312 bytes, where this is 120, and waits for
/// a commit in the watermark's waker slot for the client side.
pub(super) struct Events {
    frames: Frames,
    /// A frame taken from the queue whose chunk is not committed yet.
    held: Option<Frame>,
    /// Events ready to go out together.
    out: BytesMut,
    /// The last chunk sent (the terminal event's id is the next).
    last_seq: u64,
    /// How the queue ended, once it has, while `out` still goes first (`Some(None)`: it
    /// completed).
    ended: Option<Option<QueueError<Terminal>>>,
    done: bool,
}

impl Events {
    /// The body for `frames`; `first` is the frame already taken from them (`None`: the queue
    /// completed before sending any).
    pub(super) fn new(frames: Frames, first: Option<Frame>) -> Self {
        Self {
            frames,
            ended: first.is_none().then_some(None),
            held: first,
            out: BytesMut::new(),
            last_seq: 0,
            done: false,
        }
    }

    /// What is ready to go out, taken (no buffer stays with an idle stream).
    fn flush(&mut self) -> Poll<Option<Result<Bytes, Infallible>>> {
        Poll::Ready(Some(Ok(std::mem::take(&mut self.out).freeze())))
    }

    /// The event that ends the stream.
    fn terminal(&self, ended: Option<QueueError<Terminal>>) -> Bytes {
        let seq = self.last_seq + 1;
        match ended {
            None => encode_terminal(&Terminal {
                seq,
                ending: Ending::Completed,
            }),
            Some(QueueError::Failed(t)) => encode_error(&t),
            Some(QueueError::Abandoned) => encode_error(&Terminal {
                seq,
                ending: abandoned(),
            }),
        }
    }
}

impl Stream for Events {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(frame) = this.held.take() {
                let mut stored = true;
                if let Frame::Chunk(c) = &frame {
                    if let Some(committed) = &c.committed {
                        if committed.poll_reached(c.seq, cx).is_pending() {
                            this.held = Some(frame);
                            // What is ready (committed before this chunk) goes now.
                            return if this.out.is_empty() {
                                Poll::Pending
                            } else {
                                this.flush()
                            };
                        }
                        stored = committed.is_stored(c.seq);
                    }
                    if stored {
                        this.last_seq = c.seq;
                    }
                }
                if stored {
                    encode_frame(&frame, &mut this.out);
                }
                if this.out.len() >= COALESCE_BYTES {
                    return this.flush();
                }
            }
            if let Some(ended) = this.ended.take() {
                if !this.out.is_empty() {
                    this.ended = Some(ended);
                    return this.flush();
                }
                this.done = true;
                return Poll::Ready(Some(Ok(this.terminal(ended))));
            }
            match Pin::new(&mut this.frames).poll_next(cx) {
                Poll::Ready(Some(Ok(frame))) => this.held = Some(frame),
                Poll::Ready(Some(Err(e))) => this.ended = Some(Some(e)),
                Poll::Ready(None) => this.ended = Some(None),
                Poll::Pending if this.out.is_empty() => return Poll::Pending,
                Poll::Pending => return this.flush(),
            }
        }
    }
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
        // A CR before a line's end goes with it; an empty last line is still a data line.
        assert_eq!(
            &sse_event(12345678901, "a\r\nb\n")[..],
            b"id: 12345678901\ndata: a\ndata: b\ndata: \n\n"
        );
        let e = encode_error(&Terminal {
            seq: 4,
            ending: Ending::abnormal(Reason::Idle, "idle"),
        });
        let text = String::from_utf8(e.to_vec()).expect("utf8");
        assert!(text.starts_with("id: 4\ndata: {\"error\":"), "{text}");
        assert!(text.contains("\"code\":\"idle\""), "{text}");
        assert!(!text.contains("[DONE]"));
    }

    mod events {
        use super::*;
        use crate::relay::ChunkFrame;
        use crate::store::Watermark;
        use futures_util::StreamExt;
        use sluice_flow::queue;
        use std::task::Waker;

        fn poll(events: &mut Events) -> Poll<Option<String>> {
            let mut cx = Context::from_waker(Waker::noop());
            events.poll_next_unpin(&mut cx).map(|item| {
                item.map(|bytes| {
                    let Ok(bytes) = bytes;
                    String::from_utf8_lossy(&bytes).into_owned()
                })
            })
        }

        fn chunk(seq: u64, mark: &Watermark) -> Frame {
            Frame::Chunk(ChunkFrame::for_test(
                seq,
                &format!("c{seq}"),
                Some(mark.clone()),
            ))
        }

        #[tokio::test]
        async fn a_chunk_goes_out_once_committed_and_ready_ones_together() {
            let (tx, rx) = queue::bounded::<Frame, Terminal>(8);
            let mark = Watermark::new();
            let mut events = Events::new(rx, Some(chunk(1, &mark)));
            tx.try_send(chunk(2, &mark)).expect("room");
            tx.try_send(chunk(3, &mark)).expect("room");
            assert_eq!(poll(&mut events), Poll::Pending, "nothing committed");
            mark.advance_for_test(2);
            // Chunks 1 and 2 in one write; chunk 3 waits for its commit.
            assert_eq!(
                poll(&mut events),
                Poll::Ready(Some("id: 1\ndata: c1\n\nid: 2\ndata: c2\n\n".into()))
            );
            assert_eq!(poll(&mut events), Poll::Pending);
            tx.fail(Terminal {
                seq: 4,
                ending: Ending::abnormal(Reason::Idle, "idle"),
            });
            mark.advance_for_test(3);
            assert_eq!(
                poll(&mut events),
                Poll::Ready(Some("id: 3\ndata: c3\n\n".into())),
                "what was sent goes before the ending"
            );
            let Poll::Ready(Some(end)) = poll(&mut events) else {
                panic!("the error event");
            };
            assert!(end.starts_with("id: 4\ndata: {\"error\":") && !end.contains("[DONE]"));
            assert_eq!(poll(&mut events), Poll::Ready(None));
        }

        #[tokio::test]
        async fn a_lost_chunk_is_not_sent_and_an_abandoned_queue_is_not_done() {
            let (tx, rx) = queue::bounded::<Frame, Terminal>(8);
            let mark = Watermark::new();
            let mut events = Events::new(rx, Some(chunk(1, &mark)));
            tx.try_send(chunk(2, &mark)).expect("room");
            mark.advance_for_test(1);
            assert_eq!(
                poll(&mut events),
                Poll::Ready(Some("id: 1\ndata: c1\n\n".into()))
            );
            // Chunk 2's batch failed: it is never sent, and the next id follows chunk 1.
            mark.lose_for_test(2);
            drop(tx);
            let Poll::Ready(Some(end)) = poll(&mut events) else {
                panic!("the error event");
            };
            assert!(end.starts_with("id: 2\ndata: {\"error\":"), "{end}");
            assert!(!end.contains("c2") && !end.contains("[DONE]"), "{end}");
            assert_eq!(poll(&mut events), Poll::Ready(None));
        }

        #[tokio::test]
        async fn a_queue_that_completes_ends_with_done() {
            let (tx, rx) = queue::bounded::<Frame, Terminal>(8);
            tx.end();
            let mut events = Events::new(rx, None);
            assert_eq!(
                poll(&mut events),
                Poll::Ready(Some("id: 1\ndata: [DONE]\n\n".into()))
            );
            assert_eq!(poll(&mut events), Poll::Ready(None));
        }
    }
}
