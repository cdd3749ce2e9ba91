//! What the fuzz targets run (`fuzz/`, `cargo +nightly fuzz run TARGET`), one function
//! per parser that reads outside input. The same functions run over the kept inputs in
//! `fuzz/regressions/` as an ordinary test on stable (`tests/fuzz_regressions.rs`), so a
//! crash found once stays found. Not part of the API.
//!
//! Each function must return for any input without panicking, and checks what must hold
//! of what it parsed.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use crate::connection::rules::{FrameRules, Verdict};
use crate::protocol::inbound::{self, ClientFrame, PublishRequest};
use crate::protocol::outbound;

/// A client's text frame, as the session parses it, and its `content` checked as the
/// node checks it.
pub fn client_frame(data: &[u8]) {
    if let Ok(frame) = inbound::parse(data) {
        match frame {
            ClientFrame::Message { room, content, .. } => {
                assert!(!room.is_empty());
                if inbound::check_content(content, "content", 32).is_ok() {
                    // The server frame a checked message becomes is JSON again.
                    let encoded = outbound::room_message(&room, content, 1);
                    let parsed: serde_json::Value =
                        serde_json::from_slice(encoded.json()).expect("a server frame is JSON");
                    assert_eq!(parsed["roomId"], room.as_ref());
                }
            }
            ClientFrame::Broadcast { payload } => {
                let _ = inbound::check_content(payload, "payload", 32);
            }
            _ => {}
        }
    }
}

/// A `POST /api/publish` body.
pub fn publish_body(data: &[u8]) {
    if let Ok(request) = inbound::parse_publish_request(data) {
        let raw = match request {
            PublishRequest::Room { content, .. } => content,
            PublishRequest::Broadcast { payload } => payload,
            PublishRequest::User { content, .. } => content,
        };
        let _ = inbound::check_content(raw, "content", 32);
    }
}

/// An envelope from Redis (any program that can publish may have sent it).
pub fn envelope(data: &[u8]) {
    if let Ok(inbound) = crate::broker::redis::decode(data, 1000) {
        assert!(inbound.payloads.len() <= 1000);
        for payload in inbound.payloads {
            let _ = outbound::offset_of(payload.get().as_bytes());
        }
    }
}

/// A client's byte stream as the reader sees it: the RFC 6455 rules volley adds, then
/// fastwebsockets' frame parser, frame after frame until the stream ends or breaks.
pub fn frame_reader(data: &[u8]) {
    let verdict = Verdict::default();
    let mut rules = FrameRules::new(data, &verdict);
    let mut ws = fastwebsockets::after_handshake_split(
        &mut rules,
        tokio::io::sink(),
        fastwebsockets::Role::Server,
    )
    .0;
    ws.set_max_message_size(64 * 1024 + 1);
    ws.set_auto_pong(false);
    ws.set_auto_close(false);
    let mut returned = 0u64;
    let mut no_obligations =
        |_: fastwebsockets::Frame<'_>| std::future::ready(Ok::<(), std::convert::Infallible>(()));
    loop {
        let Some(frame) = ready_now(ws.read_frame(&mut no_obligations)) else {
            return;
        };
        let Ok(frame) = frame else { return };
        returned += 1;
        assert!(frame.payload.len() <= 64 * 1024);
        // Every frame the parser handed out passed the rules whole (the reader lets the
        // parser go on this count).
        assert!(verdict.frames() >= returned);
    }
}

/// Config from `--set` flags and the reference servers' environment names: one
/// `KEY=VALUE` per line; lines starting with `$NAME=` set an environment variable.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut set = Vec::new();
    let mut env = Vec::new();
    for line in text.lines().take(64) {
        match line.strip_prefix('$').and_then(|l| l.split_once('=')) {
            Some((name, value)) => env.push((name.to_string(), value.to_string())),
            None => set.push(line.to_string()),
        }
    }
    let overrides = crate::config::Overrides {
        set,
        ..Default::default()
    };
    let var = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    if let Ok(config) = crate::config::Config::load_from_env(&overrides, var) {
        // What loads is valid by the same rules the node starts with.
        assert!(config.limits.max_connections >= 1);
        assert!(config.limits.max_frame_bytes >= 1);
    }
}

/// Polls a future that never waits (it reads from memory) to its end; `None` if it would
/// wait.
fn ready_now<F: Future>(future: F) -> Option<F::Output> {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1_000_000 {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return Some(out);
        }
    }
    None
}
