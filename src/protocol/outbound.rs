//! Server frames out, each built once and WebSocket-framed once.
//!
//! An `Encoded` holds the whole wire frame (header + JSON) in one `Bytes`. Server frames
//! are never masked (RFC 6455 section 5.1), so the same bytes are valid on every socket:
//! fan-out clones the handle, never the data. The JSON body is written after a reserved
//! header gap, and the header is filled in once its length is known, so building a frame
//! is one allocation and no copy of the body.

use std::io::Write as _;

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::value::RawValue;

use super::ProtocolError;

/// Longest WebSocket header for an unmasked frame: 2 bytes + 8-byte length.
pub const MAX_HEADER: usize = 10;
pub const OPCODE_TEXT: u8 = 0x1;
pub const OPCODE_CLOSE: u8 = 0x8;

/// One server frame, ready to write: `frame()` is the wire bytes, `json()` the body.
#[derive(Clone, Debug)]
pub struct Encoded {
    frame: Bytes,
    header_len: u8,
    /// For rooms with `conflate`: the message's room and key value, hashed; 0 = none.
    /// A newer message with the same key replaces this one in an outbox.
    conflation_key: u64,
    /// 0 for one message; else a room's window already framed, carrying this many
    /// messages: it leaves as its own frame, never nested in another batch.
    carries: u32,
    /// On a state room's delta: the full message it stands for, which an outbox queues
    /// instead when it conflates the delta's predecessor away (a delta applies only to
    /// the message before it).
    full: Option<std::sync::Arc<Encoded>>,
}

impl Encoded {
    /// The complete WebSocket frame.
    pub fn frame(&self) -> &Bytes {
        &self.frame
    }

    /// The JSON text of the frame, without the WebSocket header.
    pub fn json(&self) -> &[u8] {
        &self.frame[self.header_len as usize..]
    }

    /// The JSON text of the frame as shared bytes (a slice of the frame, no copy).
    pub fn json_bytes(&self) -> Bytes {
        self.frame.slice(self.header_len as usize..)
    }

    /// Bytes this frame occupies in an outbox.
    pub fn wire_len(&self) -> usize {
        self.frame.len()
    }

    /// The conflation key (0 = none).
    pub fn conflation_key(&self) -> u64 {
        self.conflation_key
    }

    /// How many messages this frame carries if it is a room's framed window (see
    /// `carries`), else `None`: a message that may be batched with others.
    pub fn framed(&self) -> Option<usize> {
        (self.carries > 0).then_some(self.carries as usize)
    }

    /// The same frame (shared bytes), as a room's framed window of `messages` messages:
    /// an outbox writes it as it is.
    pub fn into_framed(self, messages: usize) -> Encoded {
        Encoded {
            carries: messages.clamp(1, u32::MAX as usize) as u32,
            ..self
        }
    }

    /// The same frame, a delta standing for `full` (see `full`).
    pub fn with_full(self, full: &Encoded) -> Encoded {
        Encoded {
            full: Some(std::sync::Arc::new(full.clone())),
            ..self
        }
    }

    /// The full message a delta stands for; `None` for any other frame.
    pub fn full(&self) -> Option<&Encoded> {
        self.full.as_deref()
    }

    /// The same frame (shared bytes), replaceable in an outbox by a newer message with
    /// the same `key`.
    pub fn with_conflation_key(&self, key: u64) -> Encoded {
        Encoded {
            conflation_key: key,
            ..self.clone()
        }
    }

    /// Wraps a JSON text that is already complete (a broadcast payload as sent).
    pub fn from_json(json: &[u8]) -> Encoded {
        let mut b = Builder::with_capacity(json.len());
        b.raw(json);
        b.finish()
    }
}

/// Writes the header of an unmasked, final frame with `len` payload bytes into `out`
/// and returns how many bytes it used.
pub fn write_header(out: &mut [u8; MAX_HEADER], opcode: u8, len: usize) -> usize {
    out[0] = 0x80 | opcode;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// Builds a text frame: JSON is appended after a gap, the header is written on `finish`.
pub struct Builder {
    buf: BytesMut,
}

impl Builder {
    pub fn with_capacity(json_len: usize) -> Builder {
        let mut buf = BytesMut::with_capacity(MAX_HEADER + json_len);
        buf.put_bytes(0, MAX_HEADER);
        Builder { buf }
    }

    /// The JSON written so far, in bytes.
    pub fn json_len(&self) -> usize {
        self.buf.len() - MAX_HEADER
    }

    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self
    }

    /// Appends `s` as a JSON string literal, escaped.
    pub fn string(&mut self, s: &str) -> &mut Self {
        // Writing into a BytesMut cannot fail, and a &str always serializes.
        let _ = serde_json::to_writer((&mut self.buf).writer(), s);
        self
    }

    /// Appends `[I1,I2,...]`: each item is already JSON.
    pub fn list<'i>(&mut self, items: impl IntoIterator<Item = &'i [u8]>) -> &mut Self {
        self.raw(b"[");
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                self.raw(b",");
            }
            self.raw(item);
        }
        self.raw(b"]")
    }

    /// Closes the object, with `"recovered":B` first when a `since` join asked.
    pub fn end_recovered(&mut self, recovered: Option<bool>) -> &mut Self {
        match recovered {
            Some(true) => self.raw(br#","recovered":true}"#),
            Some(false) => self.raw(br#","recovered":false}"#),
            None => self.raw(b"}"),
        }
    }

    pub fn number(&mut self, n: u64) -> &mut Self {
        let mut itoa = itoa::Buffer::new();
        self.buf.extend_from_slice(itoa.format(n).as_bytes());
        self
    }

    pub fn finish(self) -> Encoded {
        let len = self.buf.len() - MAX_HEADER;
        let mut header = [0u8; MAX_HEADER];
        let h = write_header(&mut header, OPCODE_TEXT, len);
        let mut buf = self.buf;
        buf[MAX_HEADER - h..MAX_HEADER].copy_from_slice(&header[..h]);
        Encoded {
            frame: buf.freeze().slice(MAX_HEADER - h..),
            header_len: h as u8,
            conflation_key: 0,
            carries: 0,
            full: None,
        }
    }
}

/// `{"type":"message","roomId":R,"content":C,"timestamp":MS}`
pub fn room_message(room: &str, content: &RawValue, timestamp_ms: u64) -> Encoded {
    let content = content.get().as_bytes();
    let mut b = Builder::with_capacity(48 + room.len() + content.len());
    b.raw(br#"{"type":"message","roomId":"#)
        .string(room)
        .raw(br#","content":"#)
        .raw(content)
        .raw(br#","timestamp":"#)
        .number(timestamp_ms)
        .raw(b"}");
    b.finish()
}

/// The conflation key of a room message frame: its room and the raw JSON of `field` in
/// its `content` (an object), hashed; 0 when the content has no such field. Equal values
/// written alike (`"ACME"`, `42`) give equal keys.
pub fn conflation_key(room: &str, frame_json: &[u8], field: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    #[derive(serde::Deserialize)]
    struct Frame<'a> {
        #[serde(borrow)]
        content: Option<&'a RawValue>,
    }
    #[derive(serde::Deserialize)]
    struct Fields<'a>(
        #[serde(borrow)] std::collections::HashMap<std::borrow::Cow<'a, str>, &'a RawValue>,
    );
    let Ok(frame) = serde_json::from_slice::<Frame<'_>>(frame_json) else {
        return 0;
    };
    let Some(content) = frame.content else {
        return 0;
    };
    let Ok(Fields(fields)) = serde_json::from_str::<Fields<'_>>(content.get()) else {
        return 0;
    };
    let Some(value) = fields.get(field) else {
        return 0;
    };
    // A fixed-key hasher: the same message gives the same key on every call.
    let mut hasher =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .build_hasher();
    hasher.write(room.as_bytes());
    hasher.write_u8(0xff);
    hasher.write(value.get().as_bytes());
    hasher.finish().max(1)
}

/// A durable room's message: the frame with `"offset":O` added as its last field.
/// `frame` must be a JSON object (a room message frame always is).
pub fn with_offset(frame: &Encoded, offset: u64) -> Encoded {
    let json = frame.json();
    let body = json.strip_suffix(b"}").unwrap_or(json);
    let mut b = Builder::with_capacity(body.len() + 32);
    b.raw(body).raw(br#","offset":"#).number(offset).raw(b"}");
    b.finish()
}

/// The offset `with_offset` gave a frame: read from its end, no parse.
pub fn offset_of(json: &[u8]) -> Option<u64> {
    let body = json.strip_suffix(b"}")?;
    let digits = body.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    let (head, number) = body.split_at(body.len() - digits);
    if digits == 0 || !head.ends_with(br#","offset":"#) {
        return None;
    }
    std::str::from_utf8(number).ok()?.parse().ok()
}

/// `{"type":"history","roomId":R,"epoch":E,"offset":O,"messages":[M1,...]}`, with
/// `"recovered":B` when the join asked to recover from a position. `offset` (a durable
/// room's only) is where the history ends: the room's last offset when it was read,
/// after which live messages follow.
pub fn history(
    room: &str,
    epoch: &str,
    offset: Option<u64>,
    messages: &[Encoded],
    recovered: Option<bool>,
) -> Encoded {
    let body: usize = messages.iter().map(|m| m.json().len() + 1).sum();
    let mut b = Builder::with_capacity(100 + room.len() + epoch.len() + body);
    b.raw(br#"{"type":"history","roomId":"#)
        .string(room)
        .raw(br#","epoch":"#)
        .string(epoch);
    if let Some(offset) = offset {
        b.raw(br#","offset":"#).number(offset);
    }
    b.raw(br#","messages":"#)
        .list(messages.iter().map(Encoded::json))
        .end_recovered(recovered);
    b.finish()
}

/// `{"type":"epoch_changed","roomId":R,"epoch":E}`: a durable room's history started
/// again (Redis lost it); its offsets count from 1 in epoch E. Sent to the room's
/// subscribers before the first message of the new epoch, so a client that comes back
/// later asks `since` in the right epoch.
pub fn epoch_changed(room: &str, epoch: &str) -> Encoded {
    let mut b = Builder::with_capacity(56 + room.len() + epoch.len());
    b.raw(br#"{"type":"epoch_changed","roomId":"#)
        .string(room)
        .raw(br#","epoch":"#)
        .string(epoch)
        .raw(b"}");
    b.finish()
}

/// The epoch an `epoch_changed` frame announces; `None` for any other frame.
pub fn changed_epoch(json: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Changed {
        epoch: String,
    }
    if !json.starts_with(br#"{"type":"epoch_changed","#) {
        return None;
    }
    serde_json::from_slice::<Changed>(json)
        .ok()
        .map(|c| c.epoch)
}

/// `{"type":"authenticated","userId":U}`: the answer to a good `auth`.
pub fn authenticated(user_id: &str) -> Encoded {
    let mut b = Builder::with_capacity(40 + user_id.len());
    b.raw(br#"{"type":"authenticated","userId":"#)
        .string(user_id)
        .raw(b"}");
    b.finish()
}

/// `{"type":"direct_message","fromUserId":U,"content":C}`; a backend's has no `fromUserId`.
pub fn direct_message(from: Option<&str>, content: &RawValue) -> Encoded {
    let content = content.get().as_bytes();
    let mut b = Builder::with_capacity(64 + content.len());
    b.raw(br#"{"type":"direct_message","#);
    if let Some(from) = from {
        b.raw(br#""fromUserId":"#).string(from).raw(b",");
    }
    b.raw(br#""content":"#).raw(content).raw(b"}");
    b.finish()
}

/// `{"type":"presence","event":"connected"|"disconnected","userId":U,"serverId":S}`
pub fn presence(connected: bool, user_id: &str, server_id: &str) -> Encoded {
    let mut b = Builder::with_capacity(80 + user_id.len() + server_id.len());
    b.raw(if connected {
        br#"{"type":"presence","event":"connected","userId":"#.as_slice()
    } else {
        br#"{"type":"presence","event":"disconnected","userId":"#.as_slice()
    })
    .string(user_id)
    .raw(br#","serverId":"#)
    .string(server_id)
    .raw(b"}");
    b.finish()
}

/// `{"type":"online_users","users":[...],"truncated":B}`: not on the hot path, so
/// serialized with serde.
pub fn online_users(users: &impl serde::Serialize) -> Encoded {
    let mut value = serde_json::to_value(users).unwrap_or_default();
    value["type"] = serde_json::Value::from("online_users");
    Encoded::from_json(&serde_json::to_vec(&value).unwrap_or_default())
}

/// Whether a socket entered or left a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    Joined,
    Left,
}

/// `{"type":"user_joined"|"user_left","roomId":R,"timestamp":MS}`
pub fn membership(kind: Membership, room: &str, timestamp_ms: u64) -> Encoded {
    let ty: &[u8] = match kind {
        Membership::Joined => br#"{"type":"user_joined","roomId":"#,
        Membership::Left => br#"{"type":"user_left","roomId":"#,
    };
    let mut b = Builder::with_capacity(48 + room.len());
    b.raw(ty)
        .string(room)
        .raw(br#","timestamp":"#)
        .number(timestamp_ms)
        .raw(b"}");
    b.finish()
}

/// `{"type":"error","code":C,"message":TEXT}`
pub fn error(err: &ProtocolError) -> Encoded {
    let mut b = Builder::with_capacity(40 + err.message.len());
    b.raw(br#"{"type":"error","code":"#)
        .string(err.code.as_str())
        .raw(br#","message":"#)
        .string(&err.message)
        .raw(b"}");
    b.finish()
}

/// A close frame with a status code and a short reason (at most 123 bytes, as the RFC allows).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut reason = reason.as_bytes();
    if reason.len() > 123 {
        reason = &reason[..123];
    }
    let mut out = Vec::with_capacity(4 + reason.len());
    let mut header = [0u8; MAX_HEADER];
    let h = write_header(&mut header, OPCODE_CLOSE, 2 + reason.len());
    out.extend_from_slice(&header[..h]);
    let _ = out.write_all(&code.to_be_bytes());
    out.extend_from_slice(reason);
    Bytes::from(out)
}

/// A control frame (pong, close echo) as given by the WebSocket reader, encoded for the writer.
/// A server ping with no payload (FIN, opcode 0x9, length 0).
pub const PING: &[u8] = &[0x89, 0x00];

pub fn control_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut header = [0u8; MAX_HEADER];
    let h = write_header(&mut header, opcode, payload.len());
    let mut out = Vec::with_capacity(h + payload.len());
    out.extend_from_slice(&header[..h]);
    out.extend_from_slice(payload);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    #[test]
    fn message_frame_is_framed_json() {
        let content = RawValue::from_string(r#"{"score":"2-1"}"#.into()).unwrap();
        let e = room_message("match:1", &content, 1700000000000);
        let json = br#"{"type":"message","roomId":"match:1","content":{"score":"2-1"},"timestamp":1700000000000}"#;
        assert_eq!(e.json(), json);
        assert_eq!(e.frame()[0], 0x81);
        assert_eq!(e.frame()[1] as usize, json.len());
        assert_eq!(e.wire_len(), json.len() + 2);
    }

    #[test]
    fn long_frames_get_extended_lengths() {
        let big = vec![b'1'; 70_000];
        let e = Encoded::from_json(&big);
        assert_eq!(&e.frame()[..2], &[0x81, 127]);
        assert_eq!(e.json().len(), 70_000);
        let mid = Encoded::from_json(&big[..300]);
        assert_eq!(&mid.frame()[..4], &[0x81, 126, 1, 44]);
    }

    #[test]
    fn offsets_are_added_last_and_read_back_from_the_end() {
        let content = RawValue::from_string("{\"offset\":3}".into()).unwrap();
        let m = room_message("r", &content, 5);
        let durable = with_offset(&m, 42);
        assert_eq!(
            durable.json(),
            br#"{"type":"message","roomId":"r","content":{"offset":3},"timestamp":5,"offset":42}"#
        );
        assert_eq!(offset_of(durable.json()), Some(42));
        assert_eq!(offset_of(m.json()), None, "a plain frame has no offset");
        let h = history("r", "e1", Some(42), &[durable], Some(false));
        assert_eq!(
            h.json(),
            br#"{"type":"history","roomId":"r","epoch":"e1","offset":42,"messages":[{"type":"message","roomId":"r","content":{"offset":3},"timestamp":5,"offset":42}],"recovered":false}"#
        );
    }

    #[test]
    fn an_epoch_change_names_its_room_and_epoch_and_is_told_apart() {
        let e = epoch_changed("scores:\"1", "1700-5");
        assert_eq!(
            e.json(),
            br#"{"type":"epoch_changed","roomId":"scores:\"1","epoch":"1700-5"}"#
        );
        assert_eq!(changed_epoch(e.json()).as_deref(), Some("1700-5"));
        let m = room_message("r", &RawValue::from_string("1".into()).unwrap(), 5);
        assert_eq!(changed_epoch(m.json()), None);
    }

    #[test]
    fn room_ids_and_messages_are_escaped() {
        let e = membership(Membership::Left, "a\"b", 5);
        assert_eq!(
            e.json(),
            br#"{"type":"user_left","roomId":"a\"b","timestamp":5}"#
        );
        let err = ProtocolError::new(ErrorCode::BadJson, "line\nbreak");
        assert_eq!(
            error(&err).json(),
            br#"{"type":"error","code":"bad_json","message":"line\nbreak"}"#
        );
    }
}
