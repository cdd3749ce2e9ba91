//! State rooms' frames: a board's messages, removals, entries and snapshots.
//!
//! A state room's message names its entry: `"key"` is the raw JSON of the content field
//! the room's class names (`state_key`), a string or a number, so `"ACME"` and `42` are
//! entries as a client's `Map` would key them. The frame is laid out so that the board
//! entry (`{"key":K,"content":C,"offset":O}`) is a slice of it plus the offset: an engine
//! builds an entry without parsing the message, and the snapshot is the entries joined.

use std::ops::Range;

use bytes::Bytes;
use serde_json::value::RawValue;

use super::outbound::{Builder, Encoded};
use super::{ErrorCode, ProtocolError};

/// A state room's message on its way to the engine: the frame subscribers get and the
/// entry it writes.
#[derive(Debug, Clone)]
pub struct BoardMessage {
    pub frame: Encoded,
    pub write: BoardWrite,
}

/// What a state room's message does to its board: sets (or removes) the entry `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoardWrite {
    /// The entry's key, as raw JSON (`"ACME"`, `42`): the board's own key.
    pub key: Bytes,
    /// Where `"key":K,"content":C` is in the message frame's JSON; empty for a removal.
    pub span: Range<usize>,
}

impl BoardWrite {
    /// Whether the message removes its entry.
    pub fn is_removal(&self) -> bool {
        self.span.is_empty()
    }

    /// The entry the message (`json`, its frame's JSON) leaves on the board once it has
    /// offset `offset`: `{"key":K,"content":C,"offset":O}`; `None` for a removal.
    pub fn entry(&self, json: &[u8], offset: u64) -> Option<Bytes> {
        if self.is_removal() {
            return None;
        }
        let body = json.get(self.span.clone())?;
        let mut out = Vec::with_capacity(body.len() + 24);
        out.push(b'{');
        out.extend_from_slice(body);
        out.extend_from_slice(br#","offset":"#);
        out.extend_from_slice(itoa::Buffer::new().format(offset).as_bytes());
        out.push(b'}');
        Some(Bytes::from(out))
    }
}

/// The key a state room's message names: the raw JSON of `content[field]`, a string or
/// a number. Anything else is the publisher's mistake, named.
pub fn entry_key<'a>(content: &'a RawValue, field: &str) -> Result<&'a str, ProtocolError> {
    #[derive(serde::Deserialize)]
    struct Fields<'a>(
        #[serde(borrow)] std::collections::HashMap<std::borrow::Cow<'a, str>, &'a RawValue>,
    );
    let invalid = |why: String| ProtocolError::new(ErrorCode::InvalidField, why);
    let Ok(Fields(fields)) = serde_json::from_str::<Fields<'_>>(content.get()) else {
        return Err(invalid(format!(
            "a state room's content must be an object with the field {field:?} naming its entry"
        )));
    };
    let Some(value) = fields.get(field) else {
        return Err(ProtocolError::new(
            ErrorCode::MissingField,
            format!("content.{field} is required in a state room's message: it names the entry"),
        ));
    };
    let raw = value.get();
    if raw.starts_with('"') || raw.starts_with('-') || raw.starts_with(|c: char| c.is_ascii_digit())
    {
        Ok(raw)
    } else {
        Err(invalid(format!(
            "content.{field} names a state room's entry: it must be a string or a number"
        )))
    }
}

/// `{"type":"message","roomId":R,"key":K,"content":C,"timestamp":MS}`: a state room's
/// message (the engine adds its offset).
pub fn message(room: &str, key: &str, content: &RawValue, timestamp_ms: u64) -> BoardMessage {
    let content = content.get().as_bytes();
    let mut b = Builder::with_capacity(64 + room.len() + key.len() + content.len());
    b.raw(br#"{"type":"message","roomId":"#)
        .string(room)
        .raw(b",");
    let start = b.json_len();
    b.raw(br#""key":"#)
        .raw(key.as_bytes())
        .raw(br#","content":"#)
        .raw(content);
    let end = b.json_len();
    b.raw(br#","timestamp":"#).number(timestamp_ms).raw(b"}");
    BoardMessage {
        frame: b.finish(),
        write: BoardWrite {
            key: Bytes::copy_from_slice(key.as_bytes()),
            span: start..end,
        },
    }
}

/// `{"type":"message","roomId":R,"key":K,"removed":true}`: a state room's entry left (the
/// engine adds its offset).
pub fn removal(room: &str, key: &str) -> BoardMessage {
    let mut b = Builder::with_capacity(64 + room.len() + key.len());
    b.raw(br#"{"type":"message","roomId":"#)
        .string(room)
        .raw(br#","key":"#)
        .raw(key.as_bytes())
        .raw(br#","removed":true}"#);
    BoardMessage {
        frame: b.finish(),
        write: BoardWrite {
            key: Bytes::copy_from_slice(key.as_bytes()),
            span: 0..0,
        },
    }
}

/// `{"type":"snapshot","roomId":R,"epoch":E,"offset":O,"entries":[...]}`, with
/// `"recovered":false` when a `since` join could not be served from the history: the
/// board at offset O; every message after O follows.
pub fn snapshot(
    room: &str,
    epoch: &str,
    offset: u64,
    entries: &[Bytes],
    recovered: Option<bool>,
) -> Encoded {
    let body: usize = entries.iter().map(|e| e.len() + 1).sum();
    let mut b = Builder::with_capacity(96 + room.len() + epoch.len() + body);
    b.raw(br#"{"type":"snapshot","roomId":"#)
        .string(room)
        .raw(br#","epoch":"#)
        .string(epoch)
        .raw(br#","offset":"#)
        .number(offset)
        .raw(br#","entries":"#)
        .list(entries.iter().map(|e| &e[..]))
        .end_recovered(recovered);
    b.finish()
}

/// What a delta needs of a state room's message frame (with its offset): the entry's
/// key (raw JSON), its content (raw JSON; `None` for a removal) and its offset. `None` for
/// any other frame (a notice, a plain message).
pub struct Parts<'a> {
    pub key: &'a str,
    pub content: Option<&'a str>,
    pub offset: u64,
}

/// Reads a state room's message frame (one parse, borrowing).
pub fn parts(json: &[u8]) -> Option<Parts<'_>> {
    #[derive(serde::Deserialize)]
    struct Frame<'a> {
        #[serde(rename = "type")]
        ty: &'a str,
        #[serde(borrow)]
        key: Option<&'a RawValue>,
        #[serde(borrow)]
        content: Option<&'a RawValue>,
        removed: Option<bool>,
        offset: Option<u64>,
    }
    let frame: Frame<'_> = serde_json::from_slice(json).ok()?;
    if frame.ty != "message" {
        return None;
    }
    let content = match (frame.content, frame.removed) {
        (_, Some(true)) => None,
        (Some(content), _) => Some(content.get()),
        (None, _) => return None,
    };
    Some(Parts {
        key: frame.key?.get(),
        content,
        offset: frame.offset?,
    })
}

/// `{"type":"message","roomId":R,"key":K,"offset":O,"delta":D}`: a state room's message
/// as the Fossil delta of its content against the key's previous content. `None` when the
/// delta is not text (a copy cut a UTF-8 character): the full message goes instead.
pub fn delta_frame(room: &str, key: &str, offset: u64, delta: &[u8]) -> Option<Encoded> {
    let delta = std::str::from_utf8(delta).ok()?;
    let mut b = Builder::with_capacity(64 + room.len() + key.len() + delta.len());
    b.raw(br#"{"type":"message","roomId":"#)
        .string(room)
        .raw(br#","key":"#)
        .raw(key.as_bytes())
        .raw(br#","offset":"#)
        .number(offset)
        .raw(br#","delta":"#)
        .string(delta)
        .raw(b"}");
    Some(b.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::outbound::{offset_of, with_offset};

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.into()).unwrap()
    }

    #[test]
    fn a_board_message_carries_its_key_and_its_entry_is_a_slice_of_it() {
        let content = raw(r#"{"symbol":"ACME","bid":1.5}"#);
        let key = entry_key(&content, "symbol").unwrap();
        assert_eq!(key, r#""ACME""#);
        let m = message("quotes", key, &content, 7);
        assert_eq!(
            m.frame.json(),
            br#"{"type":"message","roomId":"quotes","key":"ACME","content":{"symbol":"ACME","bid":1.5},"timestamp":7}"#
        );
        assert_eq!(
            &m.write.entry(m.frame.json(), 12).unwrap()[..],
            br#"{"key":"ACME","content":{"symbol":"ACME","bid":1.5},"offset":12}"#
        );
        let gone = removal("quotes", key);
        assert!(gone.write.is_removal() && gone.write.entry(gone.frame.json(), 3).is_none());
        assert_eq!(
            with_offset(&gone.frame, 13).json(),
            br#"{"type":"message","roomId":"quotes","key":"ACME","removed":true,"offset":13}"#
        );
        assert_eq!(offset_of(with_offset(&m.frame, 12).json()), Some(12));
    }

    #[test]
    fn a_board_message_is_read_back_into_its_parts_and_a_delta_frame_names_them() {
        let content = raw(r#"{"symbol":"ACME","bid":1.5}"#);
        let m = message("quotes", r#""ACME""#, &content, 7);
        let full = with_offset(&m.frame, 12);
        let p = parts(full.json()).unwrap();
        assert_eq!(
            (p.key, p.content, p.offset),
            (r#""ACME""#, Some(content.get()), 12)
        );
        let gone = with_offset(&removal("quotes", "42").frame, 13);
        let p = parts(gone.json()).unwrap();
        assert_eq!((p.key, p.content, p.offset), ("42", None, 13));
        let notice = br#"{"type":"user_joined","roomId":"quotes","timestamp":1}"#;
        assert!(parts(notice).is_none());
        assert!(parts(br#"{"type":"message","roomId":"r","content":1,"offset":3}"#).is_none());
        let d = delta_frame("quotes", r#""ACME""#, 14, b"1x\n\"q;").unwrap();
        assert_eq!(
            d.json(),
            br#"{"type":"message","roomId":"quotes","key":"ACME","offset":14,"delta":"1x\n\"q;"}"#
        );
        assert!(
            delta_frame("q", "1", 1, &[0xe2, 0x82]).is_none(),
            "not text"
        );
    }

    #[test]
    fn keys_are_strings_or_numbers_and_their_absence_is_named() {
        assert_eq!(entry_key(&raw(r#"{"id":42}"#), "id").unwrap(), "42");
        let e = entry_key(&raw(r#"{"x":1}"#), "id").unwrap_err();
        assert_eq!(e.code, ErrorCode::MissingField);
        assert!(e.message.contains("content.id"), "{}", e.message);
        for bad in [
            r#"{"id":null}"#,
            r#"{"id":[1]}"#,
            r#"{"id":{}}"#,
            "3",
            r#""s""#,
        ] {
            let e = entry_key(&raw(bad), "id").unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidField, "{bad}");
        }
    }

    #[test]
    fn a_snapshot_joins_its_entries_and_says_when_it_replaces_a_recovery() {
        let entries = [Bytes::from_static(br#"{"key":"a","content":1,"offset":2}"#)];
        assert_eq!(
            snapshot("r", "e", 5, &entries, None).json(),
            br#"{"type":"snapshot","roomId":"r","epoch":"e","offset":5,"entries":[{"key":"a","content":1,"offset":2}]}"#
        );
        assert_eq!(
            snapshot("r", "e", 0, &[], Some(false)).json(),
            br#"{"type":"snapshot","roomId":"r","epoch":"e","offset":0,"entries":[],"recovered":false}"#
        );
    }
}
