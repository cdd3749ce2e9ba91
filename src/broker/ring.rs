//! A durable room's history in memory: the embedded engine's equivalent of a Redis
//! stream with its offset counter and epoch. Pure bookkeeping; the engine owns the locks.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use super::History;
use crate::config::Durability;
use crate::protocol::inbound::Replay;
use crate::protocol::{now_ms, outbound, Encoded};

pub(crate) struct Ring {
    epoch: Arc<str>,
    /// The offset of the newest message; 0 before the first.
    last: u64,
    /// The kept messages, oldest first, each with its offset.
    items: VecDeque<Encoded>,
    touched: Instant,
    durability: Durability,
}

/// A new epoch: unique enough that a client never mistakes one history for another.
pub(crate) fn new_epoch() -> Arc<str> {
    Arc::from(format!("{:x}-{:08x}", now_ms(), fastrand::u32(..)))
}

impl Ring {
    pub fn new(durability: Durability, now: Instant) -> Ring {
        Ring {
            epoch: new_epoch(),
            last: 0,
            items: VecDeque::new(),
            touched: now,
            durability,
        }
    }

    pub fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    /// The history expired: nothing was published for the class's TTL.
    pub fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.touched) >= self.durability.ttl
    }

    /// Appends a message frame; returns it with its offset.
    pub fn append(&mut self, frame: &Encoded, now: Instant) -> Encoded {
        self.last += 1;
        let message = outbound::with_offset(frame, self.last);
        self.items.push_back(message.clone());
        while self.items.len() > self.durability.history_size {
            self.items.pop_front();
        }
        self.touched = now;
        message
    }

    /// The offset of the oldest kept message (`last + 1` when none is kept).
    fn first(&self) -> u64 {
        self.last + 1 - self.items.len() as u64
    }

    pub fn query(&self, replay: &Replay) -> History {
        let newest = |n: usize| -> Vec<Encoded> {
            let skip = self.items.len().saturating_sub(n);
            self.items.iter().skip(skip).cloned().collect()
        };
        let (messages, recovered) = match replay {
            Replay::Last(n) => (newest(*n), None),
            Replay::Since { offset, epoch } => {
                let whole = **epoch == *self.epoch
                    && *offset <= self.last
                    && offset.saturating_add(1) >= self.first();
                if whole {
                    (newest((self.last - offset) as usize), Some(true))
                } else {
                    (newest(self.items.len()), Some(false))
                }
            }
        };
        History {
            epoch: self.epoch.clone(),
            messages,
            recovered,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ring(size: usize) -> Ring {
        Ring::new(
            Durability {
                history_size: size,
                ttl: Duration::from_secs(60),
            },
            Instant::now(),
        )
    }

    fn offsets(h: &History) -> Vec<u64> {
        h.messages
            .iter()
            .map(|m| outbound::offset_of(m.json()).unwrap())
            .collect()
    }

    #[test]
    fn offsets_count_up_by_one_and_the_ring_keeps_its_size() {
        let mut r = ring(3);
        let m = Encoded::from_json(br#"{"type":"message","roomId":"r","content":1,"timestamp":1}"#);
        for _ in 0..5 {
            r.append(&m, Instant::now());
        }
        assert_eq!(offsets(&r.query(&Replay::Last(10))), vec![3, 4, 5]);
        assert_eq!(offsets(&r.query(&Replay::Last(1))), vec![5]);
        let since = |offset, epoch: &str| Replay::Since {
            offset,
            epoch: epoch.into(),
        };
        let epoch = r.epoch.to_string();
        let h = r.query(&since(3, &epoch));
        assert_eq!((offsets(&h), h.recovered), (vec![4, 5], Some(true)));
        let h = r.query(&since(2, &epoch));
        assert_eq!((offsets(&h), h.recovered), (vec![3, 4, 5], Some(true)));
        let h = r.query(&since(5, &epoch));
        assert_eq!((offsets(&h), h.recovered), (vec![], Some(true)));
        // Trimmed past the position, or another epoch: not recovered, the latest instead.
        let h = r.query(&since(1, &epoch));
        assert_eq!((offsets(&h), h.recovered), (vec![3, 4, 5], Some(false)));
        let h = r.query(&since(4, "another"));
        assert_eq!(h.recovered, Some(false));
        let h = r.query(&since(9, &epoch));
        assert_eq!(h.recovered, Some(false), "a position from the future");
    }
}
