//! Hostile and careless clients: floods that never read, connections that never finish a
//! request, frames RFC 6455 forbids. Each gets a clear answer and a bounded cost, and the
//! node keeps serving everyone else.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn a_ping_flood_that_never_reads_is_closed_as_a_slow_consumer() {
    let server = start(|c| c.limits.max_outbox_bytes = 64 * 1024 + 1024).await;
    let addr = server.local_addr();
    let mut bystander = Client::connect(addr).await;
    bystander.join("calm").await;

    // Pings as fast as the node reads them; the pongs are never read.
    let mut flood = RawWs::connect_with(addr, Some(4096)).await;
    let burst: Vec<u8> = RawWs::frame(0x9, &[b'p'; 125], true).repeat(512);
    let mut sent = 0usize;
    let closed = loop {
        let wrote = tokio::time::timeout(WAIT, flood.stream.write_all(&burst)).await;
        if !matches!(wrote, Ok(Ok(()))) {
            // The node hung up: it must have said why first (checked below).
            break health(addr).await["slow_consumers_closed"] == 1;
        }
        sent += 512;
        if sent.is_multiple_of(512 * 16) && health(addr).await["slow_consumers_closed"] == 1 {
            break true;
        }
        // 2 million pings, 250 MB of pongs owed: far past any bound.
        if sent >= 2_000_000 {
            break false;
        }
    };
    assert!(closed, "the flood was never closed after {sent} pings");
    // The pongs the node owed were dropped; the last frame is close 1008.
    assert_eq!(
        flood.expect_close().await,
        (1008, "slow consumer".to_string())
    );
    bystander
        .send(json!({"type":"message","roomId":"calm","content":"unaffected"}))
        .await;
    assert_eq!(bystander.next_room_message().await["content"], "unaffected");
}

#[tokio::test]
async fn unmasked_client_frames_are_closed_with_1002() {
    let server = start(|_| {}).await;
    let mut raw = RawWs::connect(server.local_addr()).await;
    raw.send(&RawWs::frame(
        0x1,
        br#"{"type":"join","roomId":"r"}"#,
        false,
    ))
    .await;
    assert_eq!(
        raw.expect_close().await,
        (1002, "client frames must be masked".to_string())
    );
}

#[tokio::test]
async fn oversized_control_frames_are_closed_with_1002_and_never_echoed() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let mut raw = RawWs::connect(addr).await;
    raw.send(&RawWs::frame(0xA, &[b'x'; 300], true)).await;
    assert_eq!(
        raw.expect_close().await,
        (1002, "control frame payload over 125 bytes".to_string())
    );

    let mut raw = RawWs::connect(addr).await;
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend_from_slice(&[b'r'; 200]);
    raw.send(&RawWs::frame(0x8, &close, true)).await;
    let (code, reason) = raw.expect_close().await;
    assert_eq!(code, 1002, "the 202-byte close was not echoed: {reason}");

    // A well-formed ping is still answered with its payload.
    let mut raw = RawWs::connect(addr).await;
    raw.send(&RawWs::frame(0x9, b"are you there", true)).await;
    assert_eq!(
        raw.read_frame().await,
        Some((0xA, b"are you there".to_vec()))
    );
}

#[tokio::test]
async fn only_a_get_becomes_a_websocket() {
    let server = start(|_| {}).await;
    let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let body = br#"{"roomId":"r","content":1}"#;
    let request = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: apikey test-key\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let answer = String::from_utf8(expect_hangup(&mut stream).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""ok":true"#), "{answer}");
}

/// A node with short HTTP timeouts, so the tests that wait for them are quick.
async fn impatient() -> volley::Server {
    start(|c| {
        c.server.header_timeout_ms = 300;
        c.server.body_timeout_ms = 300;
    })
    .await
}

#[tokio::test]
async fn a_connection_that_never_sends_a_request_is_closed() {
    let server = impatient().await;
    let mut silent = TcpStream::connect(server.local_addr()).await.unwrap();
    expect_hangup(&mut silent).await;

    let mut partial = TcpStream::connect(server.local_addr()).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow")
        .await
        .unwrap();
    expect_hangup(&mut partial).await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let server = impatient().await;
    let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // The answer comes, then the connection waits for a next request that never comes.
    let seen = expect_hangup(&mut stream).await;
    assert!(seen.starts_with(b"HTTP/1.1 200"));
}

#[tokio::test]
async fn a_body_that_never_arrives_gets_408_and_a_huge_one_413_at_once() {
    let server = impatient().await;
    let addr = server.local_addr();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey test-key\r\n\
          Content-Length: 100\r\n\r\n{\"roomId\":",
    )
    .await
    .unwrap();
    let answer = String::from_utf8(expect_hangup(&mut slow).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""error":"timeout""#), "{answer}");

    let mut huge = TcpStream::connect(addr).await.unwrap();
    huge.write_all(
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey test-key\r\n\
          Connection: close\r\nContent-Length: 999999999999\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = vec![0u8; 12];
    tokio::time::timeout(Duration::from_millis(200), huge.read_exact(&mut answer))
        .await
        .expect("413 comes before any body timeout")
        .unwrap();
    assert_eq!(&answer, b"HTTP/1.1 413");
}

#[tokio::test]
async fn head_requests_and_malformed_bodies_get_proper_answers() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = String::from_utf8(expect_hangup(&mut stream).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n"), "no body: {answer}");

    let mut chunked = TcpStream::connect(addr).await.unwrap();
    chunked
        .write_all(
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey test-key\r\n\
              Connection: close\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot hex\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = String::from_utf8(expect_hangup(&mut chunked).await).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    // The auth scheme is case-insensitive.
    let (status, body) = http(
        addr,
        "POST",
        "/api/publish",
        &[("Authorization", "ApiKey test-key")],
        br#"{"roomId":"r","content":1}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
}
