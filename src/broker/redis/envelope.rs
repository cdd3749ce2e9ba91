//! The Redis envelopes, shared with the reference Node.js servers (channel and key
//! names are in `keys`).
//!
//! Out: `{"serverId":S,"payload":P}` (single) or `{"serverId":S,"batch":[P1,...]}` (batch),
//! written by splicing the already-encoded frames P between fixed bytes: no payload is
//! ever parsed or re-serialized on the way out. In: both shapes are accepted; each P is
//! borrowed as raw JSON from the received message and framed once for the local sockets.
//!
//! A durable room's messages are published by the append script (`durable`), whose
//! envelope says so itself: `{"serverId":S,"epoch":E,"payload":P}` (or `"batch"`), E the
//! room's epoch. Whether an envelope is durable is read from that field, never guessed
//! from the payload: a broadcast's payload is whatever its publisher sent.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

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

    /// `{"serverId":S,`: what every envelope of this node starts with.
    pub fn head(&self) -> &[u8] {
        &self.head
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
    /// The room's epoch, on a durable room's messages (the append script's envelopes)
    /// only: their payloads end with their offsets.
    pub epoch: Option<Cow<'a, str>>,
    pub payloads: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "serverId", borrow, default)]
    server_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    epoch: Option<Cow<'a, str>>,
    /// `null` is a payload (a broadcast of `null`), not a missing one.
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    batch: Option<Vec<&'a RawValue>>,
}

/// A field that is there, whatever its value: serde's `Option` would take `null` for
/// absent.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
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
        epoch: wire.epoch,
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
        let reference = br#"{"serverId":"server-4242","payload":{"type":"user_joined","roomId":"7","timestamp":5}}"#;
        assert_eq!(
            decode(reference, 10).unwrap().server_id.as_deref(),
            Some("server-4242")
        );
        assert!(decode(b"not json", 10).is_err());
        assert!(decode(br#"{"serverId":"a"}"#, 10).is_err());
        assert!(decode(br#"{"serverId":"a","payload":1,"batch":[2]}"#, 10).is_err());
        assert!(decode(br#"{"serverId":"a","batch":[1,2,3]}"#, 3).is_ok());
        assert!(decode(br#"{"serverId":"a","batch":[1,2,3,4]}"#, 3).is_err());
    }

    #[test]
    fn durable_envelopes_say_so_and_payloads_cannot() {
        // A broadcast whose payload looks like a durable message is still plain.
        let broadcast = br#"{"serverId":"n1","payload":{"a":1,"offset":7}}"#;
        assert_eq!(decode(broadcast, 10).unwrap().epoch, None);
        let null = decode(br#"{"serverId":"n1","payload":null}"#, 10).unwrap();
        assert_eq!(null.payloads[0].get(), "null", "a broadcast of null");
        let durable = br#"{"serverId":"n1","epoch":"1700-5","payload":{"type":"message","roomId":"r","content":1,"timestamp":1,"offset":7}}"#;
        assert_eq!(
            decode(durable, 10).unwrap().epoch.as_deref(),
            Some("1700-5")
        );
    }
}
