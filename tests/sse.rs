//! Server-Sent Events (`GET /sse`), read by curl: the frames a socket gets as events,
//! resumable ids for durable rooms, a token's permissions, and a socket's limits.

mod common;

use std::net::SocketAddr;

use common::sse::{Curl, SseEvent};
use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use volley::config::RoomClass;
use volley::Config;

/// `scores*` and `quotes*` keep 100 messages, `short*` two; everything else is plain.
fn durable(c: &mut Config) {
    let class = |pattern: &str, history_size| RoomClass {
        pattern: pattern.into(),
        history_size,
        history_ttl_s: 3600,
        ..Default::default()
    };
    c.rooms = vec![
        class("scores*", 100),
        class("quotes*", 100),
        class("short*", 2),
    ];
}

fn url(addr: SocketAddr, query: &str) -> String {
    format!("http://{addr}/sse?{query}")
}

async fn publish(addr: SocketAddr, room: &str, n: u64) {
    let (status, answer) = api_publish(addr, &json!({"roomId":room,"content":{"n":n}})).await;
    assert_eq!(status, 200, "{answer}");
}

/// Events until both joins of a fresh stream on `rooms` were answered, by room: the
/// durable rooms' (empty) histories, with the positions they give.
async fn opened(stream: &mut Curl, rooms: &[&str]) -> Vec<SseEvent> {
    let mut seen = Vec::new();
    let mut joined = 0;
    while joined < rooms.len() {
        let event = stream.next().await.expect("the stream ended");
        if event.event == "user_joined" {
            joined += 1;
        }
        seen.push(event);
    }
    seen
}

#[tokio::test]
async fn a_stream_carries_the_frames_a_socket_gets_as_events_with_ids_for_durable_rooms() {
    let server = start(durable).await;
    let addr = server.local_addr();
    let mut socket = Client::connect(addr).await;
    socket.join("scores").await;
    socket.join("lobby").await;
    let mut stream = Curl::open(&url(addr, "rooms=scores,lobby"), &[]).await;
    let first = opened(&mut stream, &["scores", "lobby"]).await;
    let history = first
        .iter()
        .find(|e| e.event == "history")
        .expect("a history");
    assert_eq!(
        history.data,
        json!({"type":"history","roomId":"scores","epoch":"","offset":0,"messages":[]})
    );
    assert_eq!(history.id.as_deref(), Some("scores::0"));
    assert!(
        first
            .iter()
            .all(|e| e.event != "user_joined" || e.id.is_none()),
        "a plain notice moves no position: {first:?}"
    );
    // The socket hears the stream's joins, as any member's.
    for _ in 0..2 {
        socket.expect_type("user_joined").await;
    }
    for n in 1..=3 {
        publish(addr, "scores", n).await;
        publish(addr, "lobby", n).await;
    }
    let mut events = Vec::new();
    let mut from_stream = Vec::new();
    while from_stream.len() < 6 {
        let event = stream.next().await.expect("the stream ended");
        from_stream.extend(event.messages());
        events.push(event);
    }
    let mut from_socket = Vec::new();
    while from_socket.len() < 6 {
        let frame = socket.next_frame().await;
        from_socket.extend(
            frame_messages(&frame)
                .into_iter()
                .filter(|m| m["type"] == "message"),
        );
    }
    // The same JSON, frame for frame (a socket's window may batch what a stream sends
    // as one event each), in each room's order.
    for room in ["scores", "lobby"] {
        let of = |ms: &[Value]| -> Vec<Value> {
            ms.iter().filter(|m| m["roomId"] == room).cloned().collect()
        };
        assert_eq!(of(&from_stream), of(&from_socket), "{room}");
    }
    let epoch = events
        .iter()
        .flat_map(SseEvent::items)
        .find(|m| m["type"] == "epoch_changed")
        .map(|m| m["epoch"].as_str().unwrap().to_string())
        .expect("the room's first message starts its epoch");
    assert_eq!(stream.last_id, Some(format!("scores:{epoch}:3")));
    for event in &events {
        let durable = event.items().iter().any(|m| m["roomId"] == "scores");
        assert_eq!(event.id.is_some(), durable, "{event:?}");
    }
}

#[tokio::test]
async fn a_stream_resumes_every_durable_room_from_its_last_event_id() {
    let server = start(durable).await;
    let addr = server.local_addr();
    let rooms = "rooms=scores,quotes,short,lobby";
    let mut stream = Curl::open(&url(addr, rooms), &[]).await;
    opened(&mut stream, &["scores", "quotes", "short", "lobby"]).await;
    for n in 1..=2 {
        for room in ["scores", "quotes", "short", "lobby"] {
            publish(addr, room, n).await;
        }
    }
    let mut seen = stream.messages(8).await;
    let last_id = stream.last_id.clone().expect("an id");
    drop(stream);
    // While away: two more scores, three quotes, a lobby message (plain: lost), and
    // more than `short` keeps.
    for n in 3..=4 {
        publish(addr, "scores", n).await;
    }
    for n in 3..=5 {
        publish(addr, "quotes", n).await;
        publish(addr, "short", n).await;
    }
    publish(addr, "lobby", 3).await;
    let mut again = Curl::open(&url(addr, rooms), &[("Last-Event-ID", &last_id)]).await;
    let resumed = opened(&mut again, &["scores", "quotes", "short", "lobby"]).await;
    let histories: Vec<&SseEvent> = resumed.iter().filter(|e| e.event == "history").collect();
    let recovered = |room: &str| {
        let h = histories
            .iter()
            .find(|h| h.data["roomId"] == room)
            .expect(room);
        h.data["recovered"].clone()
    };
    assert_eq!(recovered("scores"), json!(true));
    assert_eq!(recovered("quotes"), json!(true));
    // `short` kept only its last two: the stream is told it could not be served whole.
    assert_eq!(recovered("short"), json!(false));
    seen.extend(resumed.iter().flat_map(SseEvent::messages));
    for room in ["scores", "quotes"] {
        publish(addr, room, 9).await;
    }
    seen.extend(again.messages(2).await);
    let offsets = |room: &str| -> Vec<u64> {
        seen.iter()
            .filter(|m| m["roomId"] == room)
            .map(|m| m["offset"].as_u64().unwrap())
            .collect()
    };
    // Nothing missed, nothing twice, in order, live after the replay.
    assert_eq!(offsets("scores"), [1, 2, 3, 4, 5]);
    assert_eq!(offsets("quotes"), [1, 2, 3, 4, 5, 6]);
    assert_eq!(offsets("short"), [1, 2, 4, 5]);
    // The same resume from `?lastEventId=` (for clients that cannot set headers).
    let query = format!(
        "rooms=scores&lastEventId={}",
        percent_encoding::utf8_percent_encode(&last_id, percent_encoding::NON_ALPHANUMERIC)
    );
    let mut third = Curl::open(&url(addr, &query), &[]).await;
    let history = third.next_of("history").await;
    assert_eq!(history.data["recovered"], json!(true));
    assert_eq!(offsets_of(&history.messages()), [3, 4, 5]);
}

fn offsets_of(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect()
}

const SECRET: &str = "test-secret-with-enough-bytes-for-hs256";

fn token(claims: Value) -> String {
    let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
}

async fn refused(addr: SocketAddr, query: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let (status, body) = http(addr, "GET", &format!("/sse?{query}"), headers, b"").await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_stream_has_the_permissions_of_its_token() {
    let server = start(|c| {
        c.auth.jwt_secret = SECRET.into();
        c.auth.required = true;
    })
    .await;
    let addr = server.local_addr();
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let fan = token(json!({"sub":"ann","exp":exp,"rooms":["scores:*"]}));
    let (status, body) = refused(addr, "rooms=scores:1", &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthenticated")),
        "{body}"
    );
    let (status, body) = refused(addr, "rooms=scores:1&token=forged", &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token")),
        "{body}"
    );
    let (status, body) = refused(addr, &format!("rooms=scores:1,lobby&token={fan}"), &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("lobby"),
        "{body}"
    );
    let (status, _) = refused(addr, "rooms=scores:1", &[("Authorization", "apikey wrong")]).await;
    assert_eq!(status, 401);
    // Allowed, by query and by header: identified, in the room, hearing it.
    let mut by_query = Curl::open(&url(addr, &format!("rooms=scores:1&token={fan}")), &[]).await;
    let bearer = format!("Bearer {fan}");
    let mut by_header =
        Curl::open(&url(addr, "rooms=scores:1"), &[("Authorization", &bearer)]).await;
    for stream in [&mut by_query, &mut by_header] {
        let hello = stream.next_of("authenticated").await;
        assert_eq!(hello.data, json!({"type":"authenticated","userId":"ann"}));
        stream.next_of("user_joined").await;
    }
    publish(addr, "scores:1", 7).await;
    for stream in [&mut by_query, &mut by_header] {
        assert_eq!(stream.messages(1).await[0]["content"], json!({"n":7}));
    }
}

#[tokio::test]
async fn a_stream_keeps_a_sockets_limits() {
    let server = start(|c| {
        c.limits.max_connections_per_ip = 1;
        c.limits.max_rooms_per_socket = 2;
    })
    .await;
    let addr = server.local_addr();
    let (status, body) = refused(addr, "rooms=a,b,c", &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("too_many_rooms")),
        "{body}"
    );
    let (status, body) = refused(addr, "history=2", &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("missing_field")),
        "{body}"
    );
    let mut first = Curl::open(&url(addr, "rooms=a"), &[]).await;
    first.next_of("user_joined").await;
    let (status, body) = refused(addr, "rooms=b", &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("too_many_connections_from_ip")),
        "{body}"
    );
    // A WebSocket from the same address counts as well.
    let (status, _) = http(
        addr,
        "GET",
        "/",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
        b"",
    )
    .await;
    assert_eq!(status, 429);
    // The stream gone, its place is free again.
    drop(first);
    wait_for_metric(addr, "volley_connections", 0).await;
    let mut again = Curl::open(&url(addr, "rooms=b"), &[]).await;
    again.next_of("user_joined").await;
}

/// Waits until a gauge reads `want`.
async fn wait_for_metric(addr: SocketAddr, name: &str, want: u64) {
    wait_metric(addr, name, |v| v == want).await
}

/// A stream whose reader takes nothing: a raw request and a tiny receive buffer.
async fn unread_stream(addr: SocketAddr, query: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let request = format!("GET /sse?{query} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

#[tokio::test]
async fn a_stream_that_is_not_read_is_closed_as_a_slow_consumer_and_nobody_else_waits() {
    let server = start(|c| {
        c.limits.max_outbox_bytes = 256 * 1024;
        c.limits.publish_rate = 0;
    })
    .await;
    let addr = server.local_addr();
    let mut reader = Client::connect(addr).await;
    reader.join("flood").await;
    let _stalled = unread_stream(addr, "rooms=flood").await;
    wait_for_metric(addr, "volley_connections", 2).await;
    // More than loopback's buffers take (megabytes), and the stream's, and the bound.
    let text = "x".repeat(32 * 1024);
    let mut got = 0;
    for n in 0..300u64 {
        let body = json!({"roomId":"flood","content":{"n":n,"text":text}});
        assert_eq!(api_publish(addr, &body).await.0, 200);
        // The socket reader keeps up with everything (read as it comes).
        while let Ok(frame) =
            tokio::time::timeout(std::time::Duration::from_millis(1), reader.next_frame()).await
        {
            got += messages_in(&frame);
        }
    }
    while got < 300 {
        got += messages_in(&reader.next_frame().await);
    }
    assert_eq!(got, 300);
    wait_for_metric(addr, "volley_connections", 1).await;
    assert!(metric(addr, "volley_slow_consumers_closed_total").await >= 1);
}

fn messages_in(frame: &str) -> usize {
    let items = frame_messages(frame);
    items.iter().filter(|m| m["type"] == "message").count()
}

#[tokio::test]
async fn a_stream_whose_peer_takes_nothing_is_closed_after_the_idle_timeout() {
    let server = start(|c| {
        c.server.ping_interval_ms = 200;
        c.server.idle_timeout_ms = 1000;
        c.limits.publish_rate = 0;
        c.limits.max_outbox_bytes = 64 * 1024 * 1024;
    })
    .await;
    let addr = server.local_addr();
    let _stalled = unread_stream(addr, "rooms=quiet").await;
    wait_for_metric(addr, "volley_connections", 1).await;
    // Enough to fill the kernel's buffers (loopback takes megabytes) and the stream's,
    // far under the outbox bound: only the idle rule can close it.
    let text = "x".repeat(32 * 1024);
    for n in 0..250u64 {
        let body = json!({"roomId":"quiet","content":{"n":n,"text":text}});
        assert_eq!(api_publish(addr, &body).await.0, 200);
    }
    wait_for_metric(addr, "volley_connections", 0).await;
    assert_eq!(metric(addr, "volley_slow_consumers_closed_total").await, 0);
}

#[tokio::test]
async fn a_stream_ends_when_its_node_drains_and_comments_keep_it_alive_meanwhile() {
    use tokio::io::AsyncBufReadExt;
    let server = start(|c| c.server.ping_interval_ms = 100).await;
    let addr = server.local_addr();
    let mut curl = tokio::process::Command::new("curl")
        .args(["-sN", "--max-time", "30", &url(addr, "rooms=lobby")])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(curl.stdout.take().unwrap()).lines();
    macro_rules! next {
        () => {
            tokio::time::timeout(WAIT, lines.next_line())
                .await
                .expect("a line in time")
                .unwrap()
        };
    }
    assert_eq!(next!().as_deref(), Some("retry: 1000"));
    // Three comments on the ping interval, then the drain ends the stream.
    let mut pings = 0;
    while pings < 3 {
        if next!().as_deref() == Some(": ping") {
            pings += 1;
        }
    }
    let report = server.shutdown().await;
    assert!(report.drained, "{report:?}");
    while next!().is_some() {}
    let status = tokio::time::timeout(WAIT, curl.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "the body ended properly: {status}");
}
