//! One socket's reader: WebSocket frames in, complete messages to the session.
//!
//! fastwebsockets parses frames from the read half only, behind `FrameRules` (the
//! RFC 6455 checks it lacks); the replies owed to the peer (pongs, the close echo) are
//! made here and go to the socket's outbox, so the writer stays the one owner of the
//! write half, and every byte queued for the peer counts against the outbox bound.
//! Fragments are reassembled here, under the same size limit as a single frame, because
//! the library's collector has no limit of its own.
//!
//! Keepalive: a socket that sent nothing for `server.ping_interval_ms` gets a ping, and one
//! that sent nothing at all, not even a pong, for `server.idle_timeout_ms` is closed 1001
//! `idle timeout`. One timer per socket, checked once per interval; an inbound frame only
//! sets a flag.

use std::convert::Infallible;
use std::future::ready;
use std::time::Duration;

use fastwebsockets::{CloseCode, Frame, OpCode, Role, WebSocketError, WebSocketRead};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::rules::{FrameRules, Start, Verdict};
use super::session::Session;
use super::SocketIn;
use crate::deflate::InflateError;
use crate::outbox::{CloseReason, Outbox, CLOSE_GRACE};
use crate::protocol::{close_code, outbound, ErrorCode, ProtocolError};

/// Reads until the socket closes, for whatever reason, and records that reason.
///
/// Once the socket is closing (for any reason), the session ends at once (its rooms left,
/// its user offline here) and the reader keeps reading, discarding messages, until the peer answers with its close
/// frame or hangs up, or `CLOSE_GRACE` passes: closing a socket with unread input would
/// reset it and could destroy our close frame before the peer reads it.
pub async fn run(stream: &mut SocketIn, outbox: &Outbox, session: &mut Session, limits: Limits) {
    match read_frames(stream, outbox, session, limits).await {
        Ended::Clean => {}
        Ended::Close(reason) => {
            outbox.close(reason);
            session.end();
        }
        Ended::Broken(reason) => {
            // The frame stream is unusable; skip raw bytes until the peer hangs up.
            outbox.close(reason);
            session.end();
            drain(stream).await;
        }
    }
}

/// What bounds a socket's reading.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `limits.max_frame_bytes`.
    pub max_bytes: usize,
    /// `server.ping_interval_ms`, if on.
    pub ping_interval: Option<Duration>,
    /// `server.idle_timeout_ms`, if on.
    pub idle_timeout: Option<Duration>,
    /// The socket negotiated permessage-deflate: messages with RSV1 are inflated.
    pub deflate: bool,
}

impl Limits {
    pub fn from_config(config: &crate::config::Config) -> Limits {
        let ms = |ms: u64| Some(Duration::from_millis(ms)).filter(|d| !d.is_zero());
        Limits {
            max_bytes: config.limits.max_frame_bytes,
            ping_interval: ms(config.server.ping_interval_ms),
            idle_timeout: ms(config.server.idle_timeout_ms),
            deflate: false,
        }
    }

    /// How often the keepalive timer looks at the socket.
    fn tick(&self) -> Option<Duration> {
        match (self.ping_interval, self.idle_timeout) {
            (Some(ping), _) => Some(ping),
            (None, Some(idle)) => Some(idle),
            (None, None) => None,
        }
    }
}

enum Ended {
    /// The close handshake finished, or the peer hung up.
    Clean,
    /// The socket must close for this reason; the frame stream is still in sync.
    Close(CloseReason),
    /// The socket must close and the frame stream cannot be read any further.
    Broken(CloseReason),
}

async fn read_frames(
    stream: &mut SocketIn,
    outbox: &Outbox,
    session: &mut Session,
    limits: Limits,
) -> Ended {
    let max_bytes = limits.max_bytes;
    let verdict = Verdict::default();
    let mut rules = FrameRules::new(stream, &verdict).with_deflate(limits.deflate);
    let mut no_obligations = |_: Frame<'_>| ready(Ok::<(), Infallible>(()));
    let mut message = Message::default();
    let mut watch = Watch::new(limits);
    let grace = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(grace);
    let keepalive = tokio::time::sleep(watch.tick.min(Duration::from_secs(86_400 * 365)));
    tokio::pin!(keepalive);
    // Frames the parser has handed out; with the rules' count of whole frames read, it
    // tells when the parser holds nothing more.
    let mut returned = 0u64;
    loop {
        // Idle: no parser and no read buffer until the socket has bytes.
        let readable = tokio::select! {
            readable = rules.get_ref().readable() => readable,
            event = watch.next(session, outbox, grace.as_mut(), keepalive.as_mut()) => {
                match watch.apply(event, session, outbox, grace.as_mut(), keepalive.as_mut()) {
                    Some(end) => return end,
                    None => continue,
                }
            }
        };
        if readable.is_err() {
            return Ended::Clean;
        }
        // A burst: fastwebsockets parses it with a buffer of its own (8 KiB), dropped again
        // once every byte read so far has come out as a frame.
        let mut ws: WebSocketRead<&mut FrameRules<'_, &mut SocketIn>> =
            fastwebsockets::after_handshake_split(&mut rules, tokio::io::sink(), Role::Server).0;
        // The library rejects frames of `max_message_size` bytes or more.
        ws.set_max_message_size(max_bytes + 1);
        // Pongs and the close echo are answered here, after the frame passed the rules, so
        // a frame that breaks them is never echoed.
        ws.set_auto_pong(false);
        ws.set_auto_close(false);
        loop {
            let frame = tokio::select! {
                frame = ws.read_frame(&mut no_obligations) => frame,
                event = watch.next(session, outbox, grace.as_mut(), keepalive.as_mut()) => {
                    match watch.apply(event, session, outbox, grace.as_mut(), keepalive.as_mut()) {
                        Some(end) => return end,
                        None => continue,
                    }
                }
            };
            watch.heard = true;
            if let Some(broken) = verdict.broken() {
                return protocol_close(close_code::PROTOCOL_ERROR, broken.reason());
            }
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) => return close_for(e),
            };
            returned += 1;
            match frame.opcode {
                OpCode::Close => return answer_close(outbox, &frame.payload),
                OpCode::Ping => {
                    outbox.push_control(outbound::control_frame(0xA, &frame.payload));
                }
                OpCode::Pong => {}
                _ if watch.closing => {}
                OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                    if let Err(end) = message.add(&frame, &verdict, session, max_bytes) {
                        return end;
                    }
                }
            }
            if verdict.drained(returned) {
                break;
            }
        }
    }
}

/// A message being put together from its frames: while fragmented, its opcode, its bytes
/// so far, and whether they are compressed (permessage-deflate).
#[derive(Default)]
struct Message {
    fragments: Option<(OpCode, Vec<u8>, bool)>,
}

impl Message {
    /// A data frame (text, binary, continuation): a whole message is delivered to the
    /// session; a broken sequence ends the socket.
    fn add(
        &mut self,
        frame: &Frame<'_>,
        verdict: &Verdict,
        session: &mut Session,
        max_bytes: usize,
    ) -> Result<(), Ended> {
        let fragments = &mut self.fragments;
        match frame.opcode {
            OpCode::Text | OpCode::Binary => {
                if fragments.is_some() {
                    return Err(protocol_close(
                        close_code::PROTOCOL_ERROR,
                        "new message inside a fragmented one",
                    ));
                }
                // With permessage-deflate the rules know how the message began.
                let start = verdict.next_start().unwrap_or(Start {
                    compressed: false,
                    text: frame.opcode == OpCode::Text,
                });
                let opcode = if start.text {
                    OpCode::Text
                } else {
                    OpCode::Binary
                };
                if !frame.fin {
                    *fragments = Some((opcode, frame.payload.to_vec(), start.compressed));
                } else if start.compressed {
                    deliver(
                        session,
                        opcode,
                        &inflated(opcode, &frame.payload, max_bytes)?,
                    );
                } else {
                    deliver(session, opcode, &frame.payload);
                }
            }
            OpCode::Continuation => {
                let Some((_, buf, _)) = fragments.as_mut() else {
                    return Err(protocol_close(
                        close_code::PROTOCOL_ERROR,
                        "continuation without a message",
                    ));
                };
                if buf.len() + frame.payload.len() > max_bytes {
                    return Err(Ended::Broken(too_big()));
                }
                buf.extend_from_slice(&frame.payload);
                if frame.fin {
                    if let Some((opcode, message, compressed)) = fragments.take() {
                        let message = if compressed {
                            inflated(opcode, &message, max_bytes)?
                        } else if opcode == OpCode::Text && std::str::from_utf8(&message).is_err() {
                            return Err(protocol_close(
                                close_code::INVALID_DATA,
                                "text message is not UTF-8",
                            ));
                        } else {
                            message
                        };
                        deliver(session, opcode, &message);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// A compressed message inflated (at most `max_bytes`), and checked as UTF-8 if text.
fn inflated(opcode: OpCode, compressed: &[u8], max_bytes: usize) -> Result<Vec<u8>, Ended> {
    let message = match crate::deflate::inflate(compressed, max_bytes) {
        Ok(message) => message,
        Err(InflateError::TooBig) => return Err(Ended::Close(too_big())),
        Err(InflateError::Corrupt) => {
            return Err(protocol_close(
                close_code::INVALID_DATA,
                "compressed message does not inflate",
            ))
        }
    };
    if opcode == OpCode::Text && std::str::from_utf8(&message).is_err() {
        return Err(protocol_close(
            close_code::INVALID_DATA,
            "text message is not UTF-8",
        ));
    }
    Ok(message)
}

/// What the reader watches besides frames: the session's deadline, the outbox closing,
/// the close grace, and keepalive.
struct Watch {
    limits: Limits,
    tick: Duration,
    closing: bool,
    /// Whether anything came in since the keepalive last looked, and for how long
    /// nothing has.
    heard: bool,
    silent: Duration,
}

enum Event {
    Deadline,
    Closed,
    Grace,
    Keepalive,
}

impl Watch {
    fn new(limits: Limits) -> Watch {
        Watch {
            tick: limits.tick().unwrap_or(Duration::MAX),
            limits,
            closing: false,
            heard: false,
            silent: Duration::ZERO,
        }
    }

    async fn next(
        &self,
        session: &Session,
        outbox: &Outbox,
        grace: std::pin::Pin<&mut tokio::time::Sleep>,
        keepalive: std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> Event {
        let deadline = session.deadline();
        tokio::select! {
            _ = sleep_until_some(deadline), if deadline.is_some() && !self.closing => Event::Deadline,
            _ = outbox.closed(), if !self.closing => Event::Closed,
            _ = grace, if self.closing => Event::Grace,
            _ = keepalive, if !self.closing && self.limits.tick().is_some() => Event::Keepalive,
        }
    }

    /// Acts on an event; `Some` when the reading ends.
    fn apply(
        &mut self,
        event: Event,
        session: &mut Session,
        outbox: &Outbox,
        grace: std::pin::Pin<&mut tokio::time::Sleep>,
        keepalive: std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> Option<Ended> {
        match event {
            Event::Deadline => (!session.on_deadline())
                .then(|| protocol_close(close_code::POLICY, "token expired")),
            Event::Closed => {
                self.closing = true;
                // A peer that never answers the close keeps the socket for the grace;
                // its rooms and its user are done with now.
                session.end();
                grace.reset(tokio::time::Instant::now() + CLOSE_GRACE);
                None
            }
            Event::Grace => Some(Ended::Clean),
            Event::Keepalive => {
                if self.heard {
                    self.heard = false;
                    self.silent = Duration::ZERO;
                } else {
                    self.silent += self.tick;
                    if self
                        .limits
                        .idle_timeout
                        .is_some_and(|idle| self.silent >= idle)
                    {
                        return Some(protocol_close(close_code::GOING_AWAY, "idle timeout"));
                    }
                    if self.limits.ping_interval.is_some() {
                        outbox.push_control(bytes::Bytes::from_static(outbound::PING));
                    }
                }
                keepalive.reset(tokio::time::Instant::now() + self.tick);
                None
            }
        }
    }
}

async fn sleep_until_some(deadline: Option<std::time::Instant>) {
    if let Some(at) = deadline {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// The peer's close frame: checked as RFC 6455 section 5.5.1 asks, then echoed.
fn answer_close(outbox: &Outbox, payload: &[u8]) -> Ended {
    if payload.len() == 1 {
        return protocol_close(close_code::PROTOCOL_ERROR, "close frame of one byte");
    }
    if payload.len() >= 2 {
        let code = u16::from_be_bytes([payload[0], payload[1]]);
        if !CloseCode::from(code).is_allowed() {
            return protocol_close(close_code::PROTOCOL_ERROR, "invalid close code");
        }
        if std::str::from_utf8(&payload[2..]).is_err() {
            return protocol_close(close_code::INVALID_DATA, "close reason is not UTF-8");
        }
    }
    outbox.close(CloseReason::Echo(outbound::control_frame(0x8, payload)));
    Ended::Clean
}

fn deliver(session: &mut Session, opcode: OpCode, payload: &[u8]) {
    if opcode == OpCode::Binary {
        session.reply_error(&ProtocolError::new(
            ErrorCode::BinaryNotSupported,
            "binary frames are not supported; send JSON text frames",
        ));
    } else {
        session.on_text(payload);
    }
}

fn close_for(e: WebSocketError) -> Ended {
    match e {
        // The oversized payload is still in the stream, unread.
        WebSocketError::FrameTooLarge => Ended::Broken(too_big()),
        WebSocketError::InvalidUTF8 => {
            protocol_close(close_code::INVALID_DATA, "text message is not UTF-8")
        }
        WebSocketError::UnexpectedEOF
        | WebSocketError::IoError(_)
        | WebSocketError::ConnectionClosed => Ended::Close(CloseReason::Gone),
        other => Ended::Broken(CloseReason::Protocol {
            code: close_code::PROTOCOL_ERROR,
            reason: other.to_string(),
        }),
    }
}

fn too_big() -> CloseReason {
    CloseReason::Protocol {
        code: close_code::TOO_BIG,
        reason: "frame too large".to_string(),
    }
}

fn protocol_close(code: u16, reason: &str) -> Ended {
    Ended::Close(CloseReason::Protocol {
        code,
        reason: reason.to_string(),
    })
}

/// Reads and discards raw bytes until the peer hangs up or the grace period ends.
async fn drain<R: AsyncRead + Unpin>(stream: &mut R) {
    // On the heap: an array here would be part of every socket's task, for a moment few
    // sockets ever reach.
    let mut sink = vec![0u8; 4096];
    let deadline = tokio::time::sleep(CLOSE_GRACE);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            n = stream.read(&mut sink) => match n {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = &mut deadline => return,
        }
    }
}
