//! Server-Sent Events (the WHATWG `text/event-stream` format): a frame as an event, and
//! the stream's durable positions as its `id`.
//!
//! An SSE stream carries the JSON a WebSocket would get, one event per frame:
//! `event: <type>`, `data: <json>`, and, after a frame that moved a durable room's
//! position, `id: <positions>`: the epoch and last offset of every durable room of the
//! stream. A browser's `EventSource` keeps the last id it saw and sends it back as
//! `Last-Event-ID` when it reconnects by itself; the node resumes every room from it.
//!
//! The positions are read from the frames as volley's own encoder wrote them, without a
//! parse: a message's offset is its last field (`outbound::with_offset`), a history or
//! snapshot frame starts `{"type":T,"roomId":R,"epoch":E,"offset":O`, and a room's framed
//! window is a batch of one room's messages. Only a batch that holds an `epoch_changed`
//! (rare: Redis lost the room mid-window) is parsed whole.

use std::collections::BTreeMap;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};

use super::outbound::offset_of;

/// What a room's name and epoch escape in an id: the separators, `%`, and whatever a
/// field line cannot carry (non-ASCII is always escaped).
const ID_ESCAPES: &AsciiSet = &CONTROLS.add(b' ').add(b'%').add(b',').add(b':');

/// A comment line: keeps proxies and the browser from timing the stream out.
pub const PING: &[u8] = b": ping\n\n";

/// One durable room's place in a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: String,
    pub offset: u64,
}

/// The durable positions of one stream, by room, and the id that names them all.
#[derive(Debug, Default, Clone)]
pub struct Positions {
    rooms: BTreeMap<String, Position>,
    /// The id for `rooms`, made when first asked for after a change.
    id: Option<String>,
}

impl Positions {
    /// The positions a `Last-Event-ID` names: `room:epoch:offset` per durable room,
    /// separated by commas, room and epoch percent-encoded. A part that does not read
    /// is left out (that room starts afresh): an id is the client's word, never trusted
    /// for more than where to resume.
    pub fn parse(id: &str) -> Positions {
        let mut rooms = BTreeMap::new();
        for part in id.trim().split(',') {
            let mut fields = part.rsplitn(3, ':');
            let (Some(offset), Some(epoch), Some(room)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let decode = |s: &str| {
                percent_decode_str(s)
                    .decode_utf8()
                    .ok()
                    .map(|s| s.into_owned())
            };
            let (Ok(offset), Some(epoch), Some(room)) =
                (offset.parse::<u64>(), decode(epoch), decode(room))
            else {
                continue;
            };
            if !room.is_empty() {
                rooms.insert(room, Position { epoch, offset });
            }
        }
        Positions { rooms, id: None }
    }

    pub fn get(&self, room: &str) -> Option<&Position> {
        self.rooms.get(room)
    }

    /// Keeps only the rooms `keep` says yes to (a resumed stream's own rooms).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.rooms.retain(|room, _| keep(room));
        self.id = None;
    }

    /// The id naming every position (empty when there is none).
    pub fn id(&mut self) -> &str {
        let rooms = &self.rooms;
        self.id.get_or_insert_with(|| {
            let mut id = String::new();
            for (room, p) in rooms {
                if !id.is_empty() {
                    id.push(',');
                }
                id.extend(utf8_percent_encode(room, ID_ESCAPES));
                id.push(':');
                id.extend(utf8_percent_encode(&p.epoch, ID_ESCAPES));
                id.push(':');
                id.push_str(itoa::Buffer::new().format(p.offset));
            }
            id
        })
    }

    /// Follows one frame of the stream; true when a durable position moved.
    pub fn follow(&mut self, json: &[u8]) -> bool {
        let Some((kind, rest)) = type_of(json) else {
            return false;
        };
        match kind {
            b"message" => match (room_of(rest), offset_of(json)) {
                (Some(room), Some(offset)) => self.advance(&room, offset),
                _ => false,
            },
            b"history" | b"snapshot" => {
                let Some((room, epoch, offset)) = reset_of(rest) else {
                    return false;
                };
                self.set(room, Position { epoch, offset })
            }
            b"epoch_changed" => match (room_of(rest), field_string(json, br#","epoch":"#)) {
                (Some(room), Some(epoch)) => self.set(room, Position { epoch, offset: 0 }),
                _ => false,
            },
            b"batch" => self.follow_batch(json),
            _ => false,
        }
    }

    /// A room's framed window: one room's messages, the newest last. A batch that holds
    /// an epoch change is read item by item.
    fn follow_batch(&mut self, json: &[u8]) -> bool {
        if memchr::memmem::find(json, br#""type":"epoch_changed""#).is_some() {
            return self.follow_items(json);
        }
        let first = json
            .strip_prefix(br#"{"type":"batch","messages":["#)
            .and_then(type_of);
        let last = json.strip_suffix(b"]}").and_then(offset_of);
        match (first.and_then(|(_, rest)| room_of(rest)), last) {
            (Some(room), Some(offset)) => self.advance(&room, offset),
            _ => false,
        }
    }

    fn follow_items(&mut self, json: &[u8]) -> bool {
        #[derive(serde::Deserialize)]
        struct Batch<'a> {
            #[serde(borrow)]
            messages: Vec<&'a serde_json::value::RawValue>,
        }
        let Ok(batch) = serde_json::from_slice::<Batch<'_>>(json) else {
            return false;
        };
        let mut moved = false;
        for item in batch.messages {
            moved |= self.follow(item.get().as_bytes());
        }
        moved
    }

    /// A message at `offset` in a room whose epoch this stream knows.
    fn advance(&mut self, room: &str, offset: u64) -> bool {
        match self.rooms.get_mut(room) {
            Some(p) if offset > p.offset => {
                p.offset = offset;
                self.id = None;
                true
            }
            _ => false,
        }
    }

    fn set(&mut self, room: String, position: Position) -> bool {
        self.id = None;
        self.rooms.insert(room, position);
        true
    }
}

/// Appends one event: `event:` the frame's type, the JSON as `data:` lines (a line break
/// in it, which JSON allows only between tokens, starts another `data:` line, and the
/// browser joins them with `\n` again), and `id:` when given.
pub fn write_event(out: &mut impl bytes::BufMut, json: &[u8], id: Option<&str>) {
    out.put_slice(b"event: ");
    let kind = match type_of(json) {
        Some((kind, _)) if !kind.contains(&b'\\') => kind,
        _ => b"message",
    };
    out.put_slice(kind);
    out.put_slice(b"\ndata: ");
    let mut rest = json;
    while let Some(at) = memchr::memchr2(b'\n', b'\r', rest) {
        out.put_slice(&rest[..at]);
        out.put_slice(b"\ndata: ");
        let skip = if rest[at] == b'\r' && rest.get(at + 1) == Some(&b'\n') {
            2
        } else {
            1
        };
        rest = &rest[at + skip..];
    }
    out.put_slice(rest);
    out.put_u8(b'\n');
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
}

/// A frame's type and what follows it: `{"type":"T"` then the rest.
fn type_of(json: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = json.strip_prefix(br#"{"type":""#)?;
    let end = memchr::memchr(b'"', rest)?;
    Some((&rest[..end], &rest[end + 1..]))
}

/// The room named right after the type: `,"roomId":"R"`.
fn room_of(rest: &[u8]) -> Option<String> {
    let (room, _) = string_at(rest.strip_prefix(br#","roomId":"#)?)?;
    Some(room)
}

/// A history or snapshot frame's room, epoch and offset, from its head.
fn reset_of(rest: &[u8]) -> Option<(String, String, u64)> {
    let (room, rest) = string_at(rest.strip_prefix(br#","roomId":"#)?)?;
    let (epoch, rest) = string_at(rest.strip_prefix(br#","epoch":"#)?)?;
    let rest = rest.strip_prefix(br#","offset":"#)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let offset = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    Some((room, epoch, offset))
}

/// The string value of the first `field` (`,"name":`) in a flat frame.
fn field_string(json: &[u8], field: &[u8]) -> Option<String> {
    let at = memchr::memmem::find(json, field)?;
    string_at(&json[at + field.len()..]).map(|(s, _)| s)
}

/// A JSON string at the start of `bytes`, decoded, and what follows it.
fn string_at(bytes: &[u8]) -> Option<(String, &[u8])> {
    if bytes.first() != Some(&b'"') {
        return None;
    }
    let mut escaped = false;
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => {
                escaped = true;
                i += 1;
            }
            b'"' => break,
            _ => {}
        }
        i += 1;
    }
    let token = bytes.get(..=i)?;
    let value = if escaped {
        serde_json::from_slice(token).ok()?
    } else {
        String::from_utf8(token[1..token.len() - 1].to_vec()).ok()?
    };
    Some((value, &bytes[i + 1..]))
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;
    use crate::protocol::{board, outbound};

    fn message(room: &str, offset: u64) -> outbound::Encoded {
        let content = RawValue::from_string(r#"{"score":"1-0","roomId":"x"}"#.into()).unwrap();
        outbound::with_offset(&outbound::room_message(room, &content, 5), offset)
    }

    #[test]
    fn positions_follow_the_frames_volley_writes() {
        let mut p = Positions::default();
        let room = "scores:\"cup\", final";
        assert!(!p.follow(message(room, 3).json()), "no epoch known yet");
        let history = outbound::history(room, "e1", Some(7), &[message(room, 7)], None);
        assert!(p.follow(history.json()));
        assert_eq!(
            p.get(room),
            Some(&Position {
                epoch: "e1".into(),
                offset: 7
            })
        );
        assert!(p.follow(message(room, 8).json()));
        assert!(!p.follow(message(room, 8).json()), "not past the position");
        let batch = [message(room, 9), message(room, 10)];
        let json: Vec<&[u8]> = batch.iter().map(|m| m.json()).collect();
        let batch = [
            br#"{"type":"batch","messages":["#.as_slice(),
            &json.join(&b','),
            b"]}",
        ]
        .concat();
        assert!(p.follow(&batch));
        assert_eq!(p.get(room).unwrap().offset, 10);
        assert!(p.follow(outbound::epoch_changed(room, "e2").json()));
        assert_eq!(
            p.get(room),
            Some(&Position {
                epoch: "e2".into(),
                offset: 0
            })
        );
        let snap = board::snapshot("ticker", "e9", 42, &[], None);
        assert!(p.follow(snap.json()));
        assert_eq!(p.get("ticker").unwrap().offset, 42);
        let plain = outbound::room_message("lobby", &RawValue::from_string("1".into()).unwrap(), 1);
        assert!(!p.follow(plain.json()));
        assert!(p.get("lobby").is_none());
    }

    #[test]
    fn a_batch_with_an_epoch_change_is_read_item_by_item() {
        let mut p = Positions::default();
        p.follow(outbound::history("r", "e1", Some(4), &[], None).json());
        let items = [
            message("r", 5).json().to_vec(),
            outbound::epoch_changed("r", "e2").json().to_vec(),
            message("r", 1).json().to_vec(),
        ];
        let batch = [
            br#"{"type":"batch","messages":["#.to_vec(),
            items.join(&b','),
            b"]}".to_vec(),
        ]
        .concat();
        assert!(p.follow(&batch));
        assert_eq!(
            p.get("r"),
            Some(&Position {
                epoch: "e2".into(),
                offset: 1
            })
        );
    }

    #[test]
    fn an_id_names_every_position_and_reads_back() {
        let mut p = Positions::default();
        p.follow(outbound::history("a,b:c %d é", "1700-5", Some(3), &[], None).json());
        p.follow(outbound::history("z", "", Some(0), &[], None).json());
        let id = p.id().to_string();
        assert!(!id.contains(['\n', '\r', ' ']), "{id}");
        let back = Positions::parse(&id);
        assert_eq!(
            back.get("a,b:c %d é"),
            Some(&Position {
                epoch: "1700-5".into(),
                offset: 3
            })
        );
        assert_eq!(
            back.get("z"),
            Some(&Position {
                epoch: String::new(),
                offset: 0
            })
        );
        let garbled = Positions::parse("x:e:notanumber,,:::,%ff:e:1,ok:e:2");
        assert_eq!(garbled.rooms.len(), 1);
        assert_eq!(garbled.get("ok").unwrap().offset, 2);
    }

    #[test]
    fn an_event_carries_the_type_the_data_and_the_id() {
        let mut out = Vec::new();
        write_event(&mut out, message("r", 2).json(), Some("r:e:2"));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "event: message\ndata: {\"type\":\"message\",\"roomId\":\"r\",\"content\":{\"score\":\"1-0\",\"roomId\":\"x\"},\"timestamp\":5,\"offset\":2}\nid: r:e:2\n\n"
        );
        let mut out = Vec::new();
        write_event(
            &mut out,
            b"{\"type\":\"message\",\r\n\"content\":\n1}",
            None,
        );
        assert_eq!(
            out,
            b"event: message\ndata: {\"type\":\"message\",\ndata: \"content\":\ndata: 1}\n\n"
        );
    }
}
