//! What arrives on the engine's subscriptions: envelopes decoded once and bounded, the
//! node's own echo dropped (known from the envelope), durable messages put in their
//! room's order, presence changes and probes.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use super::{decode, presence, Core};
use crate::broker::{Envelope, Kind, Target};
use crate::protocol::{now_ms, outbound, Encoded};
use crate::throttle::LogThrottle;

impl Core {
    /// One message from a subscribed channel.
    pub(super) fn on_message(self: &Arc<Self>, channel: &[u8], message: &[u8]) {
        if channel == self.keys.probe.as_bytes() {
            self.on_probe(message);
            return;
        }
        if channel == self.keys.presence_updates.as_bytes() {
            if let (Some(event), Some(sink)) = (presence::event(message), self.sink()) {
                sink.presence(event);
            }
            return;
        }
        let target = if channel == self.keys.broadcast.as_bytes() {
            Target::Broadcast
        } else if let Some(room) = self.keys.room_of(channel) {
            Target::Room(Arc::from(room))
        } else if let Some(user) = self.keys.user_of(channel) {
            Target::User(Arc::from(user))
        } else {
            return;
        };
        let inbound = match decode(message, self.inbound.max_messages) {
            Ok(inbound) => inbound,
            Err(e) => {
                self.counters.bad_envelopes.fetch_add(1, Relaxed);
                static LOG: LogThrottle = LogThrottle::new(Duration::from_secs(10));
                if let Some(held_back) = LOG.allow() {
                    tracing::warn!(channel = %String::from_utf8_lossy(channel), held_back, "dropping a message from Redis: {e}");
                }
                return;
            }
        };
        // Our own envelopes were delivered locally when they were published; durable
        // messages come back to their origin too (the origin did not deliver them: they
        // get their offsets in Redis). Which ones are durable, the envelope says (only
        // the append script writes an epoch), never the payload a user chose.
        let own = inbound.server_id.as_deref() == Some(&*self.node_id);
        let durable = match (&target, inbound.epoch.as_deref()) {
            (Target::Room(room), Some(epoch)) => Some((room, epoch)),
            _ => None,
        };
        if own && durable.is_none() {
            return;
        }
        self.counters.received_envelopes.fetch_add(1, Relaxed);
        let Some(sink) = self.sink() else {
            return;
        };
        let origin: Arc<str> = Arc::from(inbound.server_id.as_deref().unwrap_or("unknown"));
        for payload in inbound.payloads {
            let json = payload.get().as_bytes();
            if json.len() > self.inbound.max_payload_bytes {
                self.counters.oversized_payloads.fetch_add(1, Relaxed);
                static LOG: LogThrottle = LogThrottle::new(Duration::from_secs(10));
                if let Some(held_back) = LOG.allow() {
                    tracing::warn!(
                        channel = %String::from_utf8_lossy(channel),
                        bytes = json.len(),
                        limit = self.inbound.max_payload_bytes,
                        held_back,
                        "dropping a message from Redis over limits.max_frame_bytes"
                    );
                }
                continue;
            }
            let payload = Encoded::from_json(json);
            match durable {
                Some((room, epoch)) => match outbound::offset_of(json) {
                    Some(offset) if offset > 0 => self
                        .positions
                        .receive(self, room, epoch, &origin, offset, payload),
                    _ => {
                        self.counters.bad_envelopes.fetch_add(1, Relaxed);
                        static LOG: LogThrottle = LogThrottle::new(Duration::from_secs(10));
                        if let Some(held_back) = LOG.allow() {
                            tracing::warn!(channel = %String::from_utf8_lossy(channel), held_back, "dropping a durable room's message without an offset");
                        }
                    }
                },
                None => sink.deliver(Envelope::new(
                    origin.clone(),
                    target.clone(),
                    payload,
                    Kind::Message,
                )),
            }
        }
    }

    /// A probe on this node's channel: its own (the subscription works), or another
    /// instance's (another node has this node's id).
    fn on_probe(&self, message: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Probe {
            probe: u64,
            instance: Option<u64>,
        }
        let Ok(probe) = serde_json::from_slice::<Probe>(message) else {
            return;
        };
        match probe.instance {
            Some(other) if other != self.instance => {
                let before = self.duplicate_seen_ms.swap(now_ms(), Relaxed);
                static LOG: LogThrottle = LogThrottle::new(Duration::from_secs(10));
                if let Some(held_back) = LOG.allow() {
                    tracing::error!(
                        node = %self.node_id,
                        held_back,
                        first = before == 0,
                        "another live node uses this node's id (server.node_id / SERVER_ID): the two drop each other's messages; not ready until one is renamed"
                    );
                }
            }
            _ => {
                self.probe_seen.fetch_max(probe.probe, Relaxed);
            }
        }
    }
}
