//! The delivery window: when a socket's queued messages leave, and as which frames.
//!
//! A socket that was idle for a whole window sends its next message at once (the
//! leading edge); otherwise its messages wait for the next tick of a node-wide clock and
//! leave together. Two or more messages become `{"type":"batch","messages":[...]}`,
//! built by concatenating their already-encoded JSON: nothing is re-serialized.
//!
//! Because ticks are node-wide, the subscribers of one room usually drain identical
//! message lists. The first socket to assemble a batch leaves it in a small memo keyed by
//! the identity of the shared message buffers; the others write the same `Bytes`. The memo
//! holds the message handles it was keyed on, so a key cannot be reused by other data while
//! it lives, and it is emptied every tick, so it never grows past one window's worth.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use super::Clock;
use crate::config::BatchConfig;
use crate::protocol::outbound::Builder;
use crate::protocol::Encoded;

const BATCH_OPEN: &[u8] = br#"{"type":"batch","messages":["#;
const BATCH_CLOSE: &[u8] = b"]}";
/// Most distinct batches remembered per tick; beyond this, sockets assemble their own.
const MEMO_CAPACITY: usize = 4096;

pub struct DeliveryWindow {
    window: Duration,
    leading_edge: bool,
    max_messages: usize,
    max_bytes: usize,
    clock: Clock,
    memo: Mutex<Memo>,
}

#[derive(Default)]
struct Memo {
    tick: u64,
    entries: HashMap<MemoKey, MemoEntry>,
}

/// First message's address, last message's address, count.
type MemoKey = (usize, usize, usize);

struct MemoEntry {
    /// The messages the batch was built from; also keeps their buffers alive.
    items: Vec<Bytes>,
    frame: Bytes,
}

impl DeliveryWindow {
    pub fn new(config: &BatchConfig) -> DeliveryWindow {
        DeliveryWindow {
            window: Duration::from_millis(config.delivery_window_ms),
            leading_edge: config.leading_edge,
            max_messages: config.max_batch_messages.max(1),
            max_bytes: config.max_batch_bytes,
            clock: Clock::delivery(Duration::from_millis(config.delivery_window_ms)),
            memo: Mutex::new(Memo::default()),
        }
    }

    /// Window 0: every message leaves at once, nothing waits for a tick.
    pub fn is_immediate(&self) -> bool {
        self.window.is_zero()
    }

    /// Whether a socket that last took messages at `last_flush` sends a new one at once
    /// (at `now`): always with window 0, else on the leading edge after a whole quiet
    /// window.
    pub fn sends_at_once(&self, last_flush: Option<Instant>, now: Instant) -> bool {
        if self.window.is_zero() {
            return true;
        }
        self.leading_edge
            && last_flush.is_none_or(|t| now.saturating_duration_since(t) >= self.window)
    }

    /// The first tick of the node-wide window clock strictly after `now`.
    pub fn next_tick(&self, now: Instant) -> Instant {
        self.clock.next_tick(now)
    }

    fn tick_index(&self, now: Instant) -> u64 {
        self.clock.tick_index(now)
    }

    /// Appends to `out` the frames that carry `items`, in order: one frame per message
    /// when the window is 0, else as few frames as the batch limits allow.
    /// `frames_of(messages, n)` hears that `n` frames carried `messages` messages each.
    pub fn frames(
        &self,
        items: &[Encoded],
        out: &mut Vec<Bytes>,
        mut frames_of: impl FnMut(usize, usize),
    ) {
        if self.window.is_zero() {
            out.extend(items.iter().map(|e| e.frame().clone()));
            frames_of(1, items.len());
            return;
        }
        let mut start = 0;
        while start < items.len() {
            let mut end = start + 1;
            let mut bytes = items[start].json().len();
            while end < items.len() && end - start < self.max_messages {
                let next = items[end].json().len() + 1;
                if bytes + next > self.max_bytes {
                    break;
                }
                bytes += next;
                end += 1;
            }
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

    fn shared_batch(&self, group: &[Encoded]) -> Bytes {
        let tick = self.tick_index(Instant::now());
        let key = (
            group[0].frame().as_ptr() as usize,
            group[group.len() - 1].frame().as_ptr() as usize,
            group.len(),
        );
        {
            let mut memo = self.memo.lock();
            if memo.tick != tick {
                memo.tick = tick;
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
        if memo.tick == tick && memo.entries.len() < MEMO_CAPACITY {
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
mod tests {
    use super::*;

    fn window(ms: u64, max_messages: usize, max_bytes: usize) -> DeliveryWindow {
        DeliveryWindow::new(&BatchConfig {
            delivery_window_ms: ms,
            leading_edge: true,
            max_batch_messages: max_messages,
            max_batch_bytes: max_bytes,
            publish_window_ms: 50,
        })
    }

    fn msg(n: u32) -> Encoded {
        Encoded::from_json(format!(r#"{{"n":{n}}}"#).as_bytes())
    }

    /// The payload of a server frame (unmasked; RFC 6455 length encoding).
    fn body(frame: &Bytes) -> &[u8] {
        let h = match frame[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        &frame[h..]
    }

    mod any_messages {
        use super::*;
        use proptest::prelude::*;
        use serde_json::Value;

        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                // Decimals serde_json parses back exactly (its default float parsing is
                // not exact for every 17-digit number; volley forwards the bytes anyway).
                (-1_000_000_000i64..1_000_000_000).prop_map(|n| Value::from(n as f64 / 1000.0)),
                ".{0,12}".prop_map(Value::from),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                    prop::collection::btree_map(".{0,6}", inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        /// The messages a client would see in these frames, batches unwrapped, in order.
        fn unwrap(frames: &[Bytes]) -> Vec<Value> {
            let mut out = Vec::new();
            for frame in frames {
                let v: Value = serde_json::from_slice(body(frame)).expect("a JSON frame");
                if v["type"] == "batch" {
                    out.extend(v["messages"].as_array().expect("messages").iter().cloned());
                } else {
                    out.push(v);
                }
            }
            out
        }

        proptest! {
            #[test]
            fn batch_frames_carry_exactly_the_messages_in_order(
                messages in prop::collection::vec((".{0,16}", json(), any::<u32>()), 1..40),
                max_messages in 1usize..12,
                max_bytes in 1usize..4096,
            ) {
                let w = window(50, max_messages, max_bytes);
                let items: Vec<Encoded> = messages
                    .iter()
                    .map(|(room, content, ts)| {
                        let raw = serde_json::value::to_raw_value(content).unwrap();
                        crate::protocol::outbound::room_message(room, &raw, u64::from(*ts))
                    })
                    .collect();
                let mut out = Vec::new();
                w.frames(&items, &mut out, |_, _| {});
                let want: Vec<Value> = items
                    .iter()
                    .map(|e| serde_json::from_slice(e.json()).unwrap())
                    .collect();
                prop_assert_eq!(unwrap(&out), want);
                for (got, (room, content, _)) in unwrap(&out).iter().zip(&messages) {
                    prop_assert_eq!(&got["roomId"], &Value::from(room.as_str()));
                    prop_assert_eq!(&got["content"], content);
                }
            }
        }
    }

    #[test]
    fn two_or_more_become_one_batch_frame() {
        let w = window(50, 100, 1 << 20);
        let items = [msg(1), msg(2), msg(3)];
        let mut out = Vec::new();
        w.frames(&items, &mut out, |_, _| {});
        assert_eq!(out.len(), 1);
        assert_eq!(
            body(&out[0]),
            br#"{"type":"batch","messages":[{"n":1},{"n":2},{"n":3}]}"#
        );
    }

    #[test]
    fn one_message_goes_bare_and_shared() {
        let w = window(50, 100, 1 << 20);
        let items = [msg(7)];
        let mut out = Vec::new();
        w.frames(&items, &mut out, |_, _| {});
        assert_eq!(out[0].as_ptr(), items[0].frame().as_ptr());
    }

    #[test]
    fn limits_split_batches_in_order() {
        let w = window(50, 2, 1 << 20);
        let items: Vec<_> = (1..=5).map(msg).collect();
        let mut out = Vec::new();
        w.frames(&items, &mut out, |_, _| {});
        let bodies: Vec<_> = out.iter().map(|f| body(f).to_vec()).collect();
        assert_eq!(
            bodies,
            vec![
                br#"{"type":"batch","messages":[{"n":1},{"n":2}]}"#.to_vec(),
                br#"{"type":"batch","messages":[{"n":3},{"n":4}]}"#.to_vec(),
                br#"{"n":5}"#.to_vec(),
            ]
        );
        let w = window(50, 100, 1024);
        let big: Vec<_> = (0..3)
            .map(|_| Encoded::from_json(&vec![b'1'; 600]))
            .collect();
        let mut out = Vec::new();
        w.frames(&big, &mut out, |_, _| {});
        assert_eq!(
            out.len(),
            3,
            "each 600-byte message alone under a 1024-byte cap"
        );
    }

    #[test]
    fn identical_lists_share_one_batch() {
        let w = window(60_000, 100, 1 << 20);
        let items = [msg(1), msg(2)];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        w.frames(&items, &mut a, |_, _| {});
        w.frames(&items.clone(), &mut b, |_, _| {});
        assert_eq!(
            a[0].as_ptr(),
            b[0].as_ptr(),
            "second socket reuses the first's frame"
        );
        let other = [msg(1), msg(2)];
        let mut c = Vec::new();
        w.frames(&other, &mut c, |_, _| {});
        assert_ne!(
            a[0].as_ptr(),
            c[0].as_ptr(),
            "equal text, different messages"
        );
    }

    #[test]
    fn window_zero_is_one_frame_per_message() {
        let w = window(0, 100, 1 << 20);
        let items = [msg(1), msg(2)];
        let mut out = Vec::new();
        w.frames(&items, &mut out, |_, _| {});
        assert_eq!(out.len(), 2);
        let now = Instant::now();
        assert!(w.sends_at_once(Some(now), now));
    }

    #[test]
    fn leading_edge_only_after_a_quiet_window() {
        let w = window(50, 100, 1 << 20);
        let now = Instant::now();
        assert!(w.sends_at_once(None, now));
        assert!(!w.sends_at_once(Some(now), now));
        assert!(w.sends_at_once(Some(now - Duration::from_millis(60)), now));
        let at = w.next_tick(now);
        assert!(at > now && at <= now + Duration::from_millis(50));
    }
}
