//! The delivery window: when a socket's queued messages leave, and as which frames.
//!
//! A socket that was idle for a whole window sends its next message at once (the
//! leading edge); otherwise its messages wait for the next tick of a node-wide clock and
//! leave together. Two or more messages become `{"type":"batch","messages":[...]}`,
//! built by concatenating their already-encoded JSON: nothing is re-serialized.
//!
//! Windows per room class: `[batch]` gives the default pace, and a `[[rooms]]` class
//! with its own `delivery_window_ms` or `leading_edge` gives its rooms another (`Pace`),
//! each with its own wall-clock ticks, so one node serves chat at 0 ms and scoreboards
//! at 250 ms. A room collects its window (the hub's `room.rs`) and at its pace's tick
//! frames it once (`room_frames`); an outbox writes such framed windows as they are.
//!
//! Because ticks are node-wide, the subscribers of one room usually drain identical
//! message lists. The first socket to assemble a batch leaves it in a small memo keyed by
//! the identity of the shared message buffers; the others write the same `Bytes`. The memo
//! holds the message handles it was keyed on, so a key cannot be reused by other data while
//! it lives, and it is emptied at every tick, so it never grows past one window's worth.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use super::Clock;
use crate::config::{BatchConfig, RoomClasses};
use crate::protocol::outbound::Builder;
use crate::protocol::Encoded;

const BATCH_OPEN: &[u8] = br#"{"type":"batch","messages":["#;
const BATCH_CLOSE: &[u8] = b"]}";
/// Most distinct batches remembered per tick; beyond this, sockets assemble their own.
const MEMO_CAPACITY: usize = 4096;
/// Most compressed frames remembered; emptied when full, since window-0 rooms have no
/// tick to empty it.
const COMPRESSED_CAPACITY: usize = 1024;

/// Which delivery window a room keeps: 0 is `[batch]`'s, others come from `[[rooms]]`
/// classes with windows of their own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Pace(u8);

impl Pace {
    /// `[batch]`'s window: every room without a class window, and everything that is not
    /// a room message (direct messages, presence, replies).
    pub const DEFAULT: Pace = Pace(0);

    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// This pace's bit in a socket's set of scheduled paces.
    pub fn bit(self) -> u64 {
        1 << self.0
    }
}

/// One pace's timing.
struct Timing {
    window: Duration,
    leading_edge: bool,
    clock: Clock,
}

impl Timing {
    fn new(window_ms: u64, leading_edge: bool) -> Timing {
        let window = Duration::from_millis(window_ms);
        Timing {
            window,
            leading_edge,
            clock: Clock::delivery(window),
        }
    }
}

/// How delivery batches: each room class's window (an interval), the leading edge, the
/// batch bounds, and the shared frames they make. ("Window" in volley is the interval;
/// what a room collected during one is its `Collected`.)
pub struct DeliveryPolicy {
    /// Indexed by `Pace`; 0 is `[batch]`'s.
    paces: Vec<Timing>,
    /// The room classes, compiled once (`config::RoomClasses`): each room's pace and
    /// conflation field.
    classes: Arc<RoomClasses>,
    max_messages: usize,
    max_bytes: usize,
    /// Bumped at every tick of any pace: batches are shared within one tick's writes.
    generation: AtomicU64,
    memo: Mutex<Memo>,
    /// `compression.min_bytes` and `compression.level`.
    compress_min: usize,
    compress_level: u32,
    /// Frames compressed for permessage-deflate sockets, shared like batches.
    compressed: Mutex<Memo>,
}

#[derive(Default)]
struct Memo {
    generation: u64,
    entries: HashMap<MemoKey, MemoEntry>,
}

/// First message's address, last message's address, count.
type MemoKey = (usize, usize, usize);

struct MemoEntry {
    /// The messages the batch was built from; also keeps their buffers alive.
    items: Vec<Bytes>,
    frame: Bytes,
}

impl DeliveryPolicy {
    /// One pace for every room: `[batch]`'s.
    pub fn new(config: &BatchConfig) -> DeliveryPolicy {
        DeliveryPolicy::with_classes(config, Arc::new(RoomClasses::plain(config)))
    }

    /// `[batch]`'s pace, and one more for each distinct window the `[[rooms]]` classes
    /// give (classes with the same window and leading edge share a pace), as `classes`
    /// compiled them.
    pub fn with_classes(config: &BatchConfig, classes: Arc<RoomClasses>) -> DeliveryPolicy {
        DeliveryPolicy {
            paces: classes
                .delivery_windows()
                .iter()
                .map(|(ms, edge)| Timing::new(*ms, *edge))
                .collect(),
            classes,
            max_messages: config.max_batch_messages.max(1),
            max_bytes: config.max_batch_bytes,
            generation: AtomicU64::new(0),
            memo: Mutex::new(Memo::default()),
            compress_min: 256,
            compress_level: 1,
            compressed: Mutex::new(Memo::default()),
        }
    }

    /// With `compression.min_bytes` and `compression.level`.
    pub fn with_compression(mut self, min_bytes: usize, level: u32) -> DeliveryPolicy {
        self.compress_min = min_bytes;
        self.compress_level = level;
        self
    }

    /// `frame` as a permessage-deflate socket gets it: compressed (RSV1) when its JSON
    /// reaches `compression.min_bytes`, else as it is. Compressed once per tick and
    /// shared: every compressing subscriber of a room writes the same bytes.
    pub fn compressed(&self, frame: &Bytes) -> Bytes {
        if crate::deflate::payload_of(frame).len() < self.compress_min {
            return frame.clone();
        }
        let generation = self.generation.load(Ordering::Relaxed);
        let key = (frame.as_ptr() as usize, frame.len(), 1);
        {
            let mut memo = self.compressed.lock();
            if memo.generation != generation || memo.entries.len() >= COMPRESSED_CAPACITY {
                memo.generation = generation;
                memo.entries.clear();
            }
            if let Some(hit) = memo.entries.get(&key) {
                if hit.items[0].as_ptr() == frame.as_ptr() {
                    return hit.frame.clone();
                }
            }
        }
        let compressed = crate::deflate::compress_frame(frame, self.compress_level);
        let mut memo = self.compressed.lock();
        if memo.generation == generation {
            memo.entries.insert(
                key,
                MemoEntry {
                    items: vec![frame.clone()],
                    frame: compressed.clone(),
                },
            );
        }
        compressed
    }

    /// The pace of `room`'s messages: its class's, else the default.
    pub fn pace_of(&self, room: &str) -> Pace {
        Pace(self.classes.delivery_pace(room) as u8)
    }

    /// The content field `room`'s messages conflate on (its class's `conflate`).
    pub fn conflate_of(&self, room: &str) -> Option<Arc<str>> {
        self.classes.conflate_of(room)
    }

    /// Whether `room`'s class offers Fossil deltas.
    pub fn offers_delta(&self, room: &str) -> bool {
        self.classes.offers_delta(room)
    }

    /// Every pace on this node.
    pub fn paces(&self) -> impl Iterator<Item = Pace> {
        (0..self.paces.len()).map(|i| Pace(i as u8))
    }

    fn timing(&self, pace: Pace) -> &Timing {
        self.paces.get(pace.index()).unwrap_or(&self.paces[0])
    }

    /// Window 0: every message of this pace leaves at once, nothing waits for a tick.
    pub fn is_immediate(&self, pace: Pace) -> bool {
        self.timing(pace).window.is_zero()
    }

    /// Whether a socket that last took messages at `last_flush` sends a new message of
    /// `pace` at once (at `now`): always with window 0, else on the leading edge after a
    /// whole quiet window.
    pub fn sends_at_once(&self, pace: Pace, last_flush: Option<Instant>, now: Instant) -> bool {
        let timing = self.timing(pace);
        if timing.window.is_zero() {
            return true;
        }
        timing.leading_edge
            && last_flush.is_none_or(|t| now.saturating_duration_since(t) >= timing.window)
    }

    /// The first tick of `pace`'s wall clock strictly after `now`.
    pub fn next_tick(&self, pace: Pace, now: Instant) -> Instant {
        self.timing(pace).clock.next_tick(now)
    }

    /// A tick begins: batches built from now on are new.
    pub fn new_tick(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// Appends to `out` the frames that carry `items`, in order: a room's framed window
    /// as it is; other messages one frame each unless `batched` (some of them waited for
    /// a window), else as few frames as the batch limits allow. `frames_of(messages, n)`
    /// hears that `n` frames carried `messages` messages each.
    pub fn frames(
        &self,
        items: &[Encoded],
        batched: bool,
        out: &mut Vec<Bytes>,
        mut frames_of: impl FnMut(usize, usize),
    ) {
        let mut start = 0;
        while start < items.len() {
            let first = &items[start];
            if let Some(messages) = first.framed() {
                out.push(first.frame().clone());
                frames_of(messages, 1);
                start += 1;
                continue;
            }
            if !batched {
                out.push(first.frame().clone());
                frames_of(1, 1);
                start += 1;
                continue;
            }
            let end = self.group_end(items, start);
            let group = &items[start..end];
            frames_of(group.len(), 1);
            if group.len() == 1 {
                out.push(group[0].frame().clone());
            } else {
                out.push(self.shared_batch(group));
            }
            start = end;
        }
    }

    /// Room-major delivery: the frames that carry one room's window of `messages` (in
    /// order, within the batch limits), built once for all its subscribers and marked
    /// framed, so an outbox writes them as they are.
    pub fn room_frames(&self, messages: &[Encoded], out: &mut Vec<Encoded>) {
        let mut start = 0;
        while start < messages.len() {
            let end = self.group_end(messages, start);
            let group = &messages[start..end];
            out.push(match group {
                [one] => one.clone().into_framed(1),
                _ => batch_frame(group).into_framed(group.len()),
            });
            start = end;
        }
    }

    /// Where the batch that starts at `items[start]` ends: before the first framed item,
    /// or where one more message would pass `max_batch_messages` or `max_batch_bytes`.
    fn group_end(&self, items: &[Encoded], start: usize) -> usize {
        let mut end = start + 1;
        let mut bytes = items[start].json().len();
        while end < items.len() && end - start < self.max_messages && items[end].framed().is_none()
        {
            let next = items[end].json().len() + 1;
            if bytes + next > self.max_bytes {
                break;
            }
            bytes += next;
            end += 1;
        }
        end
    }

    fn shared_batch(&self, group: &[Encoded]) -> Bytes {
        let generation = self.generation.load(Ordering::Relaxed);
        let key = (
            group[0].frame().as_ptr() as usize,
            group[group.len() - 1].frame().as_ptr() as usize,
            group.len(),
        );
        {
            let mut memo = self.memo.lock();
            if memo.generation != generation {
                memo.generation = generation;
                memo.entries.clear();
            }
            if let Some(hit) = memo.entries.get(&key) {
                if same_items(&hit.items, group) {
                    return hit.frame.clone();
                }
            }
        }
        let frame = batch_frame(group).frame().clone();
        let mut memo = self.memo.lock();
        if memo.generation == generation && memo.entries.len() < MEMO_CAPACITY {
            memo.entries.insert(
                key,
                MemoEntry {
                    items: group.iter().map(|e| e.frame().clone()).collect(),
                    frame: frame.clone(),
                },
            );
        }
        frame
    }
}

fn same_items(items: &[Bytes], group: &[Encoded]) -> bool {
    items.len() == group.len()
        && items
            .iter()
            .zip(group)
            .all(|(a, b)| a.as_ptr() == b.frame().as_ptr() && a.len() == b.frame().len())
}

/// `{"type":"batch","messages":[M1,M2,...]}` from already-encoded messages.
pub fn batch_frame(items: &[Encoded]) -> Encoded {
    let body: usize = items.iter().map(|e| e.json().len() + 1).sum();
    let mut b = Builder::with_capacity(BATCH_OPEN.len() + body + BATCH_CLOSE.len());
    b.raw(BATCH_OPEN);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            b.raw(b",");
        }
        b.raw(item.json());
    }
    b.raw(BATCH_CLOSE);
    b.finish()
}

#[cfg(test)]
mod tests;
