//! The Redis wire format, shared with the Node.js servers of the article.
//!
//! Out: `{"serverId":S,"payload":P}` (single) or `{"serverId":S,"batch":[P1,...]}` (batch),
//! written by splicing the already-encoded frames P between fixed bytes: no payload is
//! ever parsed or re-serialized on the way out. In: both shapes are accepted; each P is
//! borrowed as raw JSON from the received message and framed once for the local sockets.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// Channel names, with the configured prefix.
#[derive(Debug, Clone)]
pub struct Channels {
    room_prefix: String,
    probe_prefix: String,
    pub broadcast: String,
    /// This node's probe channel.
    pub probe: String,
    /// Sorted set of live node ids, scored by when each stops counting as alive.
    pub alive: String,
}

impl Channels {
    pub fn new(prefix: &str, node_id: &str) -> Channels {
        let probe_prefix = format!("{prefix}volley:probe:");
        Channels {
            room_prefix: format!("{prefix}room:"),
            broadcast: format!("{prefix}websocket:broadcast"),
            probe: format!("{probe_prefix}{node_id}"),
            alive: format!("{prefix}volley:alive"),
            probe_prefix,
        }
    }

    /// Another node's probe channel.
    pub fn probe_of(&self, node_id: &str) -> String {
        format!("{}{node_id}", self.probe_prefix)
    }

    pub fn room(&self, room: &str) -> String {
        let mut name = String::with_capacity(self.room_prefix.len() + room.len());
        name.push_str(&self.room_prefix);
        name.push_str(room);
        name
    }

    /// The room of a `room:<id>` channel.
    pub fn room_of<'a>(&self, channel: &'a [u8]) -> Option<&'a str> {
        channel
            .strip_prefix(self.room_prefix.as_bytes())
            .and_then(|room| std::str::from_utf8(room).ok())
            .filter(|room| !room.is_empty())
    }
}

/// Writes envelopes for one node.
#[derive(Debug, Clone)]
pub struct EnvelopeWriter {
    /// `{"serverId":"S",` with S escaped, written once.
    head: Vec<u8>,
}

impl EnvelopeWriter {
    pub fn new(node_id: &str) -> EnvelopeWriter {
        let mut head = br#"{"serverId":"#.to_vec();
        // Serializing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut head, node_id);
        head.push(b',');
        EnvelopeWriter { head }
    }

    /// `{"serverId":S,"payload":P}`
    pub fn single(&self, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.head.len() + 12 + payload.len());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(br#""payload":"#);
        out.extend_from_slice(payload);
        out.push(b'}');
        out
    }

    /// `{"serverId":S,"batch":[P1,P2,...]}`
    pub fn batch<'a>(&self, payloads: impl Iterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
        let body: usize = payloads.clone().map(|p| p.len() + 1).sum();
        let mut out = Vec::with_capacity(self.head.len() + 12 + body);
        out.extend_from_slice(&self.head);
        out.extend_from_slice(br#""batch":["#);
        for (i, p) in payloads.enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(p);
        }
        out.extend_from_slice(b"]}");
        out
    }
}

/// An envelope received from Redis, borrowing from the message.
#[derive(Debug)]
pub struct Inbound<'a> {
    /// The publishing node; `None` for a publisher that gives none.
    pub server_id: Option<Cow<'a, str>>,
    pub payloads: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "serverId", borrow, default)]
    server_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    batch: Option<Vec<&'a RawValue>>,
}

/// Reads either envelope shape; an envelope of more than `max_messages` messages is
/// refused whole.
pub fn decode(message: &[u8], max_messages: usize) -> Result<Inbound<'_>, String> {
    let wire: Wire<'_> =
        serde_json::from_slice(message).map_err(|e| format!("not an envelope: {e}"))?;
    let payloads = match (wire.payload, wire.batch) {
        (Some(p), None) => vec![p],
        (None, Some(batch)) => batch,
        (Some(_), Some(_)) => return Err("envelope has both payload and batch".into()),
        (None, None) => return Err("envelope has neither payload nor batch".into()),
    };
    if payloads.len() > max_messages {
        return Err(format!(
            "envelope of {} messages, over redis.max_envelope_messages ({max_messages})",
            payloads.len()
        ));
    }
    Ok(Inbound {
        server_id: wire.server_id,
        payloads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shapes_round_trip_byte_for_byte() {
        let w = EnvelopeWriter::new("server-1");
        let p1 = br#"{"type":"message","roomId":"r","content":{"a":1.50},"timestamp":1}"#;
        let p2 = br#"{"x":[1,2]}"#;
        let single = w.single(p1);
        assert_eq!(
            single,
            br#"{"serverId":"server-1","payload":{"type":"message","roomId":"r","content":{"a":1.50},"timestamp":1}}"#
        );
        let back = decode(&single, 10).unwrap();
        assert_eq!(back.server_id.as_deref(), Some("server-1"));
        assert_eq!(back.payloads[0].get().as_bytes(), p1);

        let batch = w.batch([&p1[..], &p2[..]].into_iter());
        let back = decode(&batch, 10).unwrap();
        assert_eq!(back.payloads.len(), 2);
        assert_eq!(back.payloads[1].get().as_bytes(), p2);
    }

    #[test]
    fn foreign_and_broken_envelopes() {
        let article = br#"{"serverId":"server-4242","payload":{"type":"user_joined","roomId":"7","timestamp":5}}"#;
        assert_eq!(
            decode(article, 10).unwrap().server_id.as_deref(),
            Some("server-4242")
        );
        assert!(decode(b"not json", 10).is_err());
        assert!(decode(br#"{"serverId":"a"}"#, 10).is_err());
        assert!(decode(br#"{"serverId":"a","payload":1,"batch":[2]}"#, 10).is_err());
        assert!(decode(br#"{"serverId":"a","batch":[1,2,3]}"#, 3).is_ok());
        assert!(decode(br#"{"serverId":"a","batch":[1,2,3,4]}"#, 3).is_err());
    }

    #[test]
    fn room_channels_keep_their_prefix() {
        let c = Channels::new("app1:", "n1");
        assert_eq!(c.room("42"), "app1:room:42");
        assert_eq!(c.room_of(b"app1:room:42"), Some("42"));
        assert_eq!(c.room_of(b"room:42"), None);
        assert_eq!(c.broadcast, "app1:websocket:broadcast");
    }
}
