//! Subscribers over Server-Sent Events (`--transport sse`): `GET /sse?rooms=...` on the
//! node of the URL, read with hyper's client (which takes the chunked body apart), cut
//! into events at their blank line and counted as a socket's frames are (`Tally`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::header::HOST;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::board::Board;
use crate::clients::{host_port, Run, SubscriberResult, Tally};
use crate::error::BenchError;
use crate::joins;
use crate::wire::Wire;

/// Events as they arrive: the body's chunks, cut at each event's end.
struct Events {
    body: Incoming,
    buffer: BytesMut,
}

impl Events {
    /// The next event's text (its `event:` and `data:` lines), or `None` at the end.
    async fn next(&mut self) -> Result<Option<Bytes>, BenchError> {
        loop {
            if let Some(end) = memchr::memmem::find(&self.buffer, b"\n\n") {
                let event = self.buffer.split_to(end).freeze();
                self.buffer.advance(2);
                return Ok(Some(event));
            }
            let Some(frame) = self.body.frame().await else {
                return Ok(None);
            };
            let frame = frame.map_err(|e| BenchError::Http(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                self.buffer.extend_from_slice(&data);
            }
        }
    }
}

/// Opens the stream on `rooms` (a board's snapshot first with `state`) holding `place`
/// until the response's head, and waits for its `user_joined` (or a probe) of each room,
/// recording the time to the snapshot.
async fn open(
    url: &str,
    rooms: &[String],
    board: Option<Board>,
    run: &Run,
    place: Option<tokio::sync::SemaphorePermit<'_>>,
) -> Result<Events, BenchError> {
    let (host, port) = host_port(url)?;
    let stream = run.joining.tcp(url).await?;
    let (stream, _) = Wire::new(stream, run.wire_bytes.clone(), false);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| BenchError::Http(e.to_string()))?;
    tokio::spawn(conn);
    let state = if board.is_some_and(|b| b.state) {
        "&state=1"
    } else {
        ""
    };
    let request = Request::get(format!("/sse?rooms={}{state}", rooms.join(",")))
        .header(HOST, format!("{host}:{port}"))
        .body(Empty::<Bytes>::new())
        .map_err(|e| BenchError::Http(e.to_string()))?;
    let opened = Instant::now();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| BenchError::Http(e.to_string()))?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.into_body().collect().await.map(|b| b.to_bytes());
        let body = body
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        return Err(BenchError::Handshake {
            url: url.to_string(),
            reason: format!("GET /sse answered {status}: {body}"),
        });
    }
    // The bound is on requests in flight; the joins' answers are awaited outside it.
    drop(place);
    let mut events = Events {
        body: response.into_body(),
        buffer: BytesMut::new(),
    };
    let mut waiting: HashMap<&str, Vec<u8>> = rooms
        .iter()
        .map(|r| (r.as_str(), joins::probe_of(r)))
        .collect();
    while !waiting.is_empty() {
        let Some(event) = events.next().await? else {
            return Err(BenchError::Closed);
        };
        if memchr::memmem::find(&event, br#"{"probe":""#).is_some() {
            waiting.retain(|_, probe| memchr::memmem::find(&event, probe).is_none());
            continue;
        }
        if event.starts_with(b"event: snapshot\n") {
            run.snapshots.record(opened.elapsed().as_micros() as u64);
            continue;
        }
        // A notice may come alone or in a room's window (a batch event).
        let Some(at) = memchr::memmem::find(&event, b"\ndata: ") else {
            continue;
        };
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&event[at + 7..]) else {
            continue;
        };
        let items = match value["type"].as_str() {
            Some("batch") => value["messages"].as_array().cloned().unwrap_or_default(),
            _ => vec![value],
        };
        for item in items.iter().filter(|m| m["type"] == "user_joined") {
            if let Some(room) = item["roomId"].as_str() {
                waiting.remove(room);
            }
        }
    }
    Ok(events)
}

/// Opens a stream, waits for its joins, then counts until `stop`.
pub async fn subscriber(
    url: String,
    rooms: Vec<String>,
    run: Arc<Run>,
    ready: tokio::sync::mpsc::Sender<()>,
    stop: CancellationToken,
    board: Option<Board>,
) -> Result<SubscriberResult, BenchError> {
    let mut events = run
        .joining
        .join(|place, _| open(&url, &rooms, board, &run, place))
        .await?;
    let _ = ready.send(()).await;
    let mut tally = Tally::new(board);
    loop {
        let event = tokio::select! {
            event = events.next() => event?,
            _ = stop.cancelled() => return Ok(tally.result),
        };
        match event {
            Some(text) => tally.take(&text, &run),
            None => return Err(BenchError::Closed),
        }
    }
}
