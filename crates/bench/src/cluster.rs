//! Two sluice nodes on one PostgreSQL (`--only-cluster --store-url URL`):
//! - **cross-node follow delay**: a stream runs on node A; a follower reads it through node B.
//!   For each chunk both receive live, how much later B's follower gets it than A's client;
//! - **cross-node cancel**: a stream runs on node A; `POST /v1/streams/{id}/cancel` goes to node
//!   B; the time until the upstream sees A close its connection.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Context;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::json;
use sluice::mock_upstream::MockUpstream;
use sluice::upstream::sse::SseParser;

use crate::measure::{client, dist, stream_id_of, upstream_closed, Dist};
use crate::report::header;

/// What `--only-cluster` measures.
#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    /// Follower on B minus client on A, per chunk both got live.
    pub follow_delay: Dist,
    /// Cancel through B until the upstream sees A's connection close.
    pub cancel: Dist,
    /// Cancels whose upstream connection had not closed after 2 s.
    pub cancel_never: usize,
}

/// When each event id of `url`'s SSE body arrived, until it ends; the body comes from `post`
/// (a chat) or a `GET` (a follow).
async fn arrivals(
    response: reqwest::Response,
    first: tokio::sync::oneshot::Sender<String>,
) -> anyhow::Result<HashMap<u64, Instant>> {
    let mut first = Some(first);
    if let Some(id) = response
        .headers()
        .get("x-sluice-stream-id")
        .and_then(|v| v.to_str().ok())
    {
        if let Some(tx) = first.take() {
            let _ = tx.send(id.to_string());
        }
    }
    let mut seen = HashMap::new();
    let mut parser = SseParser::new();
    let mut events = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(bytes) = body.next().await {
        let at = Instant::now();
        parser.push(&bytes?, &mut events)?;
        for e in events.drain(..) {
            if let Some(seq) = e.id.as_deref().and_then(|i| i.parse::<u64>().ok()) {
                seen.entry(seq).or_insert(at);
            }
        }
    }
    Ok(seen)
}

/// Both measurements, against nodes A and B (each `…/v1`) in front of `mock`.
pub async fn run(a: &str, b: &str, mock: &MockUpstream, cancels: usize) -> anyhow::Result<Cluster> {
    // Follow: 400 chunks, 5 ms apart; B's follower joins after A's first chunk.
    let response = client()
        .post(format!("{a}/chat/completions"))
        .json(&json!({"model": "up", "stream": true, "messages": [{"role": "user", "content": "bench"}], "sim": {"tokens": 400, "first_token_ms": 0, "token_interval_ms": 5}}))
        .send()
        .await?;
    let (id_tx, id_rx) = tokio::sync::oneshot::channel();
    let on_a = tokio::spawn(arrivals(response, id_tx));
    let id = id_rx.await.context("a stream id from A")?;
    let follow = client()
        .get(format!("{b}/streams/{id}/events"))
        .send()
        .await?;
    let (unused, _) = tokio::sync::oneshot::channel();
    let on_b = tokio::spawn(arrivals(follow, unused));
    let (on_a, on_b) = (on_a.await??, on_b.await??);
    // The first chunks B got from the store, in a burst, are not live: skip the first 20.
    let delays: Vec<f64> = on_b
        .iter()
        .filter(|(seq, _)| **seq > 20)
        .filter_map(|(seq, tb)| on_a.get(seq).map(|ta| (*tb - *ta).as_secs_f64() * 1e6))
        .collect();

    // Cancel through B.
    let mut samples = Vec::with_capacity(cancels);
    let mut never = 0;
    for _ in 0..cancels {
        let mut response = client()
            .post(format!("{a}/chat/completions"))
            .json(&json!({"model": "up", "stream": true, "messages": [{"role": "user", "content": "bench"}], "sim": {"tokens": 1_000_000, "first_token_ms": 0, "token_interval_ms": 5}}))
            .send()
            .await?;
        let id = stream_id_of(&response)?;
        response.chunk().await?.context("no first chunk")?;
        let before = mock.stats().disconnected();
        let asked = Instant::now();
        client()
            .post(format!("{b}/streams/{id}/cancel"))
            .send()
            .await?;
        match upstream_closed(mock, before, asked).await {
            Some(us) => samples.push(us),
            None => never += 1,
        }
        while response.chunk().await?.is_some() {}
    }
    Ok(Cluster {
        follow_delay: dist(delays),
        cancel: dist(samples),
        cancel_never: never,
    })
}

/// The cluster report in markdown.
pub fn markdown(raw: &serde_json::Value, c: &Cluster) -> String {
    format!(
        "{header}\
         | | n | p50 µs | p99 µs |\n|---|---|---|---|\n\
         | follower on node B behind the client on node A, per chunk | {fn_} | {fp50:.0} | {fp99:.0} |\n\
         | cancel through node B → upstream connection of node A closed | {cn} | {cp50:.0} | {cp99:.0} |\n\n\
         Cancels whose upstream had not closed after 2 s: {never}. Goal: cross-node cancel p99 ≤ 20 ms.\n",
        header = header("Two nodes on one PostgreSQL", raw),
        fn_ = c.follow_delay.n,
        fp50 = c.follow_delay.p50_us,
        fp99 = c.follow_delay.p99_us,
        cn = c.cancel.n,
        cp50 = c.cancel.p50_us,
        cp99 = c.cancel.p99_us,
        never = c.cancel_never,
    )
}
