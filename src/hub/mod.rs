//! The hub: which local sockets are in which room, and local fan-out.
//!
//! Rooms live in a striped map (`DashMap`, each stripe its own lock), so lookups for
//! different rooms rarely meet. ("Shard" in volley means one of `redis.shards`.)
//! A room's members sit behind the room's own short lock: fan-out takes it for the
//! length of one synchronous loop of outbox pushes, which keeps every subscriber of a
//! room seeing that room's messages in the same order, and is never held across an
//! `.await`. An empty room is removed from the map at once, so join/leave churn leaves
//! nothing behind; a join racing that removal sees the room marked dead and retries.
//!
//! | file | job |
//! | --- | --- |
//! | `mod.rs` | the maps (rooms, sockets, users, presence watchers), join and leave, the tick |
//! | `room.rs` | one room: its members and its window (room-major delivery: collected once, one shared frame per subscriber at the tick) |
//! | `delta.rs` | a state room's Fossil deltas: made once per message per room, against what the room last delivered |
//! | `tests.rs` | the hub's tests |

mod delta;
mod room;

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use dashmap::DashMap;
use indexmap::IndexMap;

use crate::batch::{DeliveryPolicy, Pace};
use crate::config::BatchConfig;
use crate::metrics::Stats;
use crate::outbox::{with_scratch, ConnId, Outbox};
use crate::protocol::Encoded;
pub use delta::Deltas;
pub use room::FanOut;
use room::{DueRooms, Room};

/// Shards for the room map; more than the default keeps unrelated rooms apart on big nodes.
const ROOM_STRIPES: usize = 64;

pub struct Hub {
    rooms: DashMap<Arc<str>, Arc<Room>>,
    /// Every socket on this node, for broadcasts and shutdown.
    sockets: DashMap<ConnId, Arc<Outbox>>,
    /// Each identified user's sockets on this node (for direct messages) and the rooms
    /// they are in (for the record a dead node's users are announced gone from).
    users: DashMap<Arc<str>, UserSockets>,
    /// Sockets that asked for presence events.
    watchers: DashMap<ConnId, Arc<Outbox>>,
    /// Gives each room its pace (its class's delivery window), and lists the rooms with
    /// a collected window for their pace's tick.
    due_rooms: Arc<DueRooms>,
    /// Numbers replaying joins (see `Replaying::ticket`).
    next_ticket: AtomicU64,
}

/// One identified user's sockets on this node, and in how many of them each room.
#[derive(Default)]
struct UserSockets {
    sockets: IndexMap<ConnId, Arc<Outbox>>,
    rooms: std::collections::HashMap<Arc<str>, u32>,
}

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

/// Runs a fan-out with a list for the sockets it makes due, then writes them, once the
/// fan-out has released its locks. The list is the thread's own and is reused.
fn with_due(fan_out: impl FnOnce(&mut Vec<Arc<Outbox>>) -> FanOut) -> FanOut {
    thread_local! {
        static DUE: RefCell<Vec<Arc<Outbox>>> = const { RefCell::new(Vec::new()) };
    }
    with_scratch(&DUE, |due| {
        let out = fan_out(due);
        flush_all(due);
        out
    })
}

/// Sockets due at once past which their writes are shared among the runtime's workers.
const SHARE_WRITES_FROM: usize = 1024;

/// Sockets a share writes before it lets other tasks run.
const SLICE: usize = 256;

/// Writes every due socket. A big room's window (thousands of sockets due at once) is
/// split among the runtime's worker threads, one task per share, so every core writes
/// instead of one writing while the others idle; and each share yields every `SLICE`
/// sockets, so other rooms' deliveries and the sockets' reads go on while a goal is
/// written to 16 000 (without it, a small room's message waited for the whole window).
/// One allocation per share, none per socket; a socket's own order holds (its outbox
/// lets one thread write it at a time).
fn flush_all(due: &mut Vec<Arc<Outbox>>) {
    // Only a big window asks for the runtime (a thread-local read and a handle clone).
    let runtime = (due.len() >= SHARE_WRITES_FROM)
        .then(tokio::runtime::Handle::try_current)
        .and_then(Result::ok);
    match runtime {
        Some(rt) => {
            let share = due.len().div_ceil(rt.metrics().num_workers().max(1));
            while !due.is_empty() {
                let theirs = due.drain(due.len().saturating_sub(share)..).collect();
                rt.spawn(write_share(theirs));
            }
        }
        None => crate::outbox::flush_each(due),
    }
}

/// Writes a share of a big window, `SLICE` sockets at a time.
async fn write_share(mut share: Vec<Arc<Outbox>>) {
    let mut slice = Vec::with_capacity(SLICE.min(share.len()));
    while !share.is_empty() {
        slice.extend(share.drain(share.len().saturating_sub(SLICE)..));
        crate::outbox::flush_each(&mut slice);
        tokio::task::yield_now().await;
    }
}

/// What a joiner gets of what arrived while its history was read: what the history did
/// not carry. Of the history's epoch, only messages past its newest offset (`after`) and
/// anything without an offset (notices); once an `epoch_changed` to another epoch went
/// by, everything after it (offsets count again from 1 there). An `epoch_changed` to the
/// history's own epoch says nothing new and is dropped.
struct AfterHistory<'a> {
    after: u64,
    epoch: Option<&'a str>,
    same_epoch: bool,
}

impl AfterHistory<'_> {
    fn keeps(&mut self, message: &Encoded) -> bool {
        use crate::protocol::outbound;
        if !self.same_epoch {
            return true;
        }
        if let Some(changed) = outbound::changed_epoch(message.json()) {
            if self.epoch == Some(changed.as_str()) {
                return false;
            }
            self.same_epoch = false;
            return true;
        }
        outbound::offset_of(message.json()).is_none_or(|offset| offset > self.after)
    }
}

/// A handle on one room with local sockets, from `Hub::room`.
pub struct RoomRef(Arc<Room>, Arc<DueRooms>);

impl RoomRef {
    pub fn name(&self) -> &Arc<str> {
        &self.0.name
    }

    /// Sends `message` to every local socket in the room: at once, or in the room's
    /// window for its tick (`room.rs`). Either way under the room's lock, so all of them
    /// see the room's messages in the same order; sockets made due are written after
    /// the lock is released.
    pub fn fan_out(&self, message: &Encoded) -> FanOut {
        let keyed = self.0.keyed(message);
        let message = keyed.as_ref().unwrap_or(message);
        with_due(|due| self.0.fan_out(message, &self.1, due))
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
        let window = Arc::new(DeliveryPolicy::new(&BatchConfig::default()));
        Hub::with_window(window, Arc::default(), usize::MAX)
    }

    /// A hub whose rooms keep the paces `window` gives their classes, and collect at most
    /// `max_window_bytes` (one outbox's bound) per window before delivering early.
    pub fn with_window(
        window: Arc<DeliveryPolicy>,
        stats: Arc<Stats>,
        max_window_bytes: usize,
    ) -> Hub {
        Hub {
            rooms: DashMap::with_shard_amount(ROOM_STRIPES),
            sockets: DashMap::new(),
            users: DashMap::new(),
            watchers: DashMap::new(),
            due_rooms: Arc::new(DueRooms::new(window, stats, max_window_bytes)),
            next_ticket: AtomicU64::new(1),
        }
    }

    /// `pace`'s tick, before the sockets': every room with a collected window delivers it.
    /// Each socket is written once, after all the rooms have pushed.
    pub fn tick(&self, pace: Pace) -> FanOut {
        thread_local! {
            static ROOMS: RefCell<Vec<Arc<Room>>> = const { RefCell::new(Vec::new()) };
        }
        with_scratch(&ROOMS, |rooms| {
            self.due_rooms.take(pace, rooms);
            with_due(|due| {
                let mut out = FanOut::default();
                for room in rooms.drain(..) {
                    out.add(room.members.lock().deliver(&room, &self.due_rooms, due));
                }
                out
            })
        })
    }

    /// Adds a socket of `user`; `on_first` runs, under the user's entry lock, when it is
    /// the user's first socket on this node (so online and offline keep their order).
    pub fn add_user(
        &self,
        user: &Arc<str>,
        outbox: &Arc<Outbox>,
        on_first: impl FnOnce(&Arc<str>),
    ) {
        let mut entry = self.users.entry(user.clone()).or_default();
        entry.sockets.insert(outbox.id(), outbox.clone());
        if entry.sockets.len() == 1 {
            on_first(user);
        }
    }

    /// Removes a socket of `user`; `on_last` runs when the user has none left here.
    pub fn remove_user(&self, user: &Arc<str>, id: ConnId, on_last: impl FnOnce(&Arc<str>)) {
        let gone = match self.users.get_mut(user) {
            Some(mut entry) => entry.sockets.swap_remove(&id).is_some() && entry.sockets.is_empty(),
            None => false,
        };
        if gone {
            // Removed only if still empty: a socket added meanwhile keeps the entry.
            if self
                .users
                .remove_if(user, |_, entry| entry.sockets.is_empty())
                .is_some()
            {
                on_last(user);
            }
        }
    }

    /// One socket of `user` joined (or left) `room`: true when that changed the rooms the
    /// user is in on this node (its first socket there, or its last).
    pub fn user_room(&self, user: &str, room: &str, joined: bool) -> bool {
        let Some(mut entry) = self.users.get_mut(user) else {
            return false;
        };
        if joined {
            let count = entry.rooms.entry(Arc::from(room)).or_default();
            *count += 1;
            return *count == 1;
        }
        match entry.rooms.get_mut(room) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            Some(_) => {
                entry.rooms.remove(room);
                true
            }
            None => false,
        }
    }

    /// The rooms `user`'s sockets on this node are in.
    pub fn rooms_of(&self, user: &str) -> Vec<Arc<str>> {
        self.users
            .get(user)
            .map(|entry| entry.rooms.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Queues `message` for every local socket of `user`.
    pub fn fan_out_user(&self, user: &str, message: &Encoded) -> FanOut {
        with_due(|due| {
            let mut out = FanOut::default();
            if let Some(entry) = self.users.get(user) {
                for outbox in entry.sockets.values() {
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
    /// With `delta`, the socket takes the room's deltas (if its class offers them).
    pub fn join(
        &self,
        room: &str,
        outbox: &Arc<Outbox>,
        delta: bool,
        on_first: impl FnOnce(&Arc<str>),
    ) -> Joined {
        self.join_as(room, outbox, None, delta, on_first)
    }

    /// Adds the socket to `room` as a replaying joiner: messages for it are held until
    /// `finish_replay` puts the history in front of them. Returns the join's ticket for
    /// `finish_replay`, or `None` when the socket is in the room already.
    pub fn join_replaying(
        &self,
        room: &str,
        outbox: &Arc<Outbox>,
        delta: bool,
        on_first: impl FnOnce(&Arc<str>),
    ) -> Option<u64> {
        let ticket = self.next_ticket.fetch_add(1, Relaxed);
        match self.join_as(room, outbox, Some(ticket), delta, on_first) {
            Joined::New { .. } => Some(ticket),
            Joined::Already => None,
        }
    }

    /// Local sockets in `room` (replaying joiners included).
    pub fn members(&self, room: &str) -> usize {
        self.rooms
            .get(room)
            .map_or(0, |r| r.value().members.lock().count())
    }

    /// Whether the socket is in `room` (replaying or not).
    pub fn is_member(&self, room: &str, id: ConnId) -> bool {
        self.rooms
            .get(room)
            .is_some_and(|r| r.value().members.lock().contains(id))
    }

    /// Ends a replaying join under the room's lock, so no message can come between: writes
    /// `first` (the history frame), then what arrived meanwhile that the history did not
    /// already carry (see `AfterHistory`), and makes the socket an ordinary member.
    /// `epoch` is the history's (`None` when it could not be read): the room learns it if
    /// it knew none, so a later message of another epoch is announced. `None` when the
    /// join is gone (the socket left, or closed, meanwhile): nothing was written.
    pub fn finish_replay(
        &self,
        room: &str,
        ticket: u64,
        first: &Encoded,
        after: u64,
        epoch: Option<&Arc<str>>,
    ) -> Option<FanOut> {
        let entry = self.rooms.get(room).map(|r| r.value().clone())?;
        let mut finished = false;
        let out = with_due(|due| {
            let mut out = FanOut::default();
            let mut members = entry.members.lock();
            let Some(at) = members.replaying.iter().position(|r| r.ticket == ticket) else {
                return out;
            };
            finished = true;
            if let (None, Some(epoch)) = (&members.epoch, epoch) {
                members.epoch = Some(epoch.clone());
            }
            // The history may end past what reached the room live (the read saw appends
            // whose pub/sub copies are still on their way): those are not sent again.
            let skip = if epoch.is_some() && members.epoch.as_ref() == epoch {
                after
            } else {
                0
            };
            let mut keep = AfterHistory {
                after,
                epoch: epoch.map(|e| &**e),
                same_epoch: true,
            };
            let (outbox, arrived) = members.finish_replay(at, |m| keep.keeps(m), skip);
            let pace = entry.pace;
            out.count(outbox.push_paced(first, pace), &outbox, due);
            for message in &arrived {
                out.count(outbox.push_paced(message, pace), &outbox, due);
            }
            out
        });
        finished.then_some(out)
    }

    /// Queues a durable room's message for every local socket in `room`, after an
    /// `epoch_changed` when the room's members knew another epoch.
    pub fn fan_out_durable(&self, room: &str, epoch: &Arc<str>, message: &Encoded) -> FanOut {
        let Some(local) = self.room(room) else {
            return FanOut::default();
        };
        let mut out = FanOut::default();
        let changed = local.0.members.lock().note_epoch(epoch);
        if changed {
            out.add(local.fan_out(&crate::protocol::outbound::epoch_changed(
                local.name(),
                epoch,
            )));
        }
        out.add(local.fan_out(message));
        out
    }

    fn join_as(
        &self,
        room: &str,
        outbox: &Arc<Outbox>,
        replaying: Option<u64>,
        delta: bool,
        on_first: impl FnOnce(&Arc<str>),
    ) -> Joined {
        loop {
            let entry = match self.rooms.get(room) {
                Some(found) => found.value().clone(),
                None => {
                    let name: Arc<str> = Arc::from(room);
                    self.rooms
                        .entry(name.clone())
                        .or_insert_with(|| Arc::new(Room::new(name, &self.due_rooms.policy)))
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
            let delta = delta && entry.offers_delta;
            match replaying {
                Some(ticket) => members.insert_replaying(outbox.clone(), ticket, delta),
                None => members.insert(outbox.clone(), delta),
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
        let mut left = Left::NotMember;
        with_due(|due| {
            let mut members = entry.members.lock();
            if !members.remove(id, entry.pace, due) {
                return FanOut::default();
            }
            let count = members.count();
            left = Left::Gone {
                last: count == 0,
                members: count,
            };
            if count == 0 {
                on_last(room);
                members.dead = true;
                drop(members);
                self.rooms.remove_if(room, |_, r| Arc::ptr_eq(r, &entry));
            }
            FanOut::default()
        });
        left
    }

    /// The room, if any local socket is in it. The handle keeps the room's shared name,
    /// so a publish can address the broker without allocating one.
    pub fn room(&self, room: &str) -> Option<RoomRef> {
        self.rooms
            .get(room)
            .map(|r| RoomRef(r.value().clone(), self.due_rooms.clone()))
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

    /// The rooms with local sockets (a snapshot).
    pub fn room_names(&self) -> Vec<Arc<str>> {
        self.rooms.iter().map(|r| r.key().clone()).collect()
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }
}

#[cfg(test)]
mod tests;
