//! The embedded broker: nodes in one process sharing rooms through a `MemoryBus`.
//!
//! A standalone node gets a bus of its own, where publishing reaches nobody else: the
//! node has already served its sockets. Several nodes built on one shared bus behave like
//! nodes on one Redis: envelopes go to the other nodes subscribed to the room (or to all,
//! for broadcasts), never back to their origin, and carry the already-encoded frame, so
//! nothing is serialized on the way.

use std::collections::HashSet;
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};

use super::{Broker, BrokerState, Envelope, EnvelopeSink, PublishError, Target};
use crate::metrics::Stats;

/// An in-process message bus shared by the nodes built on it.
#[derive(Default)]
pub struct MemoryBus {
    members: RwLock<Vec<Arc<Member>>>,
}

struct Member {
    node_id: Arc<str>,
    sink: Weak<dyn EnvelopeSink>,
    rooms: Mutex<HashSet<Arc<str>>>,
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

impl Broker for MemoryBroker {
    fn engine(&self) -> &'static str {
        "memory"
    }

    fn attach(&self, node_id: Arc<str>, sink: Weak<dyn EnvelopeSink>, _stats: Arc<Stats>) {
        let member = Arc::new(Member {
            node_id,
            sink,
            rooms: Mutex::new(HashSet::new()),
        });
        self.bus.members.write().push(member.clone());
        *self.me.lock() = Some(member);
    }

    fn publish(&self, batch: &[Envelope]) -> Result<(), PublishError> {
        let members = self.bus.members.read();
        if members.len() < 2 {
            return Ok(());
        }
        for envelope in batch {
            for member in members.iter() {
                if member.node_id == envelope.origin {
                    continue;
                }
                let wanted = match &envelope.target {
                    Target::Broadcast => true,
                    Target::Room(room) => member.rooms.lock().contains(room),
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

    fn state(&self) -> BrokerState {
        BrokerState::Connected
    }
}

impl Drop for MemoryBroker {
    fn drop(&mut self) {
        if let Some(me) = self.me.lock().take() {
            self.bus.members.write().retain(|m| !Arc::ptr_eq(m, &me));
        }
    }
}
