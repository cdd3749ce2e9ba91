//! `volley-bench`: the end-to-end load tool.
//!
//! Opens subscriber sockets spread over one or more nodes, joins them to rooms, drives
//! publishers at a steady total rate, and reports what arrived: deliveries against the
//! count expected, loss, duplicates and reordering, end-to-end latency from the send time
//! carried in each message, frames per socket, and — given the servers' pids — server CPU
//! per delivery. Only messages sent after the warm-up count.
//!
//! It shares the machine with the servers, so it stays cheap: frames are scanned for the
//! bench's fixed-shape content instead of parsed (see `scan.rs`).

mod scan;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use fastwebsockets::{Frame, OpCode, Payload, WebSocket};
use hdrhistogram::Histogram;
use http_body_util::Empty;
use hyper::header::{CONNECTION, HOST, UPGRADE};
use hyper::upgrade::Upgraded;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use scan::Scanner;

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum Via {
    /// Publisher sockets sending `message` frames.
    Socket,
    /// `POST /api/publish` on keep-alive HTTP connections (needs --api-key).
    Api,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Scenario {
    /// 2000 sockets, 20 rooms, 1 room each, 200 msg/s, 100-byte payloads.
    Scoreboard,
    /// 500 sockets, 200 rooms, 20 rooms each, 2000 msg/s, 60-byte payloads.
    Ticker,
}

/// volley-bench: end-to-end load for volley nodes.
///
/// Opens N WebSocket sockets spread round-robin over the node URLs, joins each to R of K
/// rooms, publishes at a total rate from P publishers (sockets or the HTTP API), and
/// reports what arrived: published / expected / delivered, loss, duplicates and
/// out-of-order per publisher and room, latency percentiles from the send time in each
/// message, frames per socket per second, and, with --pid and --redis-url, server CPU
/// per delivery and Redis commands per second. Targets are 127.0.0.1 nodes you started
/// (benches/e2e.sh starts a Redis and two nodes and runs this).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Node WebSocket URL; repeat for several nodes (sockets are spread round-robin).
    #[arg(long = "url", default_value = "ws://127.0.0.1:8080/ws")]
    urls: Vec<String>,
    /// A preset; the flags below override its values.
    #[arg(long, value_enum)]
    scenario: Option<Scenario>,
    /// Subscriber sockets in all.
    #[arg(long)]
    sockets: Option<usize>,
    /// Rooms in all (`<room-prefix>-0` ...).
    #[arg(long)]
    rooms: Option<usize>,
    /// Rooms each subscriber socket joins.
    #[arg(long)]
    rooms_per_socket: Option<usize>,
    /// Publishers (sockets that join no room, or HTTP connections with --via api).
    #[arg(long)]
    publishers: Option<usize>,
    /// How publishers publish.
    #[arg(long, value_enum, default_value = "socket")]
    via: Via,
    /// The nodes' api.key, for --via api.
    #[arg(long, default_value = "")]
    api_key: String,
    /// Total messages per second over all publishers.
    #[arg(long)]
    rate: Option<f64>,
    /// Size of each message's content in bytes.
    #[arg(long)]
    payload: Option<usize>,
    /// Seconds before measuring.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Prefix of room names, so runs do not meet.
    #[arg(long, default_value = "bench")]
    room_prefix: String,
    /// Server process ids whose CPU time is measured; repeat for several.
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// The Redis the nodes share: its command rates during the measurement are reported.
    #[arg(long)]
    redis_url: Option<String>,
    /// One JSON line instead of the table.
    #[arg(long)]
    json: bool,
}

struct Plan {
    sockets: usize,
    rooms: usize,
    rooms_per_socket: usize,
    publishers: usize,
    rate: f64,
    payload: usize,
}

impl Plan {
    fn from(args: &Args) -> Plan {
        let (sockets, rooms, per, publishers, rate, payload) = match args.scenario {
            Some(Scenario::Scoreboard) | None => (2000, 20, 1, 4, 200.0, 100),
            Some(Scenario::Ticker) => (500, 200, 20, 4, 2000.0, 60),
        };
        Plan {
            sockets: args.sockets.unwrap_or(sockets),
            rooms: args.rooms.unwrap_or(rooms).max(1),
            rooms_per_socket: args.rooms_per_socket.unwrap_or(per).max(1),
            publishers: args.publishers.unwrap_or(publishers).max(1),
            rate: args.rate.unwrap_or(rate),
            payload: args.payload.unwrap_or(payload),
        }
    }

    fn rooms_of(&self, socket: usize) -> Vec<usize> {
        let per = self.rooms_per_socket.min(self.rooms);
        (0..per).map(|j| (socket * per + j) % self.rooms).collect()
    }
}

/// Shared clock and counters.
struct Run {
    /// Messages sent at or after this time (µs since the epoch) count; MAX = not yet.
    measure_from_us: AtomicU64,
    /// Messages sent at or after this time do not count.
    measure_until_us: AtomicU64,
    published: AtomicU64,
    expected: AtomicU64,
    /// Frames with counted messages so far: shows when in-flight traffic has drained.
    progress: AtomicU64,
    errors: AtomicU64,
}

impl Run {
    fn counts(&self, sent_us: u64) -> bool {
        sent_us >= self.measure_from_us.load(Relaxed)
            && sent_us < self.measure_until_us.load(Relaxed)
    }
}

#[derive(Default)]
struct SubscriberResult {
    frames: u64,
    delivered: u64,
    disordered: u64,
    latency: Option<Histogram<u64>>,
}

fn now_us() -> u64 {
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

async fn connect(url: &str) -> Result<Socket, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let _ = stream.set_nodelay(true);
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
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let (ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, request, stream)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    Ok(ws)
}

async fn send_text(ws: &mut Socket, text: String) -> Result<(), String> {
    ws.write_frame(Frame::text(Payload::Owned(text.into_bytes())))
        .await
        .map_err(|e| e.to_string())
}

/// Connects, joins, waits for its own join notices, then counts until `stop`.
async fn subscriber(
    url: String,
    rooms: Vec<String>,
    run: Arc<Run>,
    ready: tokio::sync::mpsc::Sender<()>,
    stop: CancellationToken,
) -> Result<SubscriberResult, String> {
    let mut ws = connect(&url).await?;
    ws.set_auto_pong(true);
    for room in &rooms {
        send_text(
            &mut ws,
            serde_json::json!({"type":"join","roomId":room}).to_string(),
        )
        .await?;
    }
    // The first user_joined of a room proves this socket's join took effect.
    let mut waiting: std::collections::HashSet<String> = rooms.iter().cloned().collect();
    while !waiting.is_empty() {
        let frame = ws.read_frame().await.map_err(|e| e.to_string())?;
        if frame.opcode != OpCode::Text {
            continue;
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&frame.payload) else {
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
    let _ = ready.send(()).await;

    let scanner = Scanner::new();
    let mut result = SubscriberResult {
        latency: Histogram::new_with_bounds(1, 120_000_000, 3).ok(),
        ..SubscriberResult::default()
    };
    let mut last_seq: HashMap<(u32, u32), u64> = HashMap::new();
    loop {
        let frame = tokio::select! {
            frame = ws.read_frame() => frame.map_err(|e| e.to_string())?,
            _ = stop.cancelled() => return Ok(result),
        };
        if frame.opcode == OpCode::Close {
            return Err("the server closed the socket".into());
        }
        if frame.opcode != OpCode::Text {
            continue;
        }
        let arrived = now_us();
        let mut counted_frame = false;
        scanner.scan(&frame.payload, |m| {
            if !run.counts(m.sent_us) {
                return;
            }
            counted_frame = true;
            result.delivered += 1;
            if let Some(h) = result.latency.as_mut() {
                let _ = h.record(arrived.saturating_sub(m.sent_us).max(1));
            }
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

impl Sink {
    async fn send(&mut self, room: &str, content: String, run: &Run) -> Result<(), String> {
        match self {
            Sink::Socket(tx) => {
                let frame =
                    format!(r#"{{"type":"message","roomId":"{room}","content":{content}}}"#);
                tx.write_frame(Frame::text(Payload::Owned(frame.into_bytes())))
                    .await
                    .map_err(|e| e.to_string())
            }
            Sink::Api { sender, host, key } => {
                let body = format!(r#"{{"roomId":"{room}","content":{content}}}"#);
                let request = Request::post("/api/publish")
                    .header(HOST, host.as_str())
                    .header(hyper::header::AUTHORIZATION, format!("apikey {key}"))
                    .header(hyper::header::CONTENT_TYPE, "application/json")
                    .body(http_body_util::Full::new(Bytes::from(body)))
                    .map_err(|e| e.to_string())?;
                let response = sender
                    .send_request(request)
                    .await
                    .map_err(|e| e.to_string())?;
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

async fn api_sink(url: &str, key: String) -> Result<Sink, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("{url}: no host"))?
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
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
) -> Result<(Sink, tokio::task::JoinHandle<()>), String> {
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

/// Publishes at `rate` per second to its share of rooms until `stop`.
#[allow(clippy::too_many_arguments)] // one publisher's whole setup, passed once
async fn publisher(
    url: String,
    index: usize,
    plan: Arc<Plan>,
    rooms: Arc<Vec<String>>,
    subscribers_per_room: Arc<Vec<u64>>,
    run: Arc<Run>,
    via: Via,
    api_key: String,
    stop: CancellationToken,
) -> Result<(), String> {
    let (mut sink, reader) = match via {
        Via::Socket => {
            let (sink, reader) = socket_sink(&url, run.clone()).await?;
            (sink, Some(reader))
        }
        Via::Api => (api_sink(&url, api_key).await?, None),
    };
    let rate = plan.rate / plan.publishers as f64;
    let mut seqs = vec![0u64; rooms.len()];
    let start = Instant::now();
    let mut sent = 0u64;
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => break,
        }
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            let room = (sent as usize * plan.publishers + index) % rooms.len();
            seqs[room] += 1;
            let t = now_us();
            let content = scan::content(index as u32, room as u32, seqs[room], t, plan.payload);
            sink.send(&rooms[room], content, &run).await?;
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

/// The node a subscriber socket connects to. Scrambled, so that node choice does not
/// follow room choice (both from the socket index): every room gets subscribers on
/// every node and messages really cross nodes.
fn node_of(socket: usize, nodes: usize) -> usize {
    ((socket as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % nodes.max(1)
}

/// Counters read at the start and the end of the measurement, outside the servers' CPU.
#[derive(Default, Clone, Copy)]
struct ServerCounters {
    redis_commands: Option<f64>,
    redis_publish: Option<f64>,
    pipelines: Option<f64>,
}

async fn redis_counters(url: &str) -> Option<(f64, f64)> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let stats: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await
        .ok()?;
    let commands: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .ok()?;
    let total = stats
        .lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())?;
    let publish = commands
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_publish:calls="))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Some((total, publish))
}

/// Sum of the nodes' `redis_pipelines` counters, from `/healthz` on each node's address.
async fn pipelines(urls: &[String]) -> Option<f64> {
    let mut total = 0.0;
    for url in urls {
        let uri: hyper::Uri = url.parse().ok()?;
        let (host, port) = (uri.host()?.to_string(), uri.port_u16().unwrap_or(80));
        let stream = TcpStream::connect((host.as_str(), port)).await.ok()?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let request = Request::get("/healthz")
            .header(HOST, format!("{host}:{port}"))
            .body(Empty::<Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .ok()?
            .to_bytes();
        let health: serde_json::Value = serde_json::from_slice(&body).ok()?;
        total += health["redis_pipelines"].as_f64()?;
    }
    Some(total)
}

async fn server_counters(args: &Args) -> ServerCounters {
    let redis = match &args.redis_url {
        Some(url) => redis_counters(url).await,
        None => None,
    };
    ServerCounters {
        redis_commands: redis.map(|r| r.0),
        redis_publish: redis.map(|r| r.1),
        pipelines: if args.redis_url.is_some() {
            pipelines(&args.urls).await
        } else {
            None
        },
    }
}

fn rate(before: Option<f64>, after: Option<f64>, seconds: f64) -> Option<f64> {
    before.zip(after).map(|(a, b)| (b - a) / seconds)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

fn total_cpu(pids: &[u32]) -> Option<f64> {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if args.via == Via::Api && args.api_key.is_empty() {
        eprintln!("volley-bench: --via api needs --api-key (the nodes' api.key)");
        std::process::exit(2);
    }
    let plan = Arc::new(Plan::from(&args));
    if let Err(e) = bench(&args, plan).await {
        eprintln!("volley-bench: {e}");
        std::process::exit(1);
    }
}

async fn bench(args: &Args, plan: Arc<Plan>) -> Result<(), String> {
    let run = Arc::new(Run {
        measure_from_us: AtomicU64::new(u64::MAX),
        measure_until_us: AtomicU64::new(u64::MAX),
        published: AtomicU64::new(0),
        expected: AtomicU64::new(0),
        progress: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let rooms: Arc<Vec<String>> = Arc::new(
        (0..plan.rooms)
            .map(|r| format!("{}-{r}", args.room_prefix))
            .collect(),
    );
    let mut per_room = vec![0u64; plan.rooms];
    for s in 0..plan.sockets {
        for r in plan.rooms_of(s) {
            per_room[r] += 1;
        }
    }
    let per_room = Arc::new(per_room);
    let stop_subscribers = CancellationToken::new();
    let stop_publishers = CancellationToken::new();

    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(plan.sockets.max(1));
    let mut subscribers = JoinSet::new();
    for s in 0..plan.sockets {
        let url = args.urls[node_of(s, args.urls.len())].clone();
        let my_rooms = plan
            .rooms_of(s)
            .into_iter()
            .map(|r| rooms[r].clone())
            .collect();
        subscribers.spawn(subscriber(
            url,
            my_rooms,
            run.clone(),
            ready_tx.clone(),
            stop_subscribers.clone(),
        ));
        if s % 100 == 99 {
            // Let the accept queue breathe while thousands of sockets connect.
            tokio::task::yield_now().await;
        }
    }
    drop(ready_tx);
    for joined in 0..plan.sockets {
        if tokio::time::timeout(Duration::from_secs(60), ready_rx.recv())
            .await
            .ok()
            .flatten()
            .is_none()
        {
            let err = match subscribers.try_join_next() {
                Some(Ok(Err(e))) => e,
                _ => "timed out".into(),
            };
            return Err(format!(
                "only {joined} of {} sockets joined: {err}",
                plan.sockets
            ));
        }
    }

    let mut publishers = JoinSet::new();
    for p in 0..plan.publishers {
        let url = args.urls[p % args.urls.len()].clone();
        publishers.spawn(publisher(
            url,
            p,
            plan.clone(),
            rooms.clone(),
            per_room.clone(),
            run.clone(),
            args.via,
            args.api_key.clone(),
            stop_publishers.clone(),
        ));
    }
    let progress = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(((args.warmup + args.duration) * 10.0) as u64)
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let ticker = {
        let (progress, run) = (progress.clone(), run.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            loop {
                every.tick().await;
                progress.inc(1);
                let phase = if run.measure_from_us.load(Relaxed) == u64::MAX {
                    "warm-up"
                } else {
                    "measuring"
                };
                progress.set_message(format!(
                    "{phase}: {} published, {} expected deliveries",
                    run.published.load(Relaxed),
                    run.expected.load(Relaxed)
                ));
            }
        })
    };
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let counters_before = server_counters(args).await;
    let cpu_before = total_cpu(&args.pids);
    let started = Instant::now();
    run.measure_from_us.store(now_us(), Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    run.measure_until_us.store(now_us(), Relaxed);
    let counters_after = server_counters(args).await;
    let counted_secs = started.elapsed().as_secs_f64();
    ticker.abort();
    progress.finish_and_clear();
    let measured = started.elapsed().as_secs_f64();
    stop_publishers.cancel();
    while let Some(result) = publishers.join_next().await {
        if let Ok(Err(e)) = result {
            return Err(format!("publisher failed: {e}"));
        }
    }
    // Wait for what is in flight: until deliveries stop growing (at most 10 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = run.progress.load(Relaxed);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = run.progress.load(Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    let cpu_after = total_cpu(&args.pids);
    stop_subscribers.cancel();
    let mut latency =
        Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).map_err(|e| e.to_string())?;
    let (mut frames, mut delivered, mut disordered, mut failed) = (0u64, 0u64, 0u64, 0usize);
    while let Some(result) = subscribers.join_next().await {
        match result {
            Ok(Ok(r)) => {
                frames += r.frames;
                delivered += r.delivered;
                disordered += r.disordered;
                if let Some(h) = r.latency {
                    let _ = latency.add(h);
                }
            }
            _ => failed += 1,
        }
    }
    let expected = run.expected.load(Relaxed);
    let report = serde_json::json!({
        "sockets": plan.sockets,
        "rooms": plan.rooms,
        "rooms_per_socket": plan.rooms_per_socket,
        "publishers": plan.publishers,
        "rate": plan.rate,
        "payload_bytes": plan.payload,
        "seconds": measured,
        "published": run.published.load(Relaxed),
        "expected": expected,
        "delivered": delivered,
        "lost": expected.saturating_sub(delivered),
        "disordered_or_duplicate": disordered,
        "failed_sockets": failed,
        "error_frames": run.errors.load(Relaxed),
        "delivered_per_s": delivered as f64 / measured,
        "frames_per_socket_per_s": frames as f64 / measured / plan.sockets.max(1) as f64,
        "latency_ms": {
            "p50": latency.value_at_quantile(0.50) as f64 / 1000.0,
            "p99": latency.value_at_quantile(0.99) as f64 / 1000.0,
            "p999": latency.value_at_quantile(0.999) as f64 / 1000.0,
            "max": latency.max() as f64 / 1000.0,
        },
        "server_cpu_s": cpu_before.zip(cpu_after).map(|(a, b)| b - a),
        "redis_commands_per_s": rate(counters_before.redis_commands, counters_after.redis_commands, counted_secs),
        "redis_publish_per_s": rate(counters_before.redis_publish, counters_after.redis_publish, counted_secs),
        "publish_pipelines_per_s": rate(counters_before.pipelines, counters_after.pipelines, counted_secs),
        "server_cpu_us_per_delivery": cpu_before.zip(cpu_after).filter(|_| delivered > 0).map(|(a, b)| (b - a) * 1e6 / delivered as f64),
    });
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &serde_json::Value) {
    println!(
        "{} sockets, {} rooms ({} per socket), {} publishers at {} msg/s, {}-byte payloads, {:.1} s measured",
        r["sockets"], r["rooms"], r["rooms_per_socket"], r["publishers"], r["rate"], r["payload_bytes"], r["seconds"].as_f64().unwrap_or(0.0)
    );
    println!(
        "published {}  expected {}  delivered {}  lost {}  dup/out-of-order {}  failed sockets {}  error frames {}",
        r["published"], r["expected"], r["delivered"], r["lost"], r["disordered_or_duplicate"], r["failed_sockets"], r["error_frames"]
    );
    println!(
        "delivered/s {:.0}  frames/socket/s {:.2}",
        r["delivered_per_s"].as_f64().unwrap_or(0.0),
        r["frames_per_socket_per_s"].as_f64().unwrap_or(0.0)
    );
    let l = &r["latency_ms"];
    println!(
        "latency ms  p50 {}  p99 {}  p99.9 {}  max {}",
        l["p50"], l["p99"], l["p999"], l["max"]
    );
    if let Some(commands) = r["redis_commands_per_s"].as_f64() {
        println!(
            "redis commands/s {:.0} (PUBLISH {:.0})  publish pipelines/s {:.1}",
            commands,
            r["redis_publish_per_s"].as_f64().unwrap_or(0.0),
            r["publish_pipelines_per_s"].as_f64().unwrap_or(0.0)
        );
    }
    match r["server_cpu_us_per_delivery"].as_f64() {
        Some(us) => println!(
            "server CPU {:.2} s  = {:.2} µs per delivery",
            r["server_cpu_s"].as_f64().unwrap_or(0.0),
            us
        ),
        None => println!("server CPU: pass --pid PID for each server process"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_room_has_subscribers_on_every_node() {
        for (sockets, rooms, per) in [(2000, 20, 1), (500, 200, 20)] {
            let plan = Plan {
                sockets,
                rooms,
                rooms_per_socket: per,
                publishers: 4,
                rate: 1.0,
                payload: 10,
            };
            let mut seen = vec![[false; 2]; rooms];
            for s in 0..sockets {
                for r in plan.rooms_of(s) {
                    seen[r][node_of(s, 2)] = true;
                }
            }
            assert!(
                seen.iter().all(|n| n[0] && n[1]),
                "{sockets} sockets x {rooms} rooms"
            );
        }
    }
}
