//! A state room's Fossil deltas, made once per message per room (never per socket).
//!
//! The room keeps, per key, the content it last delivered (the base) and the room's
//! delivery sequence number then. A message of a key with a base becomes a delta frame
//! (`{"type":"message","roomId","key","offset","delta"}`) when that is smaller than the
//! full message, and every delta subscriber that received the base shares it. A
//! subscriber received the base if it was a member when the base was delivered (its
//! `since` is below the base's number): one comparison per subscriber, no per-socket
//! state per key. One that joined later (a snapshot, a replay) gets the key's message in
//! full, which makes it the subscriber's base too; one that came while the room's window
//! held messages (which its snapshot covered, or which came before it) counts from the
//! bases the tick makes of them, so those keys come to it in full first as well. An outbox that conflates a queued
//! delta away swaps the newer delta for its full message (`Encoded::full`), so a delta
//! always applies to what the socket last received.

use std::collections::HashMap;

use bytes::Bytes;

use crate::protocol::{board, outbound, Encoded};

/// Most bases a room keeps (a board's `state_max_keys` bounds the keys anyway; this
/// bounds a room whose class has no board but offers deltas by mistake of config).
const MAX_BASES: usize = 1_000_000;

#[derive(Default)]
pub struct Deltas {
    bases: HashMap<Bytes, Base>,
    /// Messages of a key this room delivered, counted from 1.
    seq: u64,
    /// Scratch for the encoder.
    scratch: Vec<u8>,
}

struct Base {
    content: Bytes,
    seq: u64,
}

/// A message as delta subscribers get it.
pub struct Variant {
    /// The delta frame, or the full message when there is no base, the delta is not
    /// smaller, or the message is no keyed message at all.
    pub frame: Encoded,
    /// The number of the base the delta is against: a subscriber whose `since` is below
    /// it has the base. 0 when `frame` is the full message (anyone may take it).
    pub needs: u64,
}

impl Variant {
    fn full(message: &Encoded) -> Variant {
        Variant {
            frame: message.clone(),
            needs: 0,
        }
    }

    /// What a delta subscriber that came after `since` gets: the delta if it has the
    /// base, else the full message.
    pub(super) fn for_since<'a>(&'a self, since: u64, message: &'a Encoded) -> &'a Encoded {
        if self.needs == 0 || since < self.needs {
            &self.frame
        } else {
            message
        }
    }
}

impl Deltas {
    /// The number a delta subscriber joining now starts after.
    pub(super) fn now(&self) -> u64 {
        self.seq
    }

    /// The bases are of no use any more (no delta subscriber is left): dropped.
    pub(super) fn forget(&mut self) {
        if !self.bases.is_empty() {
            self.bases = HashMap::new();
        }
    }

    /// Makes `message`'s variant for delta subscribers and makes it the key's base.
    pub fn variant(&mut self, room: &str, message: &Encoded) -> Variant {
        let Some(parts) = board::parts(message.json()) else {
            if outbound::changed_epoch(message.json()).is_some() {
                // Clients start their board again in a new epoch: no base holds.
                self.forget();
            }
            return Variant::full(message);
        };
        self.seq += 1;
        // Slices of the message's own bytes: no copy of the key or the content.
        let json = message.json_bytes();
        let key = json.slice_ref(parts.key.as_bytes());
        let Some(content) = parts.content else {
            self.bases.remove(&key);
            return Variant::full(message);
        };
        let content = json.slice_ref(content.as_bytes());
        let base = Base {
            content: content.clone(),
            seq: self.seq,
        };
        let previous = if self.bases.len() < MAX_BASES || self.bases.contains_key(&key) {
            self.bases.insert(key, base)
        } else {
            None
        };
        let Some(previous) = previous else {
            return Variant::full(message);
        };
        fossil_delta::generate_delta(&content, &previous.content, &mut self.scratch);
        match board::delta_frame(room, parts.key, parts.offset, &self.scratch) {
            Some(delta) if delta.wire_len() < message.wire_len() => Variant {
                frame: delta
                    .with_conflation_key(message.conflation_key())
                    .with_full(message),
                needs: previous.seq,
            },
            _ => Variant::full(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn message(last: u64, offset: u64) -> Encoded {
        let content = RawValue::from_string(format!(
            r#"{{"symbol":"ACME","bid":101.25,"ask":101.27,"last":{last},"volume":1234567,"time":"12:00:00.000"}}"#
        ))
        .unwrap();
        outbound::with_offset(&board::message("q", r#""ACME""#, &content, 5).frame, offset)
    }

    #[test]
    fn a_keys_second_message_is_a_smaller_delta_that_applies_to_the_first() {
        let mut d = Deltas::default();
        let first = message(1, 1);
        let v1 = d.variant("q", &first);
        assert_eq!(
            (v1.needs, v1.frame.json()),
            (0, first.json()),
            "no base: full"
        );
        let second = message(2, 2);
        let v2 = d.variant("q", &second);
        assert_eq!(v2.needs, 1);
        assert!(
            v2.frame.wire_len() < second.wire_len() * 6 / 10,
            "{:?}",
            v2.frame
        );
        let delta: serde_json::Value = serde_json::from_slice(v2.frame.json()).unwrap();
        assert_eq!(
            (delta["key"].as_str(), delta["offset"].as_u64()),
            (Some("ACME"), Some(2))
        );
        let base = board::parts(first.json()).unwrap().content.unwrap();
        let applied = fossil_delta::apply(base, delta["delta"].as_str().unwrap()).unwrap();
        assert_eq!(
            applied,
            board::parts(second.json())
                .unwrap()
                .content
                .unwrap()
                .as_bytes()
        );
        // Who has the base: members from before it (since 0) yes; one from after, no.
        assert_eq!(v2.for_since(0, &second).json(), v2.frame.json());
        assert_eq!(v2.for_since(1, &second).json(), second.json());
        // A removal drops the base: the key's next message goes in full.
        let gone = outbound::with_offset(&board::removal("q", r#""ACME""#).frame, 3);
        assert_eq!(d.variant("q", &gone).needs, 0);
        assert_eq!(d.variant("q", &message(3, 4)).needs, 0);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// The encoder on random bases and random edits of them (any bytes): never a
        /// panic, and the delta always rebuilds the target.
        #[test]
        fn fossil_deltas_of_random_edits_rebuild_their_target(
            base in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            edits in proptest::collection::vec((0usize..600, 0usize..40, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)), 0..6),
        ) {
            let mut target = base.clone();
            for (at, cut, insert) in edits {
                let at = at.min(target.len());
                let end = (at + cut).min(target.len());
                target.splice(at..end, insert);
            }
            let mut delta = Vec::new();
            fossil_delta::generate_delta(&target, &base, &mut delta);
            let rebuilt = fossil_delta::apply(&base, &delta).unwrap();
            proptest::prop_assert_eq!(rebuilt, target);
        }
    }
}
