//! One room's local subscribers, and how its messages reach them (room-major delivery).
//!
//! A message reaches a room's subscribers one of two ways:
//!
//! - **at once**, pushed into each subscriber's outbox: rooms whose window is 0, and the
//!   first message after the room was quiet for a whole window (the leading edge);
//! - **collected**: every other message waits in the room's own window. At its pace's
//!   tick the room frames the window once (one batch frame, or the bare message) and
//!   every subscriber's outbox gets those same frames: one push per subscriber per
//!   window, not one per message. The hub flushes each socket once after all of the
//!   tick's rooms have pushed, so a socket in several rooms gets their frames in one
//!   vectored write.
//!
//! Exactly what the per-message way delivered, no more: a socket that joined (or ended
//! its replay) while the window was open gets only what came after, message by message;
//! one that leaves gets what was collected before it left. A conflated room conflates
//! its window once for all its subscribers, then pushes the window's messages one by one,
//! so an outbox can still drop a slow reader's superseded ones. The window holds at most
//! one outbox's bound of bytes: a room that collects more delivers early, and the outbox
//! bound does the rest (a subscriber that cannot take it closes 1008).

use std::sync::Arc;
use std::time::Instant;

use indexmap::IndexMap;
use parking_lot::Mutex;

use crate::batch::{DeliveryPolicy, Pace};
use crate::metrics::Stats;
use crate::outbox::{CloseReason, ConnId, Outbox, Pushed};
use crate::protocol::{outbound, Encoded};

/// Most messages held for a socket while its replay is read; a room that outruns that
/// closes the socket as a slow consumer rather than hold more.
const MAX_HELD_FOR_REPLAY: usize = 10_000;

pub(super) struct Room {
    pub name: Arc<str>,
    /// Its class's delivery window, looked up once when the room is made.
    pub pace: Pace,
    /// Its class's conflation field: each message gets its key here, once per room.
    pub conflate: Option<Arc<str>>,
    pub members: Mutex<Members>,
}

/// The node's rooms with a collected window, per pace, and what delivering them needs.
pub(super) struct DueRooms {
    pub policy: Arc<DeliveryPolicy>,
    pub stats: Arc<Stats>,
    /// Most bytes a room's window collects before it is delivered early.
    pub max_window_bytes: usize,
    lists: Vec<Mutex<Vec<Arc<Room>>>>,
}

impl DueRooms {
    pub fn new(policy: Arc<DeliveryPolicy>, stats: Arc<Stats>, max_window_bytes: usize) -> Self {
        DueRooms {
            lists: policy.paces().map(|_| Mutex::default()).collect(),
            policy,
            stats,
            max_window_bytes,
        }
    }

    fn schedule(&self, pace: Pace, room: Arc<Room>) {
        if let Some(list) = self.lists.get(pace.index()) {
            list.lock().push(room);
        }
    }

    /// Moves the rooms with a window for `pace`'s tick into `into` (empty), which
    /// leaves its allocation to the list: the two vectors swap, neither is reallocated.
    pub fn take(&self, pace: Pace, into: &mut Vec<Arc<Room>>) {
        if let Some(list) = self.lists.get(pace.index()) {
            std::mem::swap(&mut *list.lock(), into);
        }
    }
}

#[derive(Default)]
pub(super) struct Members {
    /// Insertion-ordered for fast iteration; `swap_remove` keeps leave O(1).
    pub by_id: IndexMap<ConnId, Member>,
    /// Sockets joining with a replay: what arrives meanwhile waits here, so that it can
    /// follow the history frame (see `Hub::finish_replay`).
    pub replaying: Vec<Replaying>,
    /// Set when the room is being removed from the map; joiners must look again.
    pub dead: bool,
    /// A durable room's epoch, as its members last learned it (from a message, or a
    /// joiner's history); `None` until one of them did.
    pub epoch: Option<Arc<str>>,
    collected: Collected,
}

pub(super) struct Member {
    pub outbox: Arc<Outbox>,
    /// The first window message (by sequence number) this member gets; 0 = all of them.
    /// Set for a member that came while the window was open; cleared at delivery.
    from: u64,
}

pub(super) struct Replaying {
    pub outbox: Arc<Outbox>,
    /// This join's own number: a replay that ends finishes its own join, never a later
    /// one of the same socket (it left and joined again meanwhile).
    pub ticket: u64,
    pub held: Vec<Encoded>,
    /// As `Member::from`.
    from: u64,
}

/// The messages a room collected for its next tick (its window's worth).
#[derive(Default)]
struct Collected {
    messages: Vec<Encoded>,
    /// Each message's sequence number (from 1), for members that came in between.
    seqs: Vec<u64>,
    next_seq: u64,
    bytes: usize,
    /// When the first of them was collected; `None` while the window is empty.
    since: Option<Instant>,
    /// When the room last sent (a tick's delivery, or a message at once): the leading edge.
    last_sent: Option<Instant>,
}

impl Collected {
    /// The sequence number a member coming now starts at: after everything collected.
    fn start_now(&self) -> u64 {
        if self.messages.is_empty() {
            0
        } else {
            self.next_seq
        }
    }

    /// What a member that starts at `from` gets of this window.
    fn after(&self, from: u64) -> impl Iterator<Item = &Encoded> {
        self.messages
            .iter()
            .zip(&self.seqs)
            .filter(move |(_, seq)| **seq >= from)
            .map(|(m, _)| m)
    }
}

/// What a push changed, counted over one fan-out or delivery.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FanOut {
    pub queued: usize,
    /// Sockets this message pushed over their outbox limit (now closing as slow consumers).
    pub overflowed: usize,
}

impl FanOut {
    pub(super) fn count(
        &mut self,
        pushed: Pushed,
        outbox: &Arc<Outbox>,
        due: &mut Vec<Arc<Outbox>>,
    ) {
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

    pub(super) fn add(&mut self, other: FanOut) {
        self.queued += other.queued;
        self.overflowed += other.overflowed;
    }
}

impl Room {
    pub fn new(name: Arc<str>, window: &DeliveryPolicy) -> Room {
        Room {
            pace: window.pace_of(&name),
            conflate: window.conflate_of(&name),
            name,
            members: Mutex::default(),
        }
    }

    /// `message` with its conflation key, if the room conflates and the message has one.
    pub fn keyed(&self, message: &Encoded) -> Option<Encoded> {
        let field = self.conflate.as_deref()?;
        match outbound::conflation_key(&self.name, message.json(), field) {
            0 => None,
            key => Some(message.with_conflation_key(key)),
        }
    }

    /// Sends `message` to every member: at once, or into the room's window for its tick.
    /// Sockets made due are added to `due`, to be flushed once the room's lock is gone.
    pub fn fan_out(
        self: &Arc<Self>,
        message: &Encoded,
        rooms: &DueRooms,
        due: &mut Vec<Arc<Outbox>>,
    ) -> FanOut {
        let mut members = self.members.lock();
        let policy = &rooms.policy;
        if policy.is_immediate(self.pace) {
            return members.push_each(message, self.pace, due);
        }
        // The clock is read only for a window's first message: the leading-edge check
        // and the latency mark; the messages after it only join the window.
        let w = &mut members.collected;
        if w.messages.is_empty() {
            let now = Instant::now();
            if policy.sends_at_once(self.pace, w.last_sent, now) {
                w.last_sent = Some(now);
                return members.push_each(message, self.pace, due);
            }
        }
        let mut out = FanOut::default();
        if !members.collected.messages.is_empty()
            && members.collected.bytes + message.wire_len() > rooms.max_window_bytes
        {
            // More than one outbox's worth in one window: deliver what is collected now;
            // the outboxes' bound decides who can take it.
            out = members.deliver(self.conflate.is_some(), rooms, due);
        }
        let first = members.collect(message, &rooms.stats);
        out.queued += members.count();
        drop(members);
        if first {
            rooms.schedule(self.pace, self.clone());
        }
        out
    }
}

impl Members {
    pub fn count(&self) -> usize {
        self.by_id.len() + self.replaying.len()
    }

    pub fn contains(&self, id: ConnId) -> bool {
        self.by_id.contains_key(&id) || self.replaying.iter().any(|r| r.outbox.id() == id)
    }

    /// Adds a member; it gets what the room collects from now on.
    pub fn insert(&mut self, outbox: Arc<Outbox>) {
        let from = self.collected.start_now();
        self.by_id.insert(outbox.id(), Member { outbox, from });
    }

    /// Adds a replaying joiner; what the room sends from now on is held for it.
    pub fn insert_replaying(&mut self, outbox: Arc<Outbox>, ticket: u64) {
        let from = self.collected.start_now();
        self.replaying.push(Replaying {
            outbox,
            ticket,
            held: Vec::new(),
            from,
        });
    }

    /// Ends a replay: the joiner becomes an ordinary member. Returns it and, in order,
    /// what arrived while its history was read (held for it, and what the open window
    /// collected since it joined) that `keep` keeps; those go to it now, and the window's
    /// later messages at the tick.
    pub fn finish_replay(
        &mut self,
        at: usize,
        mut keep: impl FnMut(&Encoded) -> bool,
    ) -> (Arc<Outbox>, Vec<Encoded>) {
        let joiner = self.replaying.swap_remove(at);
        let mut due: Vec<Encoded> = joiner.held.into_iter().filter(|m| keep(m)).collect();
        due.extend(
            self.collected
                .after(joiner.from)
                .filter(|m| keep(m))
                .cloned(),
        );
        let from = self.collected.start_now();
        let outbox = joiner.outbox;
        self.by_id.insert(
            outbox.id(),
            Member {
                outbox: outbox.clone(),
                from,
            },
        );
        (outbox, due)
    }

    /// Notes the epoch of a durable message about to fan out; true when the members knew
    /// another one (they must be told before the message).
    pub fn note_epoch(&mut self, epoch: &Arc<str>) -> bool {
        match &self.epoch {
            Some(known) if known == epoch => false,
            known => {
                let changed = known.is_some();
                self.epoch = Some(epoch.clone());
                changed
            }
        }
    }

    /// Removes a member. What the room collected for it goes into its outbox on the way
    /// out (by `pace`), as the per-message way would have put it there already.
    pub fn remove(&mut self, id: ConnId, pace: Pace, due: &mut Vec<Arc<Outbox>>) -> bool {
        if let Some(member) = self.by_id.swap_remove(&id) {
            let mut out = FanOut::default();
            for message in self.collected.after(member.from) {
                out.count(member.outbox.push_paced(message, pace), &member.outbox, due);
            }
            return true;
        }
        match self.replaying.iter().position(|r| r.outbox.id() == id) {
            Some(at) => {
                self.replaying.swap_remove(at);
                true
            }
            None => false,
        }
    }

    /// Pushes one message into every member's outbox (and holds it for replaying ones).
    pub fn push_each(
        &mut self,
        message: &Encoded,
        pace: Pace,
        due: &mut Vec<Arc<Outbox>>,
    ) -> FanOut {
        let mut out = FanOut::default();
        for member in self.by_id.values() {
            out.count(member.outbox.push_paced(message, pace), &member.outbox, due);
        }
        for joiner in &mut self.replaying {
            hold(joiner, std::iter::once(message), &mut out);
        }
        out
    }

    /// Adds a message to the window (the latest per key, in a conflated room); true if
    /// it is the window's first, so the room must be listed for its tick.
    fn collect(&mut self, message: &Encoded, stats: &Stats) -> bool {
        let w = &mut self.collected;
        let key = message.conflation_key();
        if key != 0 {
            if let Some(at) = w.messages.iter().rposition(|m| m.conflation_key() == key) {
                w.bytes -= w.messages.remove(at).wire_len();
                w.seqs.remove(at);
                stats.conflated();
            }
        }
        let first = w.since.is_none();
        if first {
            w.since = Some(Instant::now());
        }
        w.next_seq = w.next_seq.max(1);
        w.messages.push(message.clone());
        w.seqs.push(w.next_seq);
        w.next_seq += 1;
        w.bytes += message.wire_len();
        first
    }

    /// The tick: every member gets the window's frames, built once, or (for one that
    /// came while it was open, and in conflated rooms) its messages one by one.
    pub fn deliver(
        &mut self,
        conflated: bool,
        rooms: &DueRooms,
        due: &mut Vec<Arc<Outbox>>,
    ) -> FanOut {
        let mut out = FanOut::default();
        let Some(since) = self.collected.since.take() else {
            return out;
        };
        let mut frames = Vec::new();
        if !conflated {
            rooms
                .policy
                .room_frames(&self.collected.messages, &mut frames);
        }
        let shared = if conflated {
            &self.collected.messages
        } else {
            &frames
        };
        for member in self.by_id.values_mut() {
            let outbox = &member.outbox;
            match std::mem::take(&mut member.from) {
                0 => {
                    for frame in shared {
                        out.count(outbox.push_due(frame, since), outbox, due);
                    }
                }
                from => {
                    for message in self.collected.after(from) {
                        out.count(outbox.push_due(message, since), outbox, due);
                    }
                }
            }
        }
        for joiner in &mut self.replaying {
            let from = std::mem::take(&mut joiner.from);
            hold(joiner, self.collected.after(from), &mut out);
        }
        let w = &mut self.collected;
        w.messages.clear();
        w.seqs.clear();
        w.bytes = 0;
        w.last_sent = Some(Instant::now());
        out
    }
}

/// Holds messages for a replaying joiner, or closes it if it already holds too many.
fn hold<'a>(joiner: &mut Replaying, messages: impl Iterator<Item = &'a Encoded>, out: &mut FanOut) {
    for message in messages {
        if joiner.held.len() < MAX_HELD_FOR_REPLAY {
            joiner.held.push(message.clone());
        } else {
            if joiner.outbox.close(CloseReason::SlowConsumer) {
                out.overflowed += 1;
            }
            return;
        }
    }
}
