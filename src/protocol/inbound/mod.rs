//! Client frames in: one parse per frame, no copies of what the client publishes.
//!
//! `content` and `payload` are kept as borrowed raw JSON (`&RawValue`): the server frame
//! is built by splicing those bytes, so a client's JSON is never decoded into a tree or
//! re-encoded. Room ids arrive as strings or integers and leave as one canonical string,
//! so `42` and `"42"` are the same room on every node (the reference servers' numeric-`roomId` bug).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{ErrorCode, ProtocolError, MAX_ROOM_ID_BYTES};

/// One parsed client frame, borrowing from the received bytes.
#[derive(Debug)]
pub enum ClientFrame<'a> {
    Join {
        room: Cow<'a, str>,
        /// What the joiner asks of a durable room's history, if anything.
        replay: Option<Replay>,
        /// `"delta":"fossil"`: a state room's messages as Fossil deltas where smaller.
        delta: bool,
    },
    Leave {
        room: Cow<'a, str>,
    },
    Message {
        room: Cow<'a, str>,
        content: &'a RawValue,
        /// `"remove":true`: a state room's entry named by the content's key leaves.
        remove: bool,
    },
    Broadcast {
        payload: &'a RawValue,
    },
    /// `{"type":"auth","token":JWT}` or, without a key configured, `{"type":"auth","userId":U}`.
    Auth {
        token: Option<Cow<'a, str>>,
        user_id: Option<Cow<'a, str>>,
    },
    /// `{"type":"get_online_users"}`
    GetOnlineUsers,
    /// `{"type":"subscribe_presence"}` / `unsubscribe_presence`
    Presence {
        subscribe: bool,
    },
    /// `{"type":"direct_message","toUserId":U,"content":ANY}`
    DirectMessage {
        to: Cow<'a, str>,
        content: &'a RawValue,
    },
}

/// What a join asks of a durable room's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// `"history":N`: the last N messages (`1`: the current value).
    Last(usize),
    /// `"since":{"offset":O,"epoch":E}`: everything after O, if the room is still in epoch E.
    Since { offset: u64, epoch: String },
    /// `"state":true`: a state room's board (the latest message per key) at one offset.
    Snapshot,
    /// `"state":true` with `"since"`: everything after O if the history still holds it,
    /// else the board (a fresh snapshot): either way the joiner's board is whole.
    SinceOrSnapshot { offset: u64, epoch: String },
}

impl Replay {
    /// The position a `since` join asked to continue from.
    pub fn since(&self) -> Option<u64> {
        match self {
            Replay::Since { offset, .. } | Replay::SinceOrSnapshot { offset, .. } => Some(*offset),
            Replay::Last(_) | Replay::Snapshot => None,
        }
    }

    /// The epoch a `since` join asked to continue in.
    pub fn since_epoch(&self) -> Option<&str> {
        match self {
            Replay::Since { epoch, .. } | Replay::SinceOrSnapshot { epoch, .. } => Some(epoch),
            Replay::Last(_) | Replay::Snapshot => None,
        }
    }

    /// Whether the join asked for a state room's board.
    pub fn wants_board(&self) -> bool {
        matches!(self, Replay::Snapshot | Replay::SinceOrSnapshot { .. })
    }
}

/// A body of `POST /api/publish`.
#[derive(Debug)]
pub enum PublishRequest<'a> {
    Room {
        room: Cow<'a, str>,
        content: &'a RawValue,
        /// `"remove":true`: a state room's entry leaves (see `ClientFrame::Message`).
        remove: bool,
    },
    Broadcast {
        payload: &'a RawValue,
    },
    /// `{"userId":U,"content":ANY}`: a direct message from the backend.
    User {
        user: Cow<'a, str>,
        content: &'a RawValue,
    },
}

/// Parses `{"roomId":R,"content":ANY}` (with `"remove":true` for a state room's entry),
/// `{"userId":U,"content":ANY}` or `{"broadcast":ANY}`.
pub fn parse_publish_request(body: &[u8]) -> Result<PublishRequest<'_>, ProtocolError> {
    let fields: Fields<'_> = serde_json::from_slice(body).map_err(|e| {
        ProtocolError::new(
            ErrorCode::BadJson,
            format!("body is not a JSON object: {e}"),
        )
    })?;
    if let Some(payload) = fields.broadcast {
        if fields.room_id.is_some() || fields.content.is_some() {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                "give either roomId and content, or broadcast, not both",
            ));
        }
        return Ok(PublishRequest::Broadcast { payload });
    }
    if fields.user_id.is_some() {
        if fields.room_id.is_some() {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                "give either roomId or userId, not both",
            ));
        }
        let user = room_id(fields.user_id, "a direct message")
            .map_err(|e| ProtocolError::new(e.code, e.message.replace("roomId", "userId")))?;
        let content = fields
            .content
            .ok_or_else(|| missing("content", "a direct message"))?;
        return Ok(PublishRequest::User { user, content });
    }
    let room = room_id(fields.room_id, "a publish request without broadcast")?;
    let content = fields
        .content
        .ok_or_else(|| missing("content", "a room publish request"))?;
    let remove = flag(fields.remove, "remove")?;
    Ok(PublishRequest::Room {
        room,
        content,
        remove,
    })
}

/// Parses one text frame. Every failure is a `ProtocolError` naming what was wrong.
pub fn parse(text: &[u8]) -> Result<ClientFrame<'_>, ProtocolError> {
    let fields: Fields<'_> = serde_json::from_slice(text).map_err(|e| {
        ProtocolError::new(
            ErrorCode::BadJson,
            format!("frame is not a JSON object: {e}"),
        )
    })?;
    let ty = fields
        .ty
        .ok_or_else(|| missing("type", "every frame"))
        .and_then(|raw| string_field(raw, "type"))?;
    match &*ty {
        "join" => Ok(ClientFrame::Join {
            room: room_id(fields.room_id, "join")?,
            replay: replay(fields.history, fields.since, flag(fields.state, "state")?)?,
            delta: match fields.delta.map(RawValue::get) {
                None => false,
                Some(r#""fossil""#) => true,
                Some(_) => {
                    return Err(ProtocolError::new(
                        ErrorCode::InvalidField,
                        r#"delta must be "fossil" (the one delta encoding volley offers)"#,
                    ))
                }
            },
        }),
        "leave" => Ok(ClientFrame::Leave {
            room: room_id(fields.room_id, "leave")?,
        }),
        "message" => {
            let room = room_id(fields.room_id, "message")?;
            let content = fields
                .content
                .ok_or_else(|| missing("content", "message"))?;
            let remove = flag(fields.remove, "remove")?;
            Ok(ClientFrame::Message {
                room,
                content,
                remove,
            })
        }
        "auth" => {
            let token = fields.token.map(|t| string_field(t, "token")).transpose()?;
            let user_id = match fields.user_id {
                Some(raw) if raw.get().starts_with('"') => Some(string_field(raw, "userId")?),
                Some(raw) => Some(room_id(Some(raw), "auth")?),
                None => None,
            };
            match (&token, &user_id) {
                (None, None) => Err(missing("token", "auth (or userId where no key is configured)")),
                (Some(_), Some(_)) => Err(ProtocolError::new(
                    ErrorCode::InvalidField,
                    "give either token or userId, not both",
                )),
                _ => Ok(ClientFrame::Auth { token, user_id }),
            }
        }
        "get_online_users" => Ok(ClientFrame::GetOnlineUsers),
        "subscribe_presence" => Ok(ClientFrame::Presence { subscribe: true }),
        "unsubscribe_presence" => Ok(ClientFrame::Presence { subscribe: false }),
        "direct_message" => Ok(ClientFrame::DirectMessage {
            to: room_id(fields.to_user_id, "direct_message")
                .map_err(|e| ProtocolError::new(e.code, e.message.replace("roomId", "toUserId")))?,
            content: fields
                .content
                .ok_or_else(|| missing("content", "direct_message"))?,
        }),
        "broadcast" => Ok(ClientFrame::Broadcast {
            payload: fields
                .payload
                .ok_or_else(|| missing("payload", "broadcast"))?,
        }),
        other => Err(ProtocolError::new(
            ErrorCode::UnknownType,
            format!(
                "unknown frame type {:?}; this node understands join, leave, message, broadcast, auth, get_online_users, subscribe_presence, unsubscribe_presence, direct_message",
                truncate(other, 64)
            ),
        )),
    }
}

/// Longest number accepted in published JSON: a double's shortest round-trip form takes
/// at most 24 characters; 40 leaves room for other encoders' longer spellings.
const MAX_NUMBER_CHARS: usize = 40;

/// Refuses published JSON that common client parsers reject, so one publisher's message
/// cannot make a batch frame unreadable for everyone in the room: nesting deeper than
/// `max_depth`, or a number a double cannot hold (a 5 000-digit integer, `1e400`).
/// One pass over bytes already known to be valid JSON.
pub fn check_content(raw: &RawValue, field: &str, max_depth: usize) -> Result<(), ProtocolError> {
    let b = raw.get().as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                // Skip the string: to its closing quote, stepping over escapes. A `\u`
                // escape of half a UTF-16 surrogate pair without its other half is valid
                // JSON text to some parsers and an error to others (serde_json, Go's):
                // one such message would make a whole batch frame unreadable to them.
                i += 1;
                while let Some(k) = memchr::memchr2(b'"', b'\\', &b[i..]) {
                    if b[i + k] == b'\\' {
                        i += k;
                        if b.get(i + 1) == Some(&b'u') {
                            let at = |j: usize| hex4(b.get(j..j + 4));
                            match at(i + 2) {
                                Some(0xD800..=0xDBFF)
                                    if b.get(i + 6..i + 8) == Some(b"\\u")
                                        && matches!(at(i + 8), Some(0xDC00..=0xDFFF)) =>
                                {
                                    i += 12;
                                    continue;
                                }
                                Some(0xD800..=0xDFFF) => {
                                    return Err(ProtocolError::new(
                                        ErrorCode::InvalidField,
                                        format!("{field} has half a UTF-16 surrogate pair (a lone \\uD800-\\uDFFF escape), which strict JSON parsers reject"),
                                    ));
                                }
                                _ => {}
                            }
                        }
                        i += 2;
                    } else {
                        i += k;
                        break;
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(ProtocolError::new(
                        ErrorCode::InvalidField,
                        format!("{field} nests deeper than limits.max_json_depth ({max_depth})"),
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < b.len() && matches!(b[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                let number = &b[start..i];
                // Without an exponent, 40 characters stay far below a double's 1.8e308;
                // only an exponent can overflow, so only then is the value worked out.
                let fits = number.len() <= MAX_NUMBER_CHARS
                    && (!number.iter().any(|c| matches!(c, b'e' | b'E'))
                        || std::str::from_utf8(number)
                            .ok()
                            .and_then(|n| n.parse::<f64>().ok())
                            .is_some_and(f64::is_finite));
                if !fits {
                    return Err(ProtocolError::new(
                        ErrorCode::InvalidField,
                        format!("{field} has a number a double cannot hold (over {MAX_NUMBER_CHARS} characters or out of range)"),
                    ));
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// The value of four hex digits (a `\u` escape's), if they are.
fn hex4(digits: Option<&[u8]>) -> Option<u32> {
    let digits = std::str::from_utf8(digits?).ok()?;
    u32::from_str_radix(digits, 16).ok()
}

/// A `true`/`false` field; absent is false.
fn flag(raw: Option<&RawValue>, name: &str) -> Result<bool, ProtocolError> {
    match raw.map(RawValue::get) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(ProtocolError::new(
            ErrorCode::InvalidField,
            format!("{name} must be true or false"),
        )),
    }
}

/// `history` (a count) or `since` (a position), not both; `state` (the board) with or
/// without `since`, never with `history`.
fn replay(
    history: Option<&RawValue>,
    since: Option<&RawValue>,
    state: bool,
) -> Result<Option<Replay>, ProtocolError> {
    let invalid = |message: &str| ProtocolError::new(ErrorCode::InvalidField, message);
    if state {
        if history.is_some() {
            return Err(invalid(
                "give either history or state, not both (state is the whole board)",
            ));
        }
        return Ok(Some(match replay(None, since, false)? {
            Some(Replay::Since { offset, epoch }) => Replay::SinceOrSnapshot { offset, epoch },
            _ => Replay::Snapshot,
        }));
    }
    match (history, since) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(invalid("give either history or since, not both")),
        (Some(n), None) => n
            .get()
            .parse::<usize>()
            .map(|n| Some(Replay::Last(n)))
            .map_err(|_| invalid("history must be a whole number of messages")),
        (None, Some(since)) => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Since {
                offset: u64,
                epoch: String,
            }
            serde_json::from_str::<Since>(since.get())
                .map(|s| {
                    Some(Replay::Since {
                        offset: s.offset,
                        epoch: s.epoch,
                    })
                })
                .map_err(|_| {
                    invalid(r#"since must be {"offset":O,"epoch":E}, as a history frame or message gave them"#)
                })
        }
    }
}

fn missing(field: &str, frame: &str) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::MissingField,
        format!("{field} is required in {frame}"),
    )
}

fn string_field<'a>(raw: &'a RawValue, name: &str) -> Result<Cow<'a, str>, ProtocolError> {
    let text = raw.get();
    if !text.starts_with('"') {
        return Err(ProtocolError::new(
            ErrorCode::InvalidField,
            format!("{name} must be a string"),
        ));
    }
    // Borrow when the string has no escapes; decode into an owned string when it does.
    match serde_json::from_str::<&'a str>(text) {
        Ok(s) => Ok(Cow::Borrowed(s)),
        Err(_) => serde_json::from_str::<String>(text)
            .map(Cow::Owned)
            .map_err(|e| ProtocolError::new(ErrorCode::InvalidField, format!("{name}: {e}"))),
    }
}

/// A room id: a non-empty string, or an integer taken as its decimal string.
fn room_id<'a>(raw: Option<&'a RawValue>, frame: &str) -> Result<Cow<'a, str>, ProtocolError> {
    let raw = raw.ok_or_else(|| missing("roomId", frame))?;
    let text = raw.get();
    let room = if text.starts_with('"') {
        string_field(raw, "roomId")?
    } else if let Ok(n) = text.parse::<i64>() {
        Cow::Owned(n.to_string())
    } else if let Ok(n) = text.parse::<u64>() {
        Cow::Owned(n.to_string())
    } else {
        return Err(ProtocolError::new(
            ErrorCode::InvalidField,
            "roomId must be a string or an integer",
        ));
    };
    check_room_id(&room)?;
    Ok(room)
}

/// What every room id must be, however it came (a frame, a URL path): not empty, at most
/// `MAX_ROOM_ID_BYTES`.
pub fn check_room_id(room: &str) -> Result<(), ProtocolError> {
    if room.is_empty() {
        return Err(ProtocolError::new(
            ErrorCode::InvalidField,
            "roomId must not be empty",
        ));
    }
    if room.len() > MAX_ROOM_ID_BYTES {
        return Err(ProtocolError::new(
            ErrorCode::InvalidField,
            format!("roomId is longer than {MAX_ROOM_ID_BYTES} bytes"),
        ));
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

/// The fields volley reads, each as raw JSON; unknown fields are skipped.
#[derive(Default)]
struct Fields<'a> {
    ty: Option<&'a RawValue>,
    history: Option<&'a RawValue>,
    since: Option<&'a RawValue>,
    token: Option<&'a RawValue>,
    user_id: Option<&'a RawValue>,
    to_user_id: Option<&'a RawValue>,
    room_id: Option<&'a RawValue>,
    content: Option<&'a RawValue>,
    payload: Option<&'a RawValue>,
    broadcast: Option<&'a RawValue>,
    state: Option<&'a RawValue>,
    remove: Option<&'a RawValue>,
    delta: Option<&'a RawValue>,
}

enum Key {
    Type,
    History,
    Since,
    Token,
    UserId,
    ToUserId,
    RoomId,
    Content,
    Payload,
    Broadcast,
    State,
    Remove,
    Delta,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(match v {
                    "type" => Key::Type,
                    "history" => Key::History,
                    "since" => Key::Since,
                    "token" => Key::Token,
                    "userId" => Key::UserId,
                    "toUserId" => Key::ToUserId,
                    "roomId" => Key::RoomId,
                    "content" => Key::Content,
                    "payload" => Key::Payload,
                    "broadcast" => Key::Broadcast,
                    "state" => Key::State,
                    "remove" => Key::Remove,
                    "delta" => Key::Delta,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_identifier(KeyVisitor)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Fields<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldsVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for FieldsVisitor<'a> {
            type Value = Fields<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'a>, A::Error> {
                let mut fields = Fields::default();
                while let Some(key) = map.next_key::<Key>()? {
                    let slot = match key {
                        Key::Type => &mut fields.ty,
                        Key::History => &mut fields.history,
                        Key::Since => &mut fields.since,
                        Key::Token => &mut fields.token,
                        Key::UserId => &mut fields.user_id,
                        Key::ToUserId => &mut fields.to_user_id,
                        Key::RoomId => &mut fields.room_id,
                        Key::Content => &mut fields.content,
                        Key::Payload => &mut fields.payload,
                        Key::Broadcast => &mut fields.broadcast,
                        Key::State => &mut fields.state,
                        Key::Remove => &mut fields.remove,
                        Key::Delta => &mut fields.delta,
                        Key::Other => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = Some(map.next_value::<&'de RawValue>()?);
                }
                Ok(fields)
            }
        }
        d.deserialize_map(FieldsVisitor(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests;
