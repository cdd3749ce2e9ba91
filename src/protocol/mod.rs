//! The client protocol: frames in, frames out, and the errors bad input earns.
//!
//! No I/O happens here. `inbound` parses a client frame once, borrowing `content` and
//! `payload` as raw JSON so they are never re-encoded; `outbound` builds each server
//! frame once, already WebSocket-framed, as a shared `Bytes` every subscriber can write;
//! `frame_scan` follows a stream of frames by their headers, for code that watches bytes;
//! `sse` writes frames as Server-Sent Events and keeps a stream's resumable position.

pub mod board;
pub mod frame_scan;
pub mod inbound;
pub mod outbound;
pub mod sse;

pub use inbound::{check_content, parse, ClientFrame};
pub use outbound::Encoded;

/// Milliseconds since the Unix epoch: the `timestamp` of server frames (the Node.js
/// servers' `Date.now()`).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Longest room id accepted, in bytes.
pub const MAX_ROOM_ID_BYTES: usize = 256;

/// The stable `code` of an `error` frame. Clients may match on these strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame is not a JSON object.
    BadJson,
    /// `type` names no frame this node understands.
    UnknownType,
    /// A field the frame type needs is absent.
    MissingField,
    /// A field has the wrong JSON type or an unusable value.
    InvalidField,
    /// A binary frame: the protocol is JSON text frames.
    BinaryNotSupported,
    /// `join` would put the socket in more than `limits.max_rooms_per_socket` rooms.
    TooManyRooms,
    /// `leave` for a room the socket is not in.
    NotInRoom,
    /// The socket publishes faster than `limits.publish_rate` (joins: `limits.join_rate`;
    /// presence queries: `limits.presence_rate`).
    RateLimited,
    /// The node cannot take more publishes for other nodes right now; retry shortly.
    Overloaded,
    /// The node's configuration does not allow this frame from a client.
    Forbidden,
    /// A durable room's history could not be read; the join stands, live messages follow.
    HistoryUnavailable,
    /// `auth.required`: this frame needs an identity first.
    Unauthenticated,
    /// The token (or `userId`) gives no identity.
    InvalidToken,
    /// The socket's token expired: send a fresh one before the grace period ends.
    TokenExpired,
    /// A direct message to a user with no socket on any node.
    UserOffline,
    /// Who is online could not be read (Redis is away); asking again later may work.
    PresenceUnavailable,
    /// A state room's board holds `state_max_keys` entries: a new key is refused.
    StateFull,
}

impl ErrorCode {
    /// Every code, in declaration order (`code as usize` indexes it).
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::BadJson,
        ErrorCode::UnknownType,
        ErrorCode::MissingField,
        ErrorCode::InvalidField,
        ErrorCode::BinaryNotSupported,
        ErrorCode::TooManyRooms,
        ErrorCode::NotInRoom,
        ErrorCode::RateLimited,
        ErrorCode::Overloaded,
        ErrorCode::Forbidden,
        ErrorCode::HistoryUnavailable,
        ErrorCode::Unauthenticated,
        ErrorCode::InvalidToken,
        ErrorCode::TokenExpired,
        ErrorCode::UserOffline,
        ErrorCode::PresenceUnavailable,
        ErrorCode::StateFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::BinaryNotSupported => "binary_not_supported",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::NotInRoom => "not_in_room",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::HistoryUnavailable => "history_unavailable",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::UserOffline => "user_offline",
            ErrorCode::PresenceUnavailable => "presence_unavailable",
            ErrorCode::StateFull => "state_full",
        }
    }
}

/// A client mistake: answered with an `error` frame; the socket stays open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
        }
    }
}

/// WebSocket close codes volley sends (RFC 6455 section 7.4.1).
pub mod close_code {
    /// The node is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol itself.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// The client sent text that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// Policy: the socket read too slowly and its outbox filled up.
    pub const POLICY: u16 = 1008;
    /// A message over `limits.max_frame_bytes`.
    pub const TOO_BIG: u16 = 1009;
}
