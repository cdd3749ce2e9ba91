//! Test harness: real nodes on 127.0.0.1 ports of their own, real WebSocket clients.
//!
//! Every wait has a generous timeout and waits for a frame or a signal, never a fixed sleep.

#![allow(dead_code)]

pub mod boards;
pub mod engines;
pub mod process;
pub mod sse;
pub mod topologies;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use volley::broker::Broker;
use volley::{Config, Server};

/// Long enough for a loaded 2-core machine; only reached when something is broken.
pub const WAIT: Duration = Duration::from_secs(15);

pub fn config() -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.node_id = "test-node".into();
    config.api.key = "test-key".into();
    config
}

pub async fn start(tweak: impl FnOnce(&mut Config)) -> Server {
    // TEST_LOG=volley=debug shows the nodes' logs when a test needs explaining.
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    let mut config = config();
    tweak(&mut config);
    Server::bind(config).await.expect("bind test server")
}

pub async fn start_with_broker(tweak: impl FnOnce(&mut Config), broker: Arc<dyn Broker>) -> Server {
    let mut config = config();
    tweak(&mut config);
    Server::bind_with_broker(config, broker)
        .await
        .expect("bind test server")
}

/// What a client saw next.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One text frame, as received (a `batch` frame is one frame).
    Frame(String),
    Close(u16, String),
    /// The connection ended without a close frame.
    Ended,
}

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Messages already taken out of batch frames, not yet returned.
    pending: VecDeque<Value>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Self::connect_path(addr, "/ws").await
    }

    pub async fn connect_path(addr: SocketAddr, path: &str) -> Client {
        let url = format!("ws://{addr}{path}");
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .expect("connect");
        Client {
            ws,
            pending: VecDeque::new(),
        }
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_binary(&mut self, bytes: &[u8]) {
        self.ws
            .send(Message::binary(bytes.to_vec()))
            .await
            .expect("send");
    }

    /// Queues several text frames and sends them with one flush.
    pub async fn send_burst(&mut self, frames: &[Value]) {
        for frame in frames {
            self.ws
                .feed(Message::text(frame.to_string()))
                .await
                .expect("feed");
        }
        self.ws.flush().await.expect("flush");
    }

    /// The next frame or close, as the wire carried it.
    pub async fn next_event(&mut self) -> Event {
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a frame");
            match next {
                Some(Ok(Message::Text(text))) => return Event::Frame(text.to_string()),
                Some(Ok(Message::Close(frame))) => {
                    return match frame {
                        Some(f) => Event::Close(u16::from(f.code), f.reason.to_string()),
                        None => Event::Close(1005, String::new()),
                    }
                }
                Some(Ok(Message::Binary(_))) => panic!("server sent a binary frame"),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Event::Ended,
            }
        }
    }

    /// The next text frame as raw text; panics on a close.
    pub async fn next_frame(&mut self) -> String {
        assert!(
            self.pending.is_empty(),
            "messages of a batch frame are still pending"
        );
        match self.next_event().await {
            Event::Frame(text) => text,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// The next message, taking batch frames apart.
    pub async fn next_message(&mut self) -> Value {
        loop {
            if let Some(m) = self.pending.pop_front() {
                return m;
            }
            let text = match self.next_event().await {
                Event::Frame(text) => text,
                other => panic!("expected a message, got {other:?}"),
            };
            let value: Value = serde_json::from_str(&text).expect("server sent invalid JSON");
            if value["type"] == "batch" {
                let messages = value["messages"]
                    .as_array()
                    .expect("batch without messages");
                assert!(
                    messages.len() >= 2,
                    "a batch frame carries two or more messages"
                );
                self.pending.extend(messages.iter().cloned());
            } else {
                self.pending.push_back(value);
            }
        }
    }

    /// The next message, which must have this `type`.
    pub async fn expect_type(&mut self, ty: &str) -> Value {
        let m = self.next_message().await;
        assert_eq!(m["type"], ty, "unexpected message {m}");
        m
    }

    /// The next `message` frame, skipping membership notices (`user_joined`, `user_left`)
    /// and a durable room's `epoch_changed`.
    pub async fn next_room_message(&mut self) -> Value {
        loop {
            let m = self.next_message().await;
            match m["type"].as_str() {
                Some("user_joined") | Some("user_left") | Some("epoch_changed") => continue,
                Some("message") => return m,
                _ => panic!("unexpected {m}"),
            }
        }
    }

    /// The next `message` frame of a durable room, skipping notices; an `epoch_changed`
    /// on the way sets `epoch` (a client resumes from there), as `/volley.js` does.
    pub async fn next_durable_message(&mut self, epoch: &mut String) -> Value {
        loop {
            let m = self.next_message().await;
            match m["type"].as_str() {
                Some("user_joined") | Some("user_left") => continue,
                Some("epoch_changed") => {
                    *epoch = m["epoch"].as_str().expect("an epoch").to_string();
                }
                Some("message") => return m,
                _ => panic!("unexpected {m}"),
            }
        }
    }

    /// The next message must be an error with this code.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let m = self.expect_type("error").await;
        assert_eq!(m["code"], code, "unexpected error {m}");
        assert!(m["message"].as_str().is_some_and(|s| !s.is_empty()));
        m
    }

    /// Joins a room and waits for its own `user_joined` notice.
    pub async fn join(&mut self, room: &str) {
        self.send(serde_json::json!({"type":"join","roomId":room}))
            .await;
        loop {
            let m = self.next_message().await;
            if m["type"] == "user_joined" && m["roomId"] == room {
                return;
            }
        }
    }

    /// Reads until a close frame; returns its code and reason.
    pub async fn expect_close(&mut self) -> (u16, String) {
        self.pending.clear();
        loop {
            match self.next_event().await {
                Event::Close(code, reason) => {
                    // Polling on sends the close reply and lets the server finish the handshake.
                    let _ = tokio::time::timeout(WAIT, self.ws.next()).await;
                    return (code, reason);
                }
                Event::Frame(_) => continue,
                Event::Ended => panic!("connection ended without a close frame"),
            }
        }
    }
}

/// A minimal HTTP/1.1 exchange: returns status and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("http timed out")
        .expect("read");
    parse_response(&response)
}

/// An HTTP/1.1 response's status and body.
pub fn parse_response(response: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(response).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A counter or gauge from the node's `/metrics`, as a whole number.
pub async fn metric(addr: SocketAddr, name: &str) -> u64 {
    let metrics = http(addr, "GET", "/metrics", &[], b"").await.1;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
}

/// Waits until a metric of the node's `/metrics` satisfies `want`.
pub async fn wait_metric(addr: SocketAddr, name: &str, want: impl Fn(u64) -> bool) {
    let waited = tokio::time::timeout(WAIT, async {
        while !want(metric(addr, name).await) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "{name} never read what the test waits for");
}

/// The messages a text frame carries: a `batch` taken apart, else the frame itself.
pub fn frame_messages(frame: &str) -> Vec<Value> {
    let frame: Value = serde_json::from_str(frame).expect("a JSON frame");
    match frame["type"].as_str() {
        Some("batch") => frame["messages"].as_array().expect("messages").clone(),
        _ => vec![frame],
    }
}

/// `POST /api/publish` with the test key.
pub async fn api_publish(addr: SocketAddr, body: &Value) -> (u16, Value) {
    let (status, text) = http(
        addr,
        "POST",
        "/api/publish",
        &[
            ("Authorization", "apikey test-key"),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
    .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

pub async fn health(addr: SocketAddr) -> Value {
    let (status, text) = http(addr, "GET", "/healthz", &[], b"").await;
    assert_eq!(status, 200);
    serde_json::from_str(&text).expect("healthz JSON")
}

/// A message frame with its timestamp checked and removed, for exact comparison.
pub fn without_timestamp(mut m: Value) -> Value {
    let ts = m["timestamp"].as_u64().expect("timestamp in ms");
    assert!(
        ts > 1_600_000_000_000,
        "timestamp looks like ms since the epoch"
    );
    m.as_object_mut().unwrap().remove("timestamp");
    m
}

/// A real `redis-server` on a 127.0.0.1 port of its own, stopped when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port).await
    }

    /// Starts (again) on a given port, with nothing persisted.
    pub async fn start_on(port: u16) -> RedisServer {
        Self::start_with(port, &[]).await
    }

    /// Starts on `port` with extra arguments (`--replicaof HOST PORT`, ...).
    pub async fn start_with(port: u16, extra: &[&str]) -> RedisServer {
        // A directory of its own: a replica writes the master's snapshot to its working
        // directory, and any redis-server loads a dump.rdb it finds there at start.
        let dir = std::env::temp_dir().join(format!("volley-redis-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut server = RedisServer {
            port,
            child: None,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn().await;
        server
    }

    /// Starts a killed server again on its port, its directory kept (a cluster node
    /// keeps its `nodes.conf`, so it rejoins its cluster).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    async fn spawn(&mut self) {
        let (port, dir) = (self.port, &self.dir);
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                // Tests stall Redis with DEBUG SLEEP.
                "--enable-debug-command",
                "yes",
            ])
            .arg("--dir")
            .arg(dir)
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (bash tests/run.sh installs it)");
        self.child = Some(child);
        let server = &*self;
        // Ready when it answers PING.
        tokio::time::timeout(WAIT, async {
            loop {
                if let Ok(mut conn) = server.client().get_multiplexed_async_connection().await {
                    if redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .is_ok()
                    {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("redis-server did not start");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }

    /// Stalls the server with `DEBUG SLEEP secs` from a connection of its own; the handle
    /// finishes when Redis answers again, so `is_finished()` says whether it still sleeps.
    pub async fn stall(&self, secs: u64) -> tokio::task::JoinHandle<()> {
        // The default reply timeout (500 ms) would end the wait long before Redis wakes.
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let mut conn = self
            .client()
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .expect("connect to test redis");
        let handle = tokio::spawn(async move {
            let answer = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(secs)
                .query_async::<()>(&mut conn)
                .await;
            assert!(answer.is_ok(), "DEBUG SLEEP failed: {answer:?}");
        });
        // Asleep once a PING from another connection goes unanswered: the caller's next
        // step meets a stalled Redis, not one about to stall.
        let asleep = tokio::time::timeout(WAIT, async {
            loop {
                let answered = tokio::time::timeout(Duration::from_millis(100), async {
                    let mut conn = self.conn().await;
                    redis::cmd("PING").query_async::<String>(&mut conn).await
                })
                .await;
                if answered.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(asleep.is_ok(), "Redis never went to sleep");
        handle
    }

    /// Kills the server process (SIGKILL: no goodbye to its clients) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Subscribers Redis counts on a channel.
    pub async fn numsub(&self, channel: &str) -> i64 {
        let mut conn = self.conn().await;
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut conn)
            .await
            .unwrap();
        counts[0].1
    }

    /// Kills every pub/sub connection (`CLIENT KILL TYPE pubsub`); returns how many.
    pub async fn kill_pubsub_clients(&self) -> i64 {
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut self.conn().await)
            .await
            .expect("CLIENT KILL TYPE pubsub")
    }

    /// Waits until the command `args` (one that answers a number: `XLEN k`, `EXISTS k`)
    /// answers `want`.
    pub async fn wait_answer(&self, args: &[&str], want: u64) {
        let waited = tokio::time::timeout(WAIT, async {
            let mut conn = self.conn().await;
            loop {
                let mut cmd = redis::cmd(args[0]);
                cmd.arg(&args[1..]);
                let n: u64 = cmd.query_async(&mut conn).await.unwrap();
                if n == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "{args:?} never answered {want}");
    }

    /// Waits until this replica's link to its master is up (it has synced).
    pub async fn wait_replica_synced(&self) {
        let synced = tokio::time::timeout(WAIT, async {
            let mut conn = self.conn().await;
            loop {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                if info.contains("master_link_status:up") {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(synced.is_ok(), "the replica on {} never synced", self.port);
    }

    /// Waits until `channel` has exactly `n` subscribers.
    pub async fn wait_numsub(&self, channel: &str, n: i64) {
        let waited = tokio::time::timeout(WAIT, async {
            while self.numsub(channel).await != n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "{channel} never had {n} subscribers (has {})",
            self.numsub(channel).await
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls an HTTP status until it is `want` (bounded by WAIT).
pub async fn wait_status(addr: SocketAddr, path: &str, want: u16) {
    let waited = tokio::time::timeout(WAIT, async {
        while http(addr, "GET", path, &[], b"").await.0 != want {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "{path} never answered {want}");
}

/// A node on the given Redis, with quick probes so recovery is seen fast.
pub async fn start_on_redis(
    redis: &RedisServer,
    node_id: &str,
    tweak: impl FnOnce(&mut Config),
) -> Server {
    let url = redis.url();
    let id = node_id.to_string();
    start(move |c| {
        c.redis.url = url;
        c.server.node_id = id;
        c.redis.probe_interval_ms = 100;
        tweak(c);
    })
    .await
}

/// A WebSocket client written byte by byte, for what a polite client never sends:
/// unmasked frames, oversized control frames, floods without reading.
pub struct RawWs {
    pub stream: TcpStream,
}

impl RawWs {
    pub async fn connect(addr: SocketAddr) -> RawWs {
        Self::connect_with(addr, None).await
    }

    /// Connects with a small receive buffer, so a client that never reads fills up fast.
    pub async fn connect_with(addr: SocketAddr, recv_buffer: Option<u32>) -> RawWs {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let mut stream = socket.connect(addr).await.expect("connect");
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tokio::time::timeout(WAIT, stream.read_exact(&mut byte))
                .await
                .expect("handshake timed out")
                .expect("handshake");
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        RawWs { stream }
    }

    /// One final frame; masked with a fixed key when `masked`.
    pub fn frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mut out = vec![0x80 | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(mask_bit | n as u8),
            n if n <= u16::MAX as usize => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            let key = [0x12, 0x34, 0x56, 0x78];
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            out.extend_from_slice(payload);
        }
        out
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// The next frame as (opcode, payload); `None` once the connection ends.
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        tokio::time::timeout(WAIT, async {
            let mut head = [0u8; 2];
            self.stream.read_exact(&mut head).await.ok()?;
            let len = match head[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    self.stream.read_exact(&mut b).await.ok()?;
                    u16::from_be_bytes(b) as usize
                }
                127 => {
                    let mut b = [0u8; 8];
                    self.stream.read_exact(&mut b).await.ok()?;
                    u64::from_be_bytes(b) as usize
                }
                n => n as usize,
            };
            let mut payload = vec![0u8; len];
            self.stream.read_exact(&mut payload).await.ok()?;
            Some((head[0] & 0x0f, payload))
        })
        .await
        .expect("timed out waiting for a frame")
    }

    /// Reads until a close frame; returns its code and reason.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            match self.read_frame().await {
                Some((0x8, payload)) => {
                    assert!(payload.len() >= 2, "close without a code");
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    return (code, String::from_utf8_lossy(&payload[2..]).to_string());
                }
                Some(_) => continue,
                None => panic!("connection ended without a close frame"),
            }
        }
    }
}

/// Waits until the connection is closed by the other side (EOF or reset), reading and
/// discarding whatever comes first. Panics after WAIT.
pub async fn expect_hangup(stream: &mut TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the node never closed the connection");
    seen
}

/// Sends a join with a replay (`{"history":N}` or `{"since":{...}}`) and returns the
/// history frame, the first thing back.
pub async fn join_with(client: &mut Client, room: &str, replay: Value) -> Value {
    let mut join = serde_json::json!({"type":"join","roomId":room});
    for (k, v) in replay.as_object().expect("a replay object") {
        join[k] = v.clone();
    }
    client.send(join).await;
    client.expect_type("history").await
}

/// Rooms `scores:*` durable, keeping `size` messages; no publish limit.
pub fn durable(size: usize) -> impl Fn(&mut Config) + Clone {
    move |c: &mut Config| {
        c.limits.publish_rate = 0;
        c.rooms = vec![volley::config::RoomClass {
            pattern: "scores:*".into(),
            history_size: size,
            history_ttl_s: 3600,
            ..Default::default()
        }];
    }
}

/// The offsets of a history frame's messages.
pub fn offsets(messages: &Value) -> Vec<u64> {
    messages
        .as_array()
        .expect("a message list")
        .iter()
        .map(|m| m["offset"].as_u64().expect("an offset"))
        .collect()
}

/// A feed on its own connection: publishes `{"seq":0}` .. `{"seq":count-1}` to `room`,
/// resting `pause` after every tenth, then `"end"`.
pub fn spawn_paced_feed(
    addr: SocketAddr,
    room: &'static str,
    count: u64,
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut publisher = Client::connect(addr).await;
        for seq in 0..count {
            publisher
                .send(serde_json::json!({"type":"message","roomId":room,"content":{"seq":seq}}))
                .await;
            if seq % 10 == 0 {
                tokio::time::sleep(pause).await;
            }
        }
        publisher
            .send(serde_json::json!({"type":"message","roomId":room,"content":"end"}))
            .await;
    })
}

/// Comes back to `room` on `addr` from position `last` of `epoch`: asserts the replay is
/// `recovered` and returns every offset received, replayed then live, up to `"end"`.
pub async fn come_back_until_end(addr: SocketAddr, room: &str, last: u64, epoch: &str) -> Vec<u64> {
    let mut back = Client::connect(addr).await;
    let replay = join_with(
        &mut back,
        room,
        serde_json::json!({"since":{"offset":last,"epoch":epoch}}),
    )
    .await;
    assert_eq!(replay["recovered"], true, "{replay}");
    let mut seen = offsets(&replay["messages"]);
    let replayed = replay["messages"].as_array().expect("a message list");
    if replayed.last().is_some_and(|m| m["content"] == "end") {
        return seen;
    }
    loop {
        let m = back.next_room_message().await;
        seen.push(m["offset"].as_u64().expect("an offset"));
        if m["content"] == "end" {
            return seen;
        }
    }
}

/// One publisher per node sends 30 messages in a burst to a durable `room` that every
/// subscriber is in; every subscriber must see offsets 1..=90 and the same sequence.
pub async fn publish_and_expect_one_order(
    addrs: &[SocketAddr],
    subscribers: &mut [Client],
    room: &str,
) {
    let mut publishers = Vec::new();
    for addr in addrs {
        publishers.push(Client::connect(*addr).await);
    }
    for (p, publisher) in publishers.iter_mut().enumerate() {
        let frames: Vec<Value> = (0..30)
            .map(|seq| serde_json::json!({"type":"message","roomId":room,"content":{"p":p,"seq":seq}}))
            .collect();
        publisher.send_burst(&frames).await;
    }
    let total = 30 * addrs.len();
    let mut sequences = Vec::new();
    for sub in subscribers.iter_mut() {
        let mut seen = Vec::new();
        while seen.len() < total {
            let m = sub.next_room_message().await;
            seen.push((
                m["offset"].as_u64().expect("an offset"),
                m["content"].clone(),
            ));
        }
        let offsets: Vec<u64> = seen.iter().map(|(o, _)| *o).collect();
        assert_eq!(
            offsets,
            (1..=total as u64).collect::<Vec<_>>(),
            "offsets count up by one"
        );
        sequences.push(seen);
    }
    assert!(
        sequences.windows(2).all(|w| w[0] == w[1]),
        "every subscriber saw the same order"
    );
}

/// Until `/api/cluster` on `addr` lists exactly the nodes `ids` (in order), each with a
/// report; returns the listed nodes.
pub async fn cluster_view(addr: SocketAddr, ids: &[&str]) -> Vec<Value> {
    let mut last = String::new();
    let seen = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let (status, body) = http(addr, "GET", "/api/cluster", &[], b"").await;
            assert_eq!(status, 200, "{body}");
            let parsed: Value = serde_json::from_str(&body).unwrap();
            let nodes = parsed["nodes"].as_array().cloned().unwrap_or_default();
            let listed: Vec<&str> = nodes
                .iter()
                .filter_map(|n| n["serverId"].as_str())
                .collect();
            let reported = nodes
                .iter()
                .all(|n| n["history"].as_array().is_some_and(|h| !h.is_empty()));
            if listed == ids && reported {
                return nodes;
            }
            last = body;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    seen.unwrap_or_else(|_| panic!("/api/cluster never listed {ids:?}; last: {last}"))
}
