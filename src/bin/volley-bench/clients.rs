//! The load's clients: subscriber sockets that count what arrives, and publishers (sockets
//! or the HTTP API) that send at a steady rate. They share one `Run`: the measuring clock
//! and the counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket};
use http_body_util::Empty;
use hyper::header::{CONNECTION, HOST, UPGRADE};
use hyper::upgrade::Upgraded;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::board::{self, Board, Counter, SnapshotTimes};
use crate::error::BenchError;
use crate::joins::{self, Joining};
use crate::plan::Plan;
use crate::scan::{self, Scanner};
use crate::wire::{Tap, Wire};

/// How subscribers are served.
#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Transport {
    /// WebSockets.
    Ws,
    /// Server-Sent Events (`GET /sse`) on the URL's host and port.
    Sse,
}

/// How publishers publish.
#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Via {
    /// Publisher sockets sending `message` frames.
    Socket,
    /// `POST /api/publish` on keep-alive HTTP connections (needs --api-key).
    Api,
}

/// Shared clock and counters.
pub struct Run {
    /// Messages sent at or after this time (µs since the epoch) count; MAX = not yet.
    pub measure_from_us: AtomicU64,
    /// Messages sent at or after this time do not count.
    pub measure_until_us: AtomicU64,
    pub published: AtomicU64,
    pub expected: AtomicU64,
    /// Frames with counted messages so far: shows when in-flight traffic has drained.
    pub progress: AtomicU64,
    pub errors: AtomicU64,
    /// Bytes the subscribers read off their sockets after the upgrade.
    pub wire_bytes: Arc<AtomicU64>,
    /// Board mode with --state: each subscriber's time from join to snapshot.
    pub snapshots: Arc<SnapshotTimes>,
    /// How subscribers connect and join, and how long that took.
    pub joining: Joining,
}

impl Run {
    pub fn new(joining: Joining) -> Run {
        Run {
            joining,
            measure_from_us: AtomicU64::new(u64::MAX),
            measure_until_us: AtomicU64::new(u64::MAX),
            published: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            progress: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            wire_bytes: Arc::default(),
            snapshots: Arc::default(),
        }
    }

    fn counts(&self, sent_us: u64) -> bool {
        sent_us >= self.measure_from_us.load(Relaxed)
            && sent_us < self.measure_until_us.load(Relaxed)
    }
}

/// What one subscriber socket counted.
#[derive(Default)]
pub struct SubscriberResult {
    pub frames: u64,
    pub delivered: u64,
    pub disordered: u64,
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

type Socket = WebSocket<TokioIo<Upgraded>>;

struct SpawnExecutor;

impl<Fut> hyper::rt::Executor<Fut> for SpawnExecutor
where
    Fut: std::future::Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    fn execute(&self, fut: Fut) {
        tokio::spawn(fut);
    }
}

/// A node URL's host and port.
pub fn host_port(url: &str) -> Result<(String, u16), BenchError> {
    let bad = |reason: String| BenchError::Url {
        url: url.to_string(),
        reason,
    };
    let uri: hyper::Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
    let host = uri.host().ok_or_else(|| bad("no host".into()))?;
    Ok((host.to_string(), uri.port_u16().unwrap_or(80)))
}

pub async fn tcp(url: &str) -> Result<TcpStream, BenchError> {
    let (host, port) = host_port(url)?;
    let stream = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|source| BenchError::Connect {
            url: url.to_string(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

pub async fn connect(url: &str) -> Result<Socket, BenchError> {
    Ok(connect_with(url, Arc::default(), false).await?.0)
}

/// Connects counting the bytes read into `bytes`; with `deflate`, offers
/// permessage-deflate (the `Tap` inflates what comes compressed).
pub async fn connect_with(
    url: &str,
    bytes: Arc<AtomicU64>,
    deflate: bool,
) -> Result<(Socket, Tap), BenchError> {
    connect_over(url, tcp(url).await?, bytes, deflate).await
}

/// The WebSocket handshake over `stream` (a connection to `url`'s node).
pub async fn connect_over(
    url: &str,
    stream: TcpStream,
    bytes: Arc<AtomicU64>,
    deflate: bool,
) -> Result<(Socket, Tap), BenchError> {
    let (host, port) = host_port(url)?;
    let uri: hyper::Uri = url.parse().map_err(|e| BenchError::Url {
        url: url.to_string(),
        reason: format!("{e}"),
    })?;
    let handshake = |reason: String| BenchError::Handshake {
        url: url.to_string(),
        reason,
    };
    let request = Request::builder()
        .method("GET")
        .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header(HOST, format!("{host}:{port}"))
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13");
    let request = if deflate {
        request.header(
            "Sec-WebSocket-Extensions",
            "permessage-deflate; client_max_window_bits",
        )
    } else {
        request
    };
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| handshake(e.to_string()))?;
    let (stream, tap) = Wire::new(stream, bytes, deflate);
    let (ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, request, stream)
        .await
        .map_err(|e| handshake(e.to_string()))?;
    Ok((ws, tap))
}

pub async fn send_text(ws: &mut Socket, text: String) -> Result<(), BenchError> {
    Ok(ws
        .write_frame(Frame::text(Payload::Owned(text.into_bytes())))
        .await?)
}

/// Joins `rooms` and waits for the socket's own `user_joined` notice of each: the proof
/// that the joins took effect. In board mode with `state`, records the time from the
/// join to the board's snapshot.
pub async fn join(
    ws: &mut Socket,
    tap: &Tap,
    rooms: &[String],
    board: Option<Board>,
    snapshots: &SnapshotTimes,
) -> Result<(), BenchError> {
    let joined = Instant::now();
    send_joins(ws, rooms, board).await?;
    await_joins(ws, tap, rooms, joined, snapshots).await
}

/// Sends the join frames of `rooms`.
pub async fn send_joins(
    ws: &mut Socket,
    rooms: &[String],
    board: Option<Board>,
) -> Result<(), BenchError> {
    ws.set_auto_pong(true);
    for room in rooms {
        send_text(ws, board::join_frame(room, board)).await?;
    }
    Ok(())
}

/// Waits until each of `rooms` answered its join (a notice or a probe); in board mode
/// records the time from `joined` to the snapshot.
pub async fn await_joins(
    ws: &mut Socket,
    tap: &Tap,
    rooms: &[String],
    joined: Instant,
    snapshots: &SnapshotTimes,
) -> Result<(), BenchError> {
    let mut waiting: HashMap<&str, Vec<u8>> = rooms
        .iter()
        .map(|r| (r.as_str(), joins::probe_of(r)))
        .collect();
    while !waiting.is_empty() {
        let frame = ws.read_frame().await?;
        if frame.opcode == OpCode::Close {
            return Err(BenchError::Closed);
        }
        let Some(text) = tap.text(&frame) else {
            continue;
        };
        if memchr::memmem::find(&text, br#"{"probe":""#).is_some() {
            waiting.retain(|_, probe| memchr::memmem::find(&text, probe).is_none());
            continue;
        }
        if text.starts_with(br#"{"type":"snapshot","#) {
            snapshots.record(joined.elapsed().as_micros() as u64);
            continue;
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&text) else {
            continue;
        };
        let messages = match value["type"].as_str() {
            Some("batch") => value["messages"].as_array().cloned().unwrap_or_default(),
            _ => vec![value],
        };
        for m in messages {
            if m["type"] == "user_joined" {
                if let Some(room) = m["roomId"].as_str() {
                    waiting.remove(room);
                }
            }
        }
    }
    Ok(())
}

/// Connects, joins, waits for its own join notices, then counts until `stop`.
pub async fn subscriber(
    url: String,
    rooms: Vec<String>,
    run: Arc<Run>,
    ready: tokio::sync::mpsc::Sender<()>,
    stop: CancellationToken,
    deflate: bool,
    board: Option<Board>,
) -> Result<SubscriberResult, BenchError> {
    let (url, rooms, shared) = (&url, &rooms, &*run);
    let (mut ws, tap) = run
        .joining
        .join(|place, started| async move {
            let run = shared;
            let stream = run.joining.tcp(url).await?;
            let (mut ws, tap) = connect_over(url, stream, run.wire_bytes.clone(), deflate).await?;
            send_joins(&mut ws, rooms, board).await?;
            // The bound is on handshakes in flight; the joins' answers are awaited
            // outside it (a probe may be seconds away).
            drop(place);
            await_joins(&mut ws, &tap, rooms, started, &run.snapshots).await?;
            Ok((ws, tap))
        })
        .await?;
    let _ = ready.send(()).await;

    let mut tally = Tally::new(board);
    loop {
        let frame = tokio::select! {
            frame = ws.read_frame() => frame?,
            _ = stop.cancelled() => return Ok(tally.result),
        };
        if frame.opcode == OpCode::Close {
            return Err(BenchError::Closed);
        }
        if let Some(text) = tap.text(&frame) {
            tally.take(&text, &run);
        }
    }
}

/// What one subscriber counts, from each frame's (or SSE event's) text as it arrives.
pub struct Tally {
    scanner: Scanner,
    counter: Counter,
    board: Option<Board>,
    pub result: SubscriberResult,
    last_seq: HashMap<(u32, u32), u64>,
}

impl Tally {
    pub fn new(board: Option<Board>) -> Tally {
        Tally {
            scanner: Scanner::new(),
            counter: Counter::new(),
            board,
            result: SubscriberResult::default(),
            last_seq: HashMap::new(),
        }
    }

    /// Counts the messages in one frame's text that were sent in the measured seconds.
    pub fn take(&mut self, text: &[u8], run: &Run) {
        let arrived = now_us();
        let mut counted_frame = false;
        let result = &mut self.result;
        if self.board.is_some() && run.counts(arrived) {
            // A delta has no content to scan: board messages count by their offset.
            let n = self.counter.count(text);
            result.delivered += n;
            counted_frame = n > 0;
        }
        let (board, last_seq) = (self.board.is_some(), &mut self.last_seq);
        self.scanner.scan(text, |m| {
            if !run.counts(m.sent_us) {
                return;
            }
            counted_frame = true;
            if !board {
                result.delivered += 1;
            }
            crate::latency::record(arrived.saturating_sub(m.sent_us).max(1));
            let last = last_seq.entry((m.publisher, m.room)).or_insert(0);
            if m.seq <= *last {
                result.disordered += 1;
            }
            *last = m.seq;
        });
        if counted_frame {
            result.frames += 1;
            run.progress.fetch_add(1, Relaxed);
        }
    }
}

/// Where a publisher sends its messages.
enum Sink {
    Socket(fastwebsockets::WebSocketWrite<tokio::io::WriteHalf<TokioIo<Upgraded>>>),
    Api {
        sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
        host: String,
        key: String,
    },
}

/// How long a publisher socket may stay silent: the nodes close a socket that sent
/// nothing for `server.idle_timeout_ms` (60 s by default), and the publisher reads its
/// pings without answering them.
const PUBLISHER_HEARTBEAT: Duration = Duration::from_secs(15);

impl Sink {
    /// Keeps a quiet publisher socket open: an unsolicited pong (RFC 6455 allows one as
    /// a heartbeat). Nothing for the API: its connection is made again when it fails.
    async fn heartbeat(&mut self) -> Result<(), BenchError> {
        if let Sink::Socket(tx) = self {
            tx.write_frame(Frame::pong(Payload::Borrowed(&[]))).await?;
        }
        Ok(())
    }

    async fn send(&mut self, room: &str, content: String, run: &Run) -> Result<(), BenchError> {
        match self {
            Sink::Socket(tx) => {
                let frame =
                    format!(r#"{{"type":"message","roomId":"{room}","content":{content}}}"#);
                Ok(tx
                    .write_frame(Frame::text(Payload::Owned(frame.into_bytes())))
                    .await?)
            }
            Sink::Api { sender, host, key } => {
                let body = format!(r#"{{"roomId":"{room}","content":{content}}}"#);
                let request = Request::post("/api/publish")
                    .header(HOST, host.as_str())
                    .header(hyper::header::AUTHORIZATION, format!("apikey {key}"))
                    .header(hyper::header::CONTENT_TYPE, "application/json")
                    .body(http_body_util::Full::new(Bytes::from(body)))
                    .map_err(|e| BenchError::Http(e.to_string()))?;
                let response = sender
                    .send_request(request)
                    .await
                    .map_err(|e| BenchError::Http(e.to_string()))?;
                if !response.status().is_success() && run.errors.fetch_add(1, Relaxed) == 0 {
                    eprintln!("volley-bench: publish API answered {}", response.status());
                }
                // Read the small body so the connection can be reused.
                let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                Ok(())
            }
        }
    }
}

async fn api_sink(url: &str, key: String) -> Result<Sink, BenchError> {
    let (host, port) = host_port(url)?;
    let stream = tcp(url).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| BenchError::Http(e.to_string()))?;
    tokio::spawn(conn);
    Ok(Sink::Api {
        sender,
        host: format!("{host}:{port}"),
        key,
    })
}

async fn socket_sink(
    url: &str,
    run: Arc<Run>,
) -> Result<(Sink, tokio::task::JoinHandle<()>), BenchError> {
    let ws = connect(url).await?;
    let (mut rx, tx) = ws.split(tokio::io::split);
    // The publisher joins nothing: whatever comes back is an error frame.
    let reader = tokio::spawn(async move {
        let mut ignore = |_: Frame<'_>| async { Ok::<(), std::convert::Infallible>(()) };
        while let Ok(frame) = rx.read_frame(&mut ignore).await {
            if frame.opcode != OpCode::Text {
                continue;
            }
            // A batch frame may carry many errors: count each.
            let errors =
                memchr::memmem::find_iter(&frame.payload, br#""type":"error""#).count() as u64;
            if errors > 0 && run.errors.fetch_add(errors, Relaxed) == 0 {
                let text = String::from_utf8_lossy(&frame.payload);
                let first: String = text.chars().take(200).collect();
                eprintln!("volley-bench: server error (first shown): {first}");
            }
        }
    });
    Ok((Sink::Socket(tx), reader))
}

/// One publisher's setup.
pub struct Publisher {
    pub url: String,
    pub index: usize,
    pub plan: Arc<Plan>,
    pub rooms: Arc<Vec<String>>,
    pub subscribers_per_room: Arc<Vec<u64>>,
    pub run: Arc<Run>,
    pub via: Via,
    pub api_key: String,
    pub stop: CancellationToken,
}

/// Publishes at its share of the rate to its share of rooms until `stop`.
pub async fn publisher(p: Publisher) -> Result<(), BenchError> {
    let Publisher {
        url,
        index,
        plan,
        rooms,
        subscribers_per_room,
        run,
        via,
        api_key,
        stop,
    } = p;
    let (mut sink, reader) = match via {
        Via::Socket => {
            let (sink, reader) = socket_sink(&url, run.clone()).await?;
            (sink, Some(reader))
        }
        Via::Api => (api_sink(&url, api_key.clone()).await?, None),
    };
    let rate = plan.rate / plan.publishers as f64;
    let mut seqs = vec![0u64; rooms.len()];
    let start = Instant::now();
    let mut last_sent = start;
    let mut sent = 0u64;
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => break,
        }
        if last_sent.elapsed() >= PUBLISHER_HEARTBEAT {
            sink.heartbeat().await?;
            last_sent = Instant::now();
        }
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            let room = (sent as usize * plan.publishers + index) % rooms.len();
            seqs[room] += 1;
            let t = now_us();
            let content = match plan.board {
                Some(b) => board::quote(
                    index as u32,
                    room as u32,
                    seqs[room],
                    t,
                    (sent as usize * plan.publishers + index).wrapping_mul(2_654_435_761)
                        % b.symbols,
                ),
                None => scan::content(index as u32, room as u32, seqs[room], t, plan.payload),
            };
            if let Err(e) = sink.send(&rooms[room], content.clone(), &run).await {
                // A keep-alive API connection the node closed while quiet: once more on
                // a new one.
                if via != Via::Api {
                    return Err(e);
                }
                sink = api_sink(&url, api_key.clone()).await?;
                sink.send(&rooms[room], content, &run).await?;
            }
            last_sent = Instant::now();
            if run.counts(t) {
                run.published.fetch_add(1, Relaxed);
                run.expected.fetch_add(subscribers_per_room[room], Relaxed);
            }
            sent += 1;
        }
    }
    if let Some(reader) = reader {
        reader.abort();
    }
    Ok(())
}
