//! permessage-deflate (RFC 7692) with `compression.enabled`: negotiation, compressed
//! client messages inflated under the size limit, server frames compressed once and the
//! same bytes written to every compressing subscriber; plain sockets unaffected. Also a
//! real client not written here: Python's `websockets`, which offers compression by
//! default.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::Stdio;

use common::*;
use flate2::write::DeflateEncoder;
use flate2::Compression;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OFFER: &str = "permessage-deflate; client_max_window_bits";

fn compressing(c: &mut volley::Config) {
    c.compression.enabled = true;
    c.limits.publish_rate = 0;
}

/// Upgrades with `extensions` offered; returns the socket and the response head.
async fn upgrade(addr: SocketAddr, extensions: Option<&str>) -> (RawWs, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let offer = extensions
        .map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.expect("handshake");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (RawWs { stream }, head)
}

/// A masked text frame, its payload deflated on its own (RSV1 set, no sync tail).
fn compressed_text(json: &[u8]) -> Vec<u8> {
    let mut encoder = DeflateEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(json).unwrap();
    encoder.flush().unwrap(); // sync flush: ends with 00 00 ff ff
    let mut body = encoder.get_ref().clone();
    assert!(body.ends_with(&[0, 0, 0xff, 0xff]));
    body.truncate(body.len() - 4);
    let mut frame = RawWs::frame(0x1, &body, true);
    frame[0] |= 0x40;
    frame
}

fn inflate(body: &[u8]) -> Vec<u8> {
    let mut input = body.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::new();
    let mut decoder = flate2::write::DeflateDecoder::new(&mut out);
    decoder.write_all(&input).unwrap();
    decoder.flush().unwrap();
    drop(decoder);
    out
}

/// Reads frames until a text one: (first byte, payload as sent).
async fn next_text(ws: &mut RawWs) -> (u8, Vec<u8>) {
    loop {
        let mut head = [0u8; 2];
        tokio::time::timeout(WAIT, ws.stream.read_exact(&mut head))
            .await
            .expect("timed out")
            .expect("read");
        let len = match head[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                ws.stream.read_exact(&mut b).await.unwrap();
                u16::from_be_bytes(b) as usize
            }
            127 => {
                let mut b = [0u8; 8];
                ws.stream.read_exact(&mut b).await.unwrap();
                u64::from_be_bytes(b) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        ws.stream.read_exact(&mut payload).await.unwrap();
        if head[0] & 0x0f == 0x1 {
            return (head[0], payload);
        }
    }
}

/// The JSON of a text frame, inflated if RSV1 says so.
fn text_of((first, payload): &(u8, Vec<u8>)) -> Value {
    let json = if first & 0x40 != 0 {
        inflate(payload)
    } else {
        payload.clone()
    };
    serde_json::from_slice(&json).expect("JSON")
}

#[tokio::test]
async fn an_offer_is_answered_and_frames_are_compressed_once_for_every_compressing_socket() {
    let server = start(compressing).await;
    let addr = server.local_addr();
    let (mut a, head) = upgrade(addr, Some(OFFER)).await;
    assert!(
        head.to_ascii_lowercase().contains(
            "sec-websocket-extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ),
        "{head}"
    );
    let (mut b, _) = upgrade(addr, Some(OFFER)).await;
    let (mut plain, head) = upgrade(addr, None).await;
    assert!(!head
        .to_ascii_lowercase()
        .contains("sec-websocket-extensions"));
    // Compressed joins; the small notices go uncompressed (under min_bytes).
    for ws in [&mut a, &mut b] {
        ws.send(&compressed_text(br#"{"type":"join","roomId":"news"}"#))
            .await;
    }
    plain
        .send(&RawWs::frame(
            0x1,
            br#"{"type":"join","roomId":"news"}"#,
            true,
        ))
        .await;
    // Each sees the joins from its own on: a three, b two, plain one.
    for (ws, joins) in [(&mut a, 3), (&mut b, 2), (&mut plain, 1)] {
        let mut seen = 0;
        while seen < joins {
            let frame = next_text(ws).await;
            assert_eq!(frame.0 & 0x40, 0, "small frames go plain");
            seen += frame_messages(&text_of(&frame).to_string())
                .iter()
                .filter(|m| m["type"] == "user_joined")
                .count();
        }
    }
    let story = "volley compresses each frame once. ".repeat(100);
    let (status, _) = api_publish(addr, &json!({"roomId": "news", "content": story})).await;
    assert_eq!(status, 200);
    let (fa, fb) = (next_text(&mut a).await, next_text(&mut b).await);
    assert_ne!(fa.0 & 0x40, 0, "RSV1: compressed");
    assert_eq!(fa, fb, "the same compressed bytes for both sockets");
    assert!(fa.1.len() < story.len() / 5, "{} bytes", fa.1.len());
    assert_eq!(text_of(&fa)["content"], story);
    let p = next_text(&mut plain).await;
    assert_eq!(
        p.0 & 0x40,
        0,
        "a socket without the extension gets it plain"
    );
    assert_eq!(text_of(&p)["content"], story);
}

#[tokio::test]
async fn a_compressed_client_message_is_inflated_and_published() {
    let server = start(compressing).await;
    let addr = server.local_addr();
    let mut listener = Client::connect(addr).await;
    listener.join("r").await;
    let (mut ws, _) = upgrade(addr, Some(OFFER)).await;
    let content = "z".repeat(5000);
    let message = json!({"type":"message","roomId":"r","content":content}).to_string();
    ws.send(&compressed_text(message.as_bytes())).await;
    assert_eq!(listener.next_room_message().await["content"], content);
}

#[tokio::test]
async fn a_compressed_message_over_the_limit_closes_1009_and_garbage_closes_1007() {
    let server = start(|c| {
        compressing(c);
        c.limits.max_frame_bytes = 16 * 1024;
    })
    .await;
    let addr = server.local_addr();
    // 1 MB of zeros deflate to about a kilobyte: small on the wire, too big inflated.
    let bomb = json!({"type":"message","roomId":"r","content":"0".repeat(1 << 20)}).to_string();
    let (mut ws, _) = upgrade(addr, Some(OFFER)).await;
    ws.send(&compressed_text(bomb.as_bytes())).await;
    assert_eq!(ws.expect_close().await, (1009, "frame too large".into()));

    let (mut ws, _) = upgrade(addr, Some(OFFER)).await;
    let mut garbage = RawWs::frame(0x1, &[0xff, 0xfe, 0xfd, 0xfc, 0x00, 0x12], true);
    garbage[0] |= 0x40;
    ws.send(&garbage).await;
    assert_eq!(
        ws.expect_close().await,
        (1007, "compressed message does not inflate".into())
    );
    // The node keeps serving.
    assert_eq!(health(addr).await["status"], "ok");
}

#[tokio::test]
async fn without_compression_enabled_an_offer_is_declined_and_rsv1_closes_1002() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let (mut ws, head) = upgrade(addr, Some(OFFER)).await;
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions"),
        "{head}"
    );
    ws.send(&compressed_text(br#"{"type":"join","roomId":"r"}"#))
        .await;
    let (code, _) = ws.expect_close().await;
    assert_eq!(code, 1002);
}

#[tokio::test]
async fn python_websockets_negotiates_deflate_and_reads_compressed_frames() {
    let server = start(compressing).await;
    let addr = server.local_addr();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/deflate_client.py"
    );
    let mut child = tokio::process::Command::new("python3")
        .arg(script)
        .arg(format!("ws://{addr}/ws"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt;
    // First line: the negotiated extensions; then "joined".
    tokio::time::timeout(WAIT, out.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert!(line.contains("permessage-deflate"), "{line}");
    line.clear();
    tokio::time::timeout(WAIT, out.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line.trim(), "joined");
    let story = "Python reads what volley compressed once. ".repeat(50);
    let (status, _) = api_publish(addr, &json!({"roomId": "py", "content": story})).await;
    assert_eq!(status, 200);
    line.clear();
    tokio::time::timeout(WAIT, out.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    let got: Value = serde_json::from_str(line.trim()).expect("the message, as JSON");
    assert_eq!(got["content"], story);
    // It also published a compressed message of its own, which came back to it.
    line.clear();
    tokio::time::timeout(WAIT, out.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    let echo: Value = serde_json::from_str(line.trim()).expect("its own message");
    assert_eq!(echo["content"], "from python ".repeat(100));
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}
