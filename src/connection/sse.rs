//! A Server-Sent Events stream (`GET /sse`): a read-only connection for pages that
//! only watch.
//!
//! The stream is a socket without a reader: it has an outbox like any socket (the same
//! fan-out, windows and slow-consumer bound; its writes become events in the sink,
//! `outbox::SseSink`) and a session like any socket (the same identity, permissions and
//! join limits), whose rooms come from the query instead of `join` frames. Whatever
//! would refuse a join refuses the stream before anything is sent, with the HTTP status
//! the error earns, since an `EventSource` cannot be answered later.
//!
//! Resuming: `Last-Event-ID` (or `?lastEventId=`) names the positions of the stream's
//! durable rooms (`protocol::sse::Positions`); each such room is joined with `since`
//! from its position (a board with `state=1`: `since` or a fresh snapshot), so the
//! events missed while away come first, once each; the history frame says
//! `"recovered":false` when the history no longer holds them. A durable room without a
//! position is joined with its history (`history=N`, else none: `history` 0, which tells
//! the position to resume from).
//!
//! Keepalive: a comment every `server.ping_interval_ms`; a stream whose bytes the peer
//! has not taken for `server.idle_timeout_ms` is closed.

use std::sync::Arc;
use std::time::Duration;

use super::access::UpgradeAuth;
use super::session::Session;
use crate::node::Node;
use crate::outbox::{self, CloseReason, Outbox, SocketOut, SseBody, SseSink};
use crate::protocol::inbound::Replay;
use crate::protocol::sse::Positions;
use crate::protocol::{close_code, outbound, ErrorCode, ProtocolError};

/// The stream's first bytes: how long a browser waits before it reconnects, and a
/// comment so the response's head leaves at once.
const HEAD: &[u8] = b"retry: 1000\n: volley\n\n";

/// What a stream asks for: `?rooms=a,b` (each percent-decoded after the split, so
/// `%2C` is a comma in a name), `history=N`, `state=1`, and where to resume.
#[derive(Debug)]
pub struct SseRequest {
    rooms: Vec<String>,
    history: Option<usize>,
    state: bool,
    resume: Positions,
}

impl SseRequest {
    /// Reads the query and the `Last-Event-ID` header.
    pub fn parse(query: &str, last_event_id: Option<&str>) -> Result<SseRequest, ProtocolError> {
        let invalid = |message: String| ProtocolError::new(ErrorCode::InvalidField, message);
        let mut request = SseRequest {
            rooms: Vec::new(),
            history: None,
            state: false,
            resume: Positions::default(),
        };
        let mut resume = last_event_id.map(str::to_string);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |v: &str| {
                percent_encoding::percent_decode_str(&v.replace('+', " "))
                    .decode_utf8()
                    .map(|v| v.into_owned())
                    .map_err(|_| invalid(format!("{name} is not UTF-8 once percent-decoded")))
            };
            match name {
                "rooms" => {
                    for room in value.split(',').filter(|r| !r.is_empty()) {
                        let room = decode(room)?;
                        if !request.rooms.contains(&room) {
                            request.rooms.push(room);
                        }
                    }
                }
                "history" => {
                    request.history = Some(decode(value)?.parse().map_err(|_| {
                        invalid("history must be a whole number of messages".into())
                    })?);
                }
                "state" => {
                    request.state = match decode(value)?.as_str() {
                        "1" | "true" => true,
                        "0" | "false" => false,
                        _ => return Err(invalid("state must be 1 or 0".into())),
                    };
                }
                "lastEventId" if resume.is_none() => resume = Some(decode(value)?),
                _ => {}
            }
        }
        if request.rooms.is_empty() {
            return Err(ProtocolError::new(
                ErrorCode::MissingField,
                "name the rooms to watch: /sse?rooms=a,b",
            ));
        }
        if request.state && request.history.is_some() {
            return Err(invalid(
                "give either history or state (a board's snapshot), not both".into(),
            ));
        }
        request.resume = Positions::parse(resume.as_deref().unwrap_or(""));
        let rooms = &request.rooms;
        request
            .resume
            .retain(|room| rooms.iter().any(|r| r == room));
        Ok(request)
    }

    /// How `room` is joined: from its position when the stream resumes it, else with
    /// what the query asks (a durable room always with a replay, for its position).
    fn replay(&self, node: &Node, room: &str) -> Option<Replay> {
        if let Some(p) = self.resume.get(room) {
            let (offset, epoch) = (p.offset, p.epoch.clone());
            return Some(if self.state {
                Replay::SinceOrSnapshot { offset, epoch }
            } else {
                Replay::Since { offset, epoch }
            });
        }
        if self.state {
            return Some(Replay::Snapshot);
        }
        match self.history {
            Some(n) => Some(Replay::Last(n)),
            None if node.is_durable(room) => Some(Replay::Last(0)),
            None => None,
        }
    }
}

/// The HTTP status a refused stream gets for `e`.
pub fn status_of(e: &ProtocolError) -> u16 {
    match e.code {
        ErrorCode::Unauthenticated | ErrorCode::InvalidToken | ErrorCode::TokenExpired => 401,
        ErrorCode::Forbidden => 403,
        ErrorCode::RateLimited => 429,
        _ => 400,
    }
}

/// A stream ready to serve: its session and sink.
pub struct Opened {
    session: Session,
    sink: Arc<SseSink>,
}

impl Opened {
    /// The response body: the stream's events.
    pub fn body(&self) -> SseBody {
        self.sink.body()
    }
}

/// Opens a stream on `outbox` (a socket the node just opened): the identity checked,
/// every room joined. On an error the session has ended and nothing was sent.
pub fn open(
    node: &Arc<Node>,
    outbox: &Arc<Outbox>,
    auth: UpgradeAuth,
    request: SseRequest,
) -> Result<Opened, ProtocolError> {
    let sink = SseSink::new(request.resume.clone(), HEAD);
    outbox.attach(SocketOut::Sse(sink.clone()));
    let mut session = Session::checked(node.clone(), outbox.clone(), auth)?;
    for room in &request.rooms {
        if let Err(e) = session.join_now(room, request.replay(node, room)) {
            session.end();
            return Err(e);
        }
    }
    Ok(Opened { session, sink })
}

/// Serves an opened stream until it closes: the writer, the keepalive, the token's
/// expiry; then the session ends and the node forgets the socket. False when the peer
/// did not take the stream's end within `CLOSE_GRACE` after it: the caller drops the
/// connection.
pub async fn serve(node: Arc<Node>, outbox: Arc<Outbox>, opened: Opened) -> bool {
    let Opened { mut session, sink } = opened;
    let writer = {
        let outbox = outbox.clone();
        tokio::spawn(async move { outbox::run_writer(&*outbox).await })
    };
    watch(&node, &outbox, &mut session, &sink).await;
    session.end();
    if writer.await.is_err() {
        tracing::error!(conn = outbox.id(), "SSE writer panicked");
    }
    node.disconnect(&outbox);
    tokio::time::timeout(outbox::CLOSE_GRACE, sink.finished())
        .await
        .is_ok()
}

/// Until the stream is closing: comments on the ping interval, the idle check, the
/// token's deadline, and the peer hanging up.
async fn watch(node: &Node, outbox: &Outbox, session: &mut Session, sink: &SseSink) {
    let server = &node.config().server;
    let ms = |ms: u64| Some(Duration::from_millis(ms)).filter(|d| !d.is_zero());
    let (ping, idle) = (ms(server.ping_interval_ms), ms(server.idle_timeout_ms));
    let tick = ping.or(idle).unwrap_or(Duration::from_secs(86_400));
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    loop {
        let deadline = session.deadline();
        tokio::select! {
            _ = outbox.closed() => return,
            _ = sink.dropped() => {
                outbox.close(CloseReason::Gone);
                return;
            }
            _ = keepalive.tick() => {
                if idle.is_some_and(|idle| sink.stalled_for() >= idle) {
                    close(outbox, close_code::GOING_AWAY, "idle timeout");
                } else if ping.is_some() {
                    outbox.push_control(bytes::Bytes::from_static(outbound::PING));
                }
            }
            _ = until(deadline) => {
                if !session.on_deadline() {
                    close(outbox, close_code::POLICY, "token expired");
                }
            }
        }
    }
}

fn close(outbox: &Outbox, code: u16, reason: &str) {
    outbox.close(CloseReason::Protocol {
        code,
        reason: reason.into(),
    });
}

async fn until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_reads_its_rooms_and_keeps_only_their_positions() {
        let r = SseRequest::parse("rooms=a,b%2Cc,a&history=3", Some("a:e1:5,zz:e:9")).unwrap();
        assert_eq!(r.rooms, ["a", "b,c"]);
        assert_eq!(r.history, Some(3));
        assert_eq!(r.resume.get("a").unwrap().offset, 5);
        assert!(
            r.resume.get("zz").is_none(),
            "a room the stream does not watch"
        );
        let r = SseRequest::parse("rooms=x&state=1&lastEventId=x%3Ae%3A2", None).unwrap();
        assert!(r.state);
        assert_eq!(r.resume.get("x").unwrap().offset, 2);
    }

    #[test]
    fn careless_requests_are_named() {
        let e = SseRequest::parse("", None).unwrap_err();
        assert_eq!(e.code, ErrorCode::MissingField);
        let e = SseRequest::parse("rooms=a&history=lots", None).unwrap_err();
        assert!(e.message.contains("history"), "{e}");
        let e = SseRequest::parse("rooms=a&history=1&state=1", None).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidField);
        let e = SseRequest::parse("rooms=%ff", None).unwrap_err();
        assert!(e.message.contains("UTF-8"), "{e}");
    }
}
