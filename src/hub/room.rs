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

use super::delta::{Deltas, Variant};
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
    /// Its class offers Fossil deltas (`delta = "fossil"`) to subscribers that ask.
    pub offers_delta: bool,
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
    /// The bases of the room's deltas, while it has delta subscribers.
    deltas: Deltas,
    /// Members (and replaying joiners) that take deltas.
    delta_members: usize,
    /// Members with a `skip` set.
    skipping: usize,
}

pub(super) struct Member {
    pub outbox: Arc<Outbox>,
    /// The first window message (by sequence number) this member gets; 0 = all of them.
    /// Set for a member that came while the window was open; cleared at delivery.
    from: u64,
    /// For a member that takes deltas: the room's delta number when it came (it has the
    /// bases delivered after that; see `delta.rs`).
    delta: Option<u64>,
    /// For a member whose history (or snapshot) ran ahead of what reached the room live:
    /// the offset it ends at. A durable message up to it (read in Redis before its
    /// pub/sub copy arrived here) is not sent again; the first later one clears it, as
    /// does a new epoch. 0: none.
    skip: u64,
}

impl Member {
    /// Whether `message` is one this member has from its history already; clears the
    /// mark at the first durable message past it (true when it did, in `cleared`).
    fn skips(&mut self, message: &Encoded, cleared: &mut usize) -> bool {
        if self.skip == 0 {
            return false;
        }
        match outbound::offset_of(message.json()) {
            Some(offset) if offset <= self.skip => true,
            Some(_) => {
                self.skip = 0;
                *cleared += 1;
                false
            }
            None => false,
        }
    }
}

pub(super) struct Replaying {
    pub outbox: Arc<Outbox>,
    /// This join's own number: a replay that ends finishes its own join, never a later
    /// one of the same socket (it left and joined again meanwhile).
    pub ticket: u64,
    pub held: Vec<Encoded>,
    /// As `Member::from`.
    from: u64,
    /// It takes deltas once it is a member.
    delta: bool,
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
            offers_delta: window.offers_delta(&name),
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
            return members.push_each(&self.name, message, self.pace, due);
        }
        // The clock is read only for a window's first message: the leading-edge check
        // and the latency mark; the messages after it only join the window.
        let w = &mut members.collected;
        if w.messages.is_empty() {
            let now = Instant::now();
            if policy.sends_at_once(self.pace, w.last_sent, now) {
                w.last_sent = Some(now);
                return members.push_each(&self.name, message, self.pace, due);
            }
        }
        let mut out = FanOut::default();
        if !members.collected.messages.is_empty()
            && members.collected.bytes + message.wire_len() > rooms.max_window_bytes
        {
            // More than one outbox's worth in one window: deliver what is collected now;
            // the outboxes' bound decides who can take it.
            out = members.deliver(self, rooms, due);
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

    /// Adds a member; it gets what the room collects from now on (as deltas, if `delta`).
    pub fn insert(&mut self, outbox: Arc<Outbox>, delta: bool) {
        let from = self.collected.start_now();
        let delta = self.delta_since(delta);
        self.by_id.insert(
            outbox.id(),
            Member {
                outbox,
                from,
                delta,
                skip: 0,
            },
        );
    }

    /// Adds a replaying joiner; what the room sends from now on is held for it.
    pub fn insert_replaying(&mut self, outbox: Arc<Outbox>, ticket: u64, delta: bool) {
        let from = self.collected.start_now();
        self.delta_members += usize::from(delta);
        self.replaying.push(Replaying {
            outbox,
            ticket,
            held: Vec::new(),
            from,
            delta,
        });
    }

    /// A member coming now that takes deltas (`delta`): the number it starts after.
    fn delta_since(&mut self, delta: bool) -> Option<u64> {
        delta.then(|| {
            self.delta_members += 1;
            self.delta_start()
        })
    }

    /// Where a delta member coming now starts: after the bases made so far, or, while
    /// the window holds messages, after the bases the tick will make of them (it does not
    /// get those messages from the window: a snapshot or a history covered them, or it
    /// came after them).
    fn delta_start(&self) -> u64 {
        if self.collected.messages.is_empty() {
            self.deltas.now()
        } else {
            AFTER_TICK
        }
    }

    /// Ends a replay: the joiner becomes an ordinary member. Returns it and, in order,
    /// what arrived while its history was read (held for it, and what the open window
    /// collected since it joined) that `keep` keeps; those go to it now, and the window's
    /// later messages at the tick. With `skip`, durable messages up to that offset that
    /// reach the room later are not sent to it (see `Member::skip`).
    pub fn finish_replay(
        &mut self,
        at: usize,
        mut keep: impl FnMut(&Encoded) -> bool,
        skip: u64,
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
        // Counted already as a replaying joiner.
        let delta = joiner.delta.then(|| self.delta_start());
        self.skipping += usize::from(skip > 0);
        self.by_id.insert(
            outbox.id(),
            Member {
                outbox: outbox.clone(),
                from,
                delta,
                skip,
            },
        );
        (outbox, due)
    }

    /// Notes the epoch of a durable message about to fan out; true when the members must
    /// be told it before the message: they knew another one, or a joiner's history is
    /// being read (it may find the room empty, with no epoch, and the message is held for
    /// it: without the notice it could never resume from what it saw).
    pub fn note_epoch(&mut self, epoch: &Arc<str>) -> bool {
        match &self.epoch {
            Some(known) if known == epoch => false,
            known => {
                let changed = known.is_some() || !self.replaying.is_empty();
                self.epoch = Some(epoch.clone());
                // Offsets start again: no history of the old epoch covers any of them.
                if self.skipping > 0 {
                    self.by_id.values_mut().for_each(|m| m.skip = 0);
                    self.skipping = 0;
                }
                changed
            }
        }
    }

    /// Removes a member. What the room collected for it goes into its outbox on the way
    /// out (by `pace`), as the per-message way would have put it there already.
    pub fn remove(&mut self, id: ConnId, pace: Pace, due: &mut Vec<Arc<Outbox>>) -> bool {
        if let Some(member) = self.by_id.swap_remove(&id) {
            // What it leaves with goes in full: nothing of it is a delta's base any more.
            let mut out = FanOut::default();
            for message in self.collected.after(member.from) {
                out.count(member.outbox.push_paced(message, pace), &member.outbox, due);
            }
            self.delta_members -= usize::from(member.delta.is_some());
            self.skipping -= usize::from(member.skip > 0);
            return true;
        }
        match self.replaying.iter().position(|r| r.outbox.id() == id) {
            Some(at) => {
                let joiner = self.replaying.swap_remove(at);
                self.delta_members -= usize::from(joiner.delta);
                true
            }
            None => false,
        }
    }

    /// Pushes one message into every member's outbox (and holds it for replaying ones);
    /// members that take deltas get its delta, made once here.
    pub fn push_each(
        &mut self,
        room: &str,
        message: &Encoded,
        pace: Pace,
        due: &mut Vec<Arc<Outbox>>,
    ) -> FanOut {
        let mut out = FanOut::default();
        let variant = self.variants(room, std::slice::from_ref(message)).pop();
        let mut cleared = 0;
        for member in self.by_id.values_mut() {
            if member.skips(message, &mut cleared) {
                continue;
            }
            let frame = match (member.delta, &variant) {
                (Some(since), Some(variant)) => variant.for_since(since, message),
                _ => message,
            };
            out.count(member.outbox.push_paced(frame, pace), &member.outbox, due);
        }
        self.skipping -= cleared;
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

    /// The variants of `messages` for delta subscribers, made once (none while the room
    /// has no delta subscriber: then its bases are dropped).
    fn variants(&mut self, room: &str, messages: &[Encoded]) -> Vec<Variant> {
        if self.delta_members == 0 {
            self.deltas.forget();
            return Vec::new();
        }
        messages
            .iter()
            .map(|m| self.deltas.variant(room, m))
            .collect()
    }

    /// The tick: every member gets the window's frames, built once (delta subscribers
    /// the window's deltas, framed once too), or (for one that came while it was open,
    /// one that lacks a delta's base, and in conflated rooms) its messages one by one.
    pub fn deliver(&mut self, room: &Room, rooms: &DueRooms, due: &mut Vec<Arc<Outbox>>) -> FanOut {
        let mut out = FanOut::default();
        let Some(since) = self.collected.since.take() else {
            return out;
        };
        let conflated = room.conflate.is_some();
        let messages = std::mem::take(&mut self.collected.messages);
        let variants = self.variants(&room.name, &messages);
        self.collected.messages = messages;
        let frame_once = |messages: &[Encoded]| -> Vec<Encoded> {
            let mut frames = Vec::new();
            rooms.policy.room_frames(messages, &mut frames);
            frames
        };
        let frames = if conflated {
            Vec::new()
        } else {
            frame_once(&self.collected.messages)
        };
        let shared = if conflated {
            &self.collected.messages
        } else {
            &frames
        };
        // Delta subscribers that have every base the window's deltas need share frames.
        let needs = variants.iter().map(|v| v.needs).filter(|n| *n > 0).min();
        let delta_messages: Vec<Encoded> = variants.iter().map(|v| v.frame.clone()).collect();
        let delta_frames = match (conflated, variants.is_empty()) {
            (false, false) => frame_once(&delta_messages),
            _ => Vec::new(),
        };
        let delta_shared = if conflated {
            &delta_messages
        } else {
            &delta_frames
        };
        let bases_now = self.deltas.now();
        let mut cleared = 0;
        for member in self.by_id.values_mut() {
            // From this window's bases on, a member that came while it was open has them.
            let delta = member.delta;
            if delta == Some(AFTER_TICK) {
                member.delta = Some(bases_now);
            }
            let from = std::mem::take(&mut member.from);
            let whole = from == 0 && member.skip == 0;
            let frames = match delta {
                None if whole => shared,
                Some(d) if whole && needs.is_none_or(|n| d < n) => delta_shared,
                delta => {
                    let window = &self.collected;
                    for (i, message) in window.messages.iter().enumerate() {
                        if window.seqs[i] < from || member.skips(message, &mut cleared) {
                            continue;
                        }
                        let frame = match (delta, variants.get(i)) {
                            (Some(d), Some(variant)) => variant.for_since(d, message),
                            _ => message,
                        };
                        out.count(member.outbox.push_due(frame, since), &member.outbox, due);
                    }
                    continue;
                }
            };
            let outbox = &member.outbox;
            for frame in frames {
                out.count(outbox.push_due(frame, since), outbox, due);
            }
        }
        self.skipping -= cleared;
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

/// The `since` of a delta member that came while the window held messages, until the
/// tick has made their bases: it gets every message in full until then.
const AFTER_TICK: u64 = u64::MAX;

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
