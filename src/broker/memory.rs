//! The embedded broker: nodes in one process sharing rooms through a `MemoryBus`.
//!
//! A standalone node gets a bus of its own, where publishing reaches nobody else: the
//! node has already served its sockets. Several nodes built on one shared bus behave like
//! nodes on one Redis: envelopes go to the other nodes subscribed to the room (or to all,
//! for broadcasts), never back to their origin, and carry the already-encoded frame, so
//! nothing is serialized on the way.
//!
//! Durable rooms keep their history in a `Ring` per room on the bus, shared by its nodes
//! as a Redis stream would be: a durable message gets its offset there and is delivered,
//! under the ring's lock, to every node in the room (its origin too), so all see one
//! order, and a history query sees exactly what was delivered before it. A query of a
//! room without a ring (or with an expired one) answers the empty history and creates
//! nothing, as on Redis.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::{Mutex, RwLock};

use super::ring::Ring;
use super::{
    BoxFuture, Broker, BrokerState, Envelope, EnvelopeSink, Health, History, HistoryFuture, Kind,
    Ledger, OnlineUsers, Presence, PresenceError, PresenceEvent, PublishError, Reports, Target,
    UserPresence,
};
use crate::config::Durability;
use crate::metrics::Stats;
use crate::protocol::inbound::Replay;
use crate::protocol::Encoded;

/// An in-process message bus shared by the nodes built on it.
#[derive(Default)]
pub struct MemoryBus {
    members: RwLock<Vec<Arc<Member>>>,
    /// Durable rooms' histories.
    rings: Mutex<HashMap<Arc<str>, Arc<Mutex<Ring>>>>,
}

impl MemoryBus {
    /// The room's ring for a read: none when it is missing or its history expired (a read
    /// creates nothing).
    fn existing_ring(&self, room: &str, now: Instant) -> Option<Arc<Mutex<Ring>>> {
        let ring = self.rings.lock().get(room)?.clone();
        let expired = ring.lock().expired(now);
        (!expired).then_some(ring)
    }

    /// The room's ring for a publish, started anew when it is missing or its history
    /// expired.
    fn ring(&self, room: &Arc<str>, durability: Durability, now: Instant) -> Arc<Mutex<Ring>> {
        let mut rings = self.rings.lock();
        // Expired histories of rooms nobody touches again are dropped now and then, so
        // many short-lived rooms do not add up (Redis expires its keys the same way).
        if !rings.contains_key(room) && rings.len() >= 1024 && rings.len().is_power_of_two() {
            rings.retain(|_, ring| !ring.lock().expired(now));
        }
        let ring = rings
            .entry(room.clone())
            .or_insert_with(|| Arc::new(Mutex::new(Ring::new(durability, now))));
        if ring.lock().expired(now) {
            *ring = Arc::new(Mutex::new(Ring::new(durability, now)));
        }
        ring.clone()
    }

    /// Gives a durable message its offset (a state room's writes its board too, or is
    /// refused) and delivers it to every node in the room. A state room's entries past
    /// their TTL leave first, as on Redis.
    fn publish_durable(&self, envelope: &Envelope, durability: Durability) {
        let Target::Room(room) = &envelope.target else {
            return;
        };
        let now = Instant::now();
        let ring = self.ring(room, durability, now);
        let mut ring = ring.lock();
        let message = match &envelope.board {
            None => Some(ring.append(&envelope.payload, now)),
            Some(write) => {
                for removal in ring.expire(room, now) {
                    self.deliver_durable(room, &envelope.origin, ring.epoch(), removal);
                }
                match ring.write(&envelope.payload, write, now) {
                    Ok(message) => message,
                    Err(refused) => {
                        if let Some(outcome) = &envelope.outcome {
                            outcome.tell(Err(refused));
                        }
                        return;
                    }
                }
            }
        };
        if let Some(outcome) = &envelope.outcome {
            outcome.tell(Ok(ring.last()));
        }
        if let Some(message) = message {
            self.deliver_durable(room, &envelope.origin, ring.epoch(), message);
        }
    }

    /// Delivers a durable message, with its offset, to every node in the room (under the
    /// ring's lock: one order for all).
    fn deliver_durable(
        &self,
        room: &Arc<str>,
        origin: &Arc<str>,
        epoch: &Arc<str>,
        message: Encoded,
    ) {
        let mut delivered = Envelope::new(
            origin.clone(),
            Target::Room(room.clone()),
            message,
            Kind::Message,
        );
        delivered.epoch = Some(epoch.clone());
        for member in self.members.read().iter() {
            if member.rooms.lock().contains(room) {
                if let Some(sink) = member.sink.upgrade() {
                    sink.deliver(delivered.clone());
                }
            }
        }
    }
}

struct Member {
    node_id: Arc<str>,
    sink: Weak<dyn EnvelopeSink>,
    rooms: Mutex<HashSet<Arc<str>>>,
    /// Users with a socket on this node, and since when.
    users: Mutex<HashMap<Arc<str>, u64>>,
}

impl MemoryBus {
    pub fn new() -> Arc<MemoryBus> {
        Arc::new(MemoryBus::default())
    }

    /// A broker handle for one node on this bus.
    pub fn broker(self: &Arc<Self>) -> MemoryBroker {
        MemoryBroker {
            bus: self.clone(),
            me: Mutex::new(None),
        }
    }
}

/// One node's handle on a `MemoryBus`.
pub struct MemoryBroker {
    bus: Arc<MemoryBus>,
    me: Mutex<Option<Arc<Member>>>,
}

impl MemoryBroker {
    /// A broker for a node that is alone.
    pub fn standalone() -> MemoryBroker {
        MemoryBus::new().broker()
    }

    fn me(&self) -> Option<Arc<Member>> {
        self.me.lock().clone()
    }
}

impl Health for MemoryBroker {
    fn engine(&self) -> &'static str {
        "memory"
    }

    fn state(&self) -> BrokerState {
        BrokerState::Connected
    }
}

/// Reports of nodes on one bus are not shared: each node shows itself.
impl Reports for MemoryBroker {}

impl Ledger for MemoryBroker {}

impl Broker for MemoryBroker {
    fn attach(&self, node_id: Arc<str>, sink: Weak<dyn EnvelopeSink>, _stats: Arc<Stats>) {
        let member = Arc::new(Member {
            node_id,
            sink,
            rooms: Mutex::new(HashSet::new()),
            users: Mutex::new(HashMap::new()),
        });
        self.bus.members.write().push(member.clone());
        *self.me.lock() = Some(member);
    }

    fn publish(&self, batch: &[Envelope]) -> Result<(), PublishError> {
        for envelope in batch {
            if let Kind::Durable(durability) = envelope.kind {
                self.bus.publish_durable(envelope, durability);
            }
        }
        let members = self.bus.members.read();
        if members.len() < 2 {
            return Ok(());
        }
        for envelope in batch.iter().filter(|e| !matches!(e.kind, Kind::Durable(_))) {
            for member in members.iter() {
                if member.node_id == envelope.origin {
                    continue;
                }
                let wanted = match &envelope.target {
                    Target::Broadcast => true,
                    Target::Room(room) => member.rooms.lock().contains(room),
                    Target::User(user) => member.users.lock().contains_key(user),
                };
                if wanted {
                    if let Some(sink) = member.sink.upgrade() {
                        sink.deliver(envelope.clone());
                    }
                }
            }
        }
        Ok(())
    }

    fn subscribe(&self, room: &Arc<str>) {
        if let Some(me) = self.me() {
            me.rooms.lock().insert(room.clone());
        }
    }

    fn unsubscribe(&self, room: &str) {
        if let Some(me) = self.me() {
            me.rooms.lock().remove(room);
        }
    }

    fn history<'a>(
        &'a self,
        room: &'a str,
        replay: &'a Replay,
        durability: Durability,
    ) -> HistoryFuture<'a> {
        let _ = durability;
        let now = Instant::now();
        let history = match self.bus.existing_ring(room, now) {
            Some(ring) => ring.lock().query(replay, now),
            None => History::none(replay),
        };
        Box::pin(std::future::ready(Ok(history)))
    }

    fn expire_entries(&self, room: &Arc<str>, durability: Durability) {
        let now = Instant::now();
        if durability.board.is_none() {
            return;
        }
        let Some(ring) = self.bus.existing_ring(room, now) else {
            return;
        };
        let mut ring = ring.lock();
        let origin: Arc<str> = Arc::from("board");
        for removal in ring.expire(room, now) {
            self.bus
                .deliver_durable(room, &origin, ring.epoch(), removal);
        }
    }
}

impl Presence for MemoryBroker {
    fn user_online(&self, user: &Arc<str>) {
        let Some(me) = self.me() else {
            return;
        };
        let members = self.bus.members.read();
        let first = !members.iter().any(|m| m.users.lock().contains_key(user));
        me.users
            .lock()
            .insert(user.clone(), crate::protocol::now_ms());
        if first {
            announce(&members, true, user, &me.node_id);
        }
    }

    fn user_offline(&self, user: &Arc<str>) {
        let Some(me) = self.me() else {
            return;
        };
        let members = self.bus.members.read();
        me.users.lock().remove(user);
        if !members.iter().any(|m| m.users.lock().contains_key(user)) {
            announce(&members, false, user, &me.node_id);
        }
    }

    fn online_users(&self, max: usize) -> BoxFuture<'_, Result<OnlineUsers, PresenceError>> {
        let mut users: Vec<UserPresence> = Vec::new();
        for member in self.bus.members.read().iter() {
            for (user, since) in member.users.lock().iter() {
                if !users.iter().any(|u| *u.user_id == **user) {
                    users.push(presence(user, &member.node_id, *since));
                }
            }
        }
        users.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        let truncated = users.len() > max;
        users.truncate(max);
        Box::pin(std::future::ready(Ok(OnlineUsers { users, truncated })))
    }

    fn presence_of<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Option<UserPresence>, PresenceError>> {
        let found = self.bus.members.read().iter().find_map(|member| {
            let since = member.users.lock().get(user).copied()?;
            Some(presence(user, &member.node_id, since))
        });
        Box::pin(std::future::ready(Ok(found)))
    }
}

/// Tells every node on the bus of a presence change.
fn announce(members: &[Arc<Member>], connected: bool, user: &Arc<str>, node: &Arc<str>) {
    for member in members {
        if let Some(sink) = member.sink.upgrade() {
            sink.presence(PresenceEvent {
                connected,
                user_id: user.clone(),
                server_id: node.clone(),
            });
        }
    }
}

fn presence(user: &str, node: &str, since: u64) -> UserPresence {
    UserPresence {
        user_id: user.to_string(),
        server_id: node.to_string(),
        connected_at: since,
        last_seen: crate::protocol::now_ms(),
    }
}

impl Drop for MemoryBroker {
    fn drop(&mut self) {
        if let Some(me) = self.me.lock().take() {
            self.bus.members.write().retain(|m| !Arc::ptr_eq(m, &me));
        }
    }
}
