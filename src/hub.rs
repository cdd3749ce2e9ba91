//! The hub: which local sockets are in which room, and local fan-out.
//!
//! Rooms live in a sharded map (`DashMap`), so lookups for different rooms rarely meet.
//! A room's members sit behind the room's own short lock: fan-out takes it for the
//! length of one synchronous loop of outbox pushes, which keeps every subscriber of a
//! room seeing that room's messages in the same order, and is never held across an
//! `.await`. An empty room is removed from the map at once, so join/leave churn leaves
//! nothing behind; a join racing that removal sees the room marked dead and retries.

use std::cell::RefCell;
use std::sync::Arc;

use dashmap::DashMap;
use indexmap::IndexMap;
use parking_lot::Mutex;

use crate::batch::{DeliveryWindow, Pace};
use crate::config::BatchConfig;
use crate::outbox::{with_scratch, ConnId, Outbox, Pushed};
use crate::protocol::{outbound, Encoded};

/// Shards for the room map; more than the default keeps unrelated rooms apart on big nodes.
const ROOM_SHARDS: usize = 64;

pub struct Hub {
    rooms: DashMap<Arc<str>, Arc<Room>>,
    /// Every socket on this node, for broadcasts and shutdown.
    sockets: DashMap<ConnId, Arc<Outbox>>,
    /// Each identified user's sockets on this node, for direct messages.
    users: DashMap<Arc<str>, IndexMap<ConnId, Arc<Outbox>>>,
    /// Sockets that asked for presence events.
    watchers: DashMap<ConnId, Arc<Outbox>>,
    /// Gives each room its pace (its class's delivery window).
    window: Arc<DeliveryWindow>,
}

struct Room {
    name: Arc<str>,
    /// Its class's delivery window, looked up once when the room is made.
    pace: Pace,
    /// Its class's conflation field: each message gets its key here, once per room.
    conflate: Option<Arc<str>>,
    members: Mutex<Members>,
}

#[derive(Default)]
struct Members {
    /// Insertion-ordered for fast iteration; `swap_remove` keeps leave O(1).
    by_id: IndexMap<ConnId, Arc<Outbox>>,
    /// Sockets joining with a replay: what arrives meanwhile waits here, so that it can
    /// follow the history frame (see `Hub::finish_replay`).
    replaying: Vec<Replaying>,
    /// Set when the room is being removed from the map; joiners must look again.
    dead: bool,
}

struct Replaying {
    outbox: Arc<Outbox>,
    held: Vec<Encoded>,
}

impl Members {
    fn count(&self) -> usize {
        self.by_id.len() + self.replaying.len()
    }

    fn contains(&self, id: ConnId) -> bool {
        self.by_id.contains_key(&id) || self.replaying.iter().any(|r| r.outbox.id() == id)
    }
}

/// Most messages held for a socket while its replay is read; a room that outruns that
/// closes the socket as a slow consumer rather than hold more.
const MAX_HELD_FOR_REPLAY: usize = 10_000;

/// What a join changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// The socket is now in the room, one of `members` local sockets; `first` if no
    /// other local socket was.
    New {
        first: bool,
        members: usize,
    },
    Already,
}

/// What a leave changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// The socket left `members` local sockets behind; `last` if that is none.
    Gone {
        last: bool,
        members: usize,
    },
    NotMember,
}

/// The outcome of one fan-out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FanOut {
    pub queued: usize,
    /// Sockets this message pushed over their outbox limit (now closing as slow consumers).
    pub overflowed: usize,
}

impl FanOut {
    fn count(&mut self, pushed: Pushed, outbox: &Arc<Outbox>, due: &mut Vec<Arc<Outbox>>) {
        match pushed {
            Pushed::Queued => self.queued += 1,
            Pushed::Due => {
                self.queued += 1;
                due.push(outbox.clone());
            }
            Pushed::Overflowed => self.overflowed += 1,
            Pushed::Closed => {}
        }
    }
}

/// Runs a fan-out with a list for the sockets it makes due, then writes them, once the
/// fan-out has released its locks. The list is the thread's own and is reused.
fn with_due(fan_out: impl FnOnce(&mut Vec<Arc<Outbox>>) -> FanOut) -> FanOut {
    thread_local! {
        static DUE: RefCell<Vec<Arc<Outbox>>> = const { RefCell::new(Vec::new()) };
    }
    with_scratch(&DUE, |due| {
        let out = fan_out(due);
        for outbox in due.drain(..) {
            outbox.flush();
        }
        out
    })
}

/// A handle on one room with local sockets, from `Hub::room`.
pub struct RoomRef(Arc<Room>);

impl RoomRef {
    pub fn name(&self) -> &Arc<str> {
        &self.0.name
    }

    /// Queues `message` for every local socket in the room, in one pass under the room's
    /// lock, so all of them see the room's messages in the same order.
    /// Sockets the message makes due at once are written after the lock is released.
    pub fn fan_out(&self, message: &Encoded) -> FanOut {
        let keyed;
        let message = match &self.0.conflate {
            Some(field) => match outbound::conflation_key(&self.0.name, message.json(), field) {
                0 => message,
                key => {
                    keyed = message.with_conflation_key(key);
                    &keyed
                }
            },
            None => message,
        };
        with_due(|due| {
            let mut out = FanOut::default();
            let mut members = self.0.members.lock();
            let pace = self.0.pace;
            for outbox in members.by_id.values() {
                out.count(outbox.push_paced(message, pace), outbox, due);
            }
            for joiner in &mut members.replaying {
                if joiner.held.len() < MAX_HELD_FOR_REPLAY {
                    joiner.held.push(message.clone());
                } else if joiner
                    .outbox
                    .close(crate::outbox::CloseReason::SlowConsumer)
                {
                    out.overflowed += 1;
                }
            }
            drop(members);
            out
        })
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

impl Hub {
    /// A hub whose rooms all keep `[batch]`'s default window.
    pub fn new() -> Hub {
        Hub::with_window(Arc::new(DeliveryWindow::new(&BatchConfig::default())))
    }

    /// A hub whose rooms keep the paces `window` gives their classes.
    pub fn with_window(window: Arc<DeliveryWindow>) -> Hub {
        Hub {
            rooms: DashMap::with_shard_amount(ROOM_SHARDS),
            sockets: DashMap::new(),
            users: DashMap::new(),
            watchers: DashMap::new(),
            window,
        }
    }

    /// Adds a socket of `user`; `on_first` runs, under the user's entry lock, when it is
    /// the user's first socket on this node (so online and offline keep their order).
    pub fn add_user(
        &self,
        user: &Arc<str>,
        outbox: &Arc<Outbox>,
        on_first: impl FnOnce(&Arc<str>),
    ) {
        let mut sockets = self.users.entry(user.clone()).or_default();
        sockets.insert(outbox.id(), outbox.clone());
        if sockets.len() == 1 {
            on_first(user);
        }
    }

    /// Removes a socket of `user`; `on_last` runs when the user has none left here.
    pub fn remove_user(&self, user: &Arc<str>, id: ConnId, on_last: impl FnOnce(&Arc<str>)) {
        let gone = match self.users.get_mut(user) {
            Some(mut sockets) => sockets.swap_remove(&id).is_some() && sockets.is_empty(),
            None => false,
        };
        if gone {
            // Removed only if still empty: a socket added meanwhile keeps the entry.
            if self
                .users
                .remove_if(user, |_, sockets| sockets.is_empty())
                .is_some()
            {
                on_last(user);
            }
        }
    }

    /// Queues `message` for every local socket of `user`.
    pub fn fan_out_user(&self, user: &str, message: &Encoded) -> FanOut {
        with_due(|due| {
            let mut out = FanOut::default();
            if let Some(sockets) = self.users.get(user) {
                for outbox in sockets.values() {
                    out.count(outbox.push(message), outbox, due);
                }
            }
            out
        })
    }

    /// Whether `user` has a socket on this node.
    pub fn has_user(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    pub fn watch_presence(&self, outbox: &Arc<Outbox>, watch: bool) {
        if watch {
            self.watchers.insert(outbox.id(), outbox.clone());
        } else {
            self.watchers.remove(&outbox.id());
        }
    }

    /// Queues a presence event for every socket that asked for them.
    pub fn fan_out_watchers(&self, message: &Encoded) -> FanOut {
        with_due(|due| {
            let mut out = FanOut::default();
            for watcher in self.watchers.iter() {
                out.count(watcher.value().push(message), watcher.value(), due);
            }
            out
        })
    }

    pub fn add_socket(&self, outbox: Arc<Outbox>) {
        self.sockets.insert(outbox.id(), outbox);
    }

    pub fn remove_socket(&self, id: ConnId) {
        self.sockets.remove(&id);
    }

    /// Adds the socket to `room`. `on_first` runs, under the room's lock, when the room
    /// had no local socket before: subscribing there orders it after the unsubscribe of
    /// a previous, emptied incarnation of the room.
    pub fn join(
        &self,
        room: &str,
        outbox: &Arc<Outbox>,
        on_first: impl FnOnce(&Arc<str>),
    ) -> Joined {
        self.join_as(room, outbox, false, on_first)
    }

    /// Adds the socket to `room` as a replaying joiner: messages for it are held until
    /// `finish_replay` puts the history in front of them.
    pub fn join_replaying(
        &self,
        room: &str,
        outbox: &Arc<Outbox>,
        on_first: impl FnOnce(&Arc<str>),
    ) -> Joined {
        self.join_as(room, outbox, true, on_first)
    }

    /// Ends a replaying join under the room's lock, so no message can come between: writes
    /// `first` (the history frame), then the held messages the history did not already
    /// carry (those with an offset above `after`; plain messages have none and all go),
    /// and makes the socket an ordinary member.
    pub fn finish_replay(&self, room: &str, id: ConnId, first: &Encoded, after: u64) -> FanOut {
        let Some(entry) = self.rooms.get(room).map(|r| r.value().clone()) else {
            return FanOut::default();
        };
        with_due(|due| {
            let mut out = FanOut::default();
            let mut members = entry.members.lock();
            let Some(at) = members.replaying.iter().position(|r| r.outbox.id() == id) else {
                return out;
            };
            let Replaying { outbox, held } = members.replaying.swap_remove(at);
            let pace = entry.pace;
            out.count(outbox.push_paced(first, pace), &outbox, due);
            for message in &held {
                let newer = crate::protocol::outbound::offset_of(message.json())
                    .is_none_or(|offset| offset > after);
                if newer {
                    out.count(outbox.push_paced(message, pace), &outbox, due);
                }
            }
            members.by_id.insert(id, outbox);
            out
        })
    }

    fn join_as(
        &self,
        room: &str,
        outbox: &Arc<Outbox>,
        replaying: bool,
        on_first: impl FnOnce(&Arc<str>),
    ) -> Joined {
        loop {
            let entry = match self.rooms.get(room) {
                Some(found) => found.value().clone(),
                None => {
                    let name: Arc<str> = Arc::from(room);
                    self.rooms
                        .entry(name.clone())
                        .or_insert_with(|| {
                            Arc::new(Room {
                                pace: self.window.pace_of(&name),
                                conflate: self.window.conflate_of(&name),
                                name,
                                members: Mutex::default(),
                            })
                        })
                        .value()
                        .clone()
                }
            };
            let mut members = entry.members.lock();
            if members.dead {
                // A leave emptied this room and is removing it; look again.
                drop(members);
                std::thread::yield_now();
                continue;
            }
            if members.contains(outbox.id()) {
                return Joined::Already;
            }
            let first = members.count() == 0;
            if replaying {
                members.replaying.push(Replaying {
                    outbox: outbox.clone(),
                    held: Vec::new(),
                });
            } else {
                members.by_id.insert(outbox.id(), outbox.clone());
            }
            if first {
                on_first(&entry.name);
            }
            return Joined::New {
                first,
                members: members.count(),
            };
        }
    }

    /// Removes the socket from `room`. `on_last` runs, under the room's lock, when no
    /// local socket is left in it.
    pub fn leave(&self, room: &str, id: ConnId, on_last: impl FnOnce(&str)) -> Left {
        let Some(entry) = self.rooms.get(room).map(|r| r.value().clone()) else {
            return Left::NotMember;
        };
        let mut members = entry.members.lock();
        if members.by_id.swap_remove(&id).is_none() {
            let Some(at) = members.replaying.iter().position(|r| r.outbox.id() == id) else {
                return Left::NotMember;
            };
            members.replaying.swap_remove(at);
        }
        if members.count() > 0 {
            return Left::Gone {
                last: false,
                members: members.count(),
            };
        }
        on_last(room);
        members.dead = true;
        drop(members);
        self.rooms.remove_if(room, |_, r| Arc::ptr_eq(r, &entry));
        Left::Gone {
            last: true,
            members: 0,
        }
    }

    /// The room, if any local socket is in it. The handle keeps the room's shared name,
    /// so a publish can address the broker without allocating one.
    pub fn room(&self, room: &str) -> Option<RoomRef> {
        self.rooms.get(room).map(|r| RoomRef(r.value().clone()))
    }

    /// Queues `message` for every local socket in `room`.
    pub fn fan_out(&self, room: &str, message: &Encoded) -> FanOut {
        self.room(room)
            .map(|r| r.fan_out(message))
            .unwrap_or_default()
    }

    /// Queues `message` for every socket on this node.
    pub fn fan_out_all(&self, message: &Encoded) -> FanOut {
        with_due(|due| {
            let mut out = FanOut::default();
            for socket in self.sockets.iter() {
                out.count(socket.value().push(message), socket.value(), due);
            }
            out
        })
    }

    /// Every socket on this node (a snapshot), for shutdown.
    pub fn sockets(&self) -> Vec<Arc<Outbox>> {
        self.sockets.iter().map(|s| s.value().clone()).collect()
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(id: ConnId) -> Arc<Outbox> {
        let immediate = crate::config::BatchConfig {
            delivery_window_ms: 0,
            ..Default::default()
        };
        Arc::new(Outbox::new(
            id,
            1 << 20,
            Arc::new(crate::batch::DeliveryWindow::new(&immediate)),
            Arc::default(),
            Arc::default(),
        ))
    }

    #[test]
    fn first_join_and_last_leave_are_reported() {
        let hub = Hub::new();
        let (a, b) = (outbox(1), outbox(2));
        let first = Joined::New {
            first: true,
            members: 1,
        };
        let second = Joined::New {
            first: false,
            members: 2,
        };
        assert_eq!(hub.join("r", &a, |_| {}), first);
        assert_eq!(hub.join("r", &b, |_| {}), second);
        assert_eq!(hub.join("r", &b, |_| {}), Joined::Already);
        let one_left = Left::Gone {
            last: false,
            members: 1,
        };
        let none_left = Left::Gone {
            last: true,
            members: 0,
        };
        assert_eq!(hub.leave("r", 1, |_| {}), one_left);
        assert_eq!(hub.leave("r", 1, |_| {}), Left::NotMember);
        assert_eq!(hub.leave("r", 2, |_| {}), none_left);
        assert_eq!(hub.room_count(), 0);
    }

    #[test]
    fn a_million_join_leave_cycles_leave_nothing_behind() {
        let hub = Arc::new(Hub::new());
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let hub = hub.clone();
                std::thread::spawn(move || {
                    let sockets: Vec<_> = (0..10).map(|i| outbox(t * 100 + i)).collect();
                    let names: Vec<String> = (0..1000).map(|r| format!("room-{r}")).collect();
                    for i in 0..500_000usize {
                        let s = &sockets[i % sockets.len()];
                        let room = &names[i % names.len()];
                        hub.join(room, s, |_| {});
                        hub.leave(room, s.id(), |_| {});
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(hub.room_count(), 0);
    }

    #[test]
    fn fan_out_reaches_members_only() {
        let hub = Hub::new();
        let (a, b) = (outbox(1), outbox(2));
        hub.add_socket(a.clone());
        hub.add_socket(b.clone());
        hub.join("r", &a, |_| {});
        let m = Encoded::from_json(b"1");
        assert_eq!(hub.fan_out("r", &m).queued, 1);
        assert_eq!(hub.fan_out("nobody", &m).queued, 0);
        assert_eq!(hub.fan_out_all(&m).queued, 2);
    }
}
