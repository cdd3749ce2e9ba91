//! Who may hold a socket, and for how long: server pings find peers that vanished, an
//! allowed-origins list keeps other sites' pages out, a per-address limit keeps one
//! client from taking the node's sockets.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A node that pings after 100 ms of silence and gives up after 300 ms.
async fn watchful() -> volley::Server {
    start(|c| {
        c.server.ping_interval_ms = 100;
        c.server.idle_timeout_ms = 300;
    })
    .await
}

#[tokio::test]
async fn a_peer_that_never_answers_pings_is_pinged_then_closed_1001_idle_timeout() {
    let server = watchful().await;
    let addr = server.local_addr();
    let mut dead = RawWs::connect(addr).await;
    let started = Instant::now();
    let mut pings = 0;
    let (code, reason) = loop {
        match dead.read_frame().await {
            Some((0x9, payload)) => {
                assert!(payload.is_empty());
                pings += 1;
            }
            Some((0x8, payload)) => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                break (code, String::from_utf8_lossy(&payload[2..]).to_string());
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!((code, reason.as_str()), (1001, "idle timeout"));
    assert!(pings >= 2, "pinged before closing: {pings}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        started.elapsed()
    );
    // The node let it go.
    tokio::time::timeout(WAIT, async {
        while health(addr).await["connections"] != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the dead socket still counts as connected");
}

#[tokio::test]
async fn a_peer_that_answers_pings_stays_connected() {
    let server = watchful().await;
    let addr = server.local_addr();
    let mut alive = RawWs::connect(addr).await;
    // Answer every ping with a pong for ten idle timeouts.
    let until = Instant::now() + Duration::from_secs(3);
    let mut pings = 0;
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_millis(500), alive.read_frame()).await {
            Ok(Some((0x9, payload))) => {
                pings += 1;
                alive.send(&RawWs::frame(0xA, &payload, true)).await;
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => panic!("no ping for 500 ms"),
        }
    }
    assert!(pings >= 10, "{pings} pings in 3 s");
    // Still served.
    alive
        .send(&RawWs::frame(0x1, br#"{"type":"join","roomId":"r"}"#, true))
        .await;
    loop {
        match alive.read_frame().await {
            Some((0x9, payload)) => alive.send(&RawWs::frame(0xA, &payload, true)).await,
            Some((0x1, text)) => {
                let m: serde_json::Value = serde_json::from_slice(&text).unwrap();
                assert_eq!(m["type"], "user_joined", "{m}");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The status line and body of a WebSocket upgrade with these extra headers.
async fn upgrade_with(addr: std::net::SocketAddr, headers: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, stream.read(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]).to_string();
    let status = text.lines().next().unwrap_or_default().to_string();
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

#[tokio::test]
async fn a_page_from_an_origin_not_allowed_gets_403_and_no_socket() {
    let server = start(|c| {
        c.server.allowed_origins = vec![
            "https://scores.example.com".into(),
            "https://*.example.org".into(),
        ];
    })
    .await;
    let addr = server.local_addr();
    for origin in [
        "https://scores.example.com",
        "HTTPS://Scores.Example.com",
        "https://app.example.org",
    ] {
        let (status, _) = upgrade_with(addr, &format!("Origin: {origin}\r\n")).await;
        assert!(status.starts_with("HTTP/1.1 101"), "{origin}: {status}");
    }
    for origin in [
        "https://evil.example",
        "https://scores.example.com.evil.example",
        "http://scores.example.com",
        "https://example.org",
        "https://evilexample.org",
        "null",
    ] {
        let (status, body) = upgrade_with(addr, &format!("Origin: {origin}\r\n")).await;
        assert!(status.starts_with("HTTP/1.1 403"), "{origin}: {status}");
        let error: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["error"], "forbidden_origin", "{body}");
    }
    // A client that is not a browser sends no Origin.
    let (status, _) = upgrade_with(addr, "").await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
}

#[tokio::test]
async fn one_address_may_hold_only_so_many_sockets() {
    let server = start(|c| c.limits.max_connections_per_ip = 2).await;
    let addr = server.local_addr();
    let first = Client::connect(addr).await;
    let mut second = Client::connect(addr).await;
    let (status, body) = upgrade_with(addr, "").await;
    assert!(status.starts_with("HTTP/1.1 429"), "{status}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"], "too_many_connections_from_ip", "{body}");
    // One leaves: its place is free again.
    drop(first);
    tokio::time::timeout(WAIT, async {
        loop {
            if upgrade_with(addr, "").await.0.starts_with("HTTP/1.1 101") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the place of a closed socket never came back");
    second.join("r").await;
    second
        .send(json!({"type":"message","roomId":"r","content":1}))
        .await;
    assert_eq!(second.next_room_message().await["content"], 1);
}

/// `text` as a masked message in fragments of `size` bytes: a text frame without FIN,
/// continuations, the last with FIN.
fn fragmented(text: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let pieces: Vec<&[u8]> = text.chunks(size).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let mut frame = RawWs::frame(if i == 0 { 0x1 } else { 0x0 }, piece, true);
        if i + 1 < pieces.len() {
            frame[0] &= 0x7f; // not the last: FIN off
        }
        out.extend(frame);
    }
    out
}

#[tokio::test]
async fn a_message_in_thousands_of_fragments_is_reassembled_and_one_too_big_is_closed_1009() {
    let server = start(|c| c.limits.max_frame_bytes = 8 * 1024).await;
    let mut client = RawWs::connect(server.local_addr()).await;
    client
        .send(&RawWs::frame(
            0x1,
            br#"{"type":"join","roomId":"frag"}"#,
            true,
        ))
        .await;
    // 5 000 fragments of one byte: one message.
    let text = format!(
        r#"{{"type":"message","roomId":"frag","content":"{}"}}"#,
        "x".repeat(5_000)
    );
    assert!(text.len() >= 5_000);
    client.send(&fragmented(text.as_bytes(), 1)).await;
    let message = loop {
        let (opcode, payload) = client.read_frame().await.expect("a frame");
        assert_eq!(opcode, 0x1);
        let m: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        if m["type"] == "message" {
            break m;
        }
    };
    assert_eq!(message["content"].as_str().map(str::len), Some(5_000));
    // Fragments adding up past limits.max_frame_bytes: closed 1009, whatever their size.
    let too_big = format!(
        r#"{{"type":"message","roomId":"frag","content":"{}"}}"#,
        "y".repeat(9_000)
    );
    client.send(&fragmented(too_big.as_bytes(), 100)).await;
    assert_eq!(
        client.expect_close().await,
        (1009, "frame too large".to_string())
    );
}

#[tokio::test]
async fn a_wrong_api_key_on_an_upgrade_is_refused_not_taken_as_anonymous() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    for header in [
        "Authorization: apikey not-the-key\r\n",
        "Authorization: ApiKey test-kez\r\n",
    ] {
        let (status, body) = upgrade_with(addr, header).await;
        assert!(status.starts_with("HTTP/1.1 401"), "{header}: {status}");
        let error: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["error"], "unauthorized", "{body}");
        assert!(
            error["message"].as_str().unwrap().contains("api.key"),
            "{body}"
        );
    }
    let (status, _) = upgrade_with(addr, "Authorization: apikey test-key\r\n").await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    // With the API off, no key is the right one.
    let off = start(|c| c.api.key = String::new()).await;
    let (status, _) = upgrade_with(off.local_addr(), "Authorization: apikey x\r\n").await;
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");
}

#[tokio::test]
async fn a_draining_node_answers_readyz_503_until_the_drain_ends() {
    let server = start(|c| c.server.drain_timeout_ms = 30_000).await;
    let addr = server.local_addr();
    wait_status(addr, "/readyz", 200).await;
    // A socket that never reads its close keeps the drain going (for the close grace).
    let silent = RawWs::connect(addr).await;
    let mut polite = Client::connect(addr).await;
    polite.join("r").await;
    let drain = tokio::spawn(server.shutdown());
    assert_eq!(polite.expect_close().await.0, 1001);
    // The listener is still open: the balancer's health check sees the node go unready.
    let (status, body) = http(addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["draining"], true, "{body}");
    assert_eq!(health(addr).await["status"], "draining");
    // New sockets are refused with a reason.
    let (status, body) = upgrade_with(addr, "").await;
    assert!(status.starts_with("HTTP/1.1 503"), "{status}");
    assert!(body.contains("shutting_down"), "{body}");
    assert!(
        !drain.is_finished(),
        "the silent socket should still hold the drain"
    );
    drop(silent);
    let report = tokio::time::timeout(WAIT, drain)
        .await
        .expect("the drain ends once the last socket is gone")
        .unwrap();
    assert!(report.drained);
    // Then the listener is closed.
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting after the drain"
    );
}
