//! A durable room's history in memory: the embedded engine's equivalent of a Redis
//! stream with its offset counter and epoch, and a state room's board beside it (the
//! Redis board hash). Pure bookkeeping; the engine owns the locks.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use indexmap::IndexMap;

use super::{History, Refused, Snapshot};
use crate::config::{BoardLimits, Durability};
use crate::protocol::board::{self, BoardWrite};
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
    /// A state room's latest entry per key (raw JSON), as the messages up to `last` left it.
    board: IndexMap<Bytes, Entry>,
}

/// One entry of a board: `{"key","content","offset"}`, and when it was last written.
struct Entry {
    json: Bytes,
    written: Instant,
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
            board: IndexMap::new(),
        }
    }

    pub fn epoch(&self) -> &Arc<str> {
        &self.epoch
    }

    /// The offset of the newest message; 0 before the first.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// The history expired: nothing was published for the class's TTL.
    pub fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.touched) >= self.durability.ttl
    }

    /// Appends a state room's message and writes its board in the same step: the message
    /// with its offset, `None` for the removal of an entry the board does not have (it
    /// changes nothing), or the refusal of a new key past `state_max_keys`.
    pub fn write(
        &mut self,
        frame: &Encoded,
        write: &BoardWrite,
        now: Instant,
    ) -> Result<Option<Encoded>, Refused> {
        let limits = self.limits();
        if write.is_removal() {
            if self.board.swap_remove(&write.key).is_none() {
                return Ok(None);
            }
            return Ok(Some(self.append(frame, now)));
        }
        if !self.board.contains_key(&write.key) && self.board.len() >= limits.max_keys {
            return Err(Refused::StateFull {
                max_keys: limits.max_keys,
            });
        }
        let message = self.append(frame, now);
        if let Some(json) = write.entry(frame.json(), self.last) {
            self.board
                .insert(write.key.clone(), Entry { json, written: now });
        }
        Ok(Some(message))
    }

    /// The entries of `room`'s board not written for `state_ttl_s` leave it: each one's
    /// removal, appended, in order.
    pub fn expire(&mut self, room: &str, now: Instant) -> Vec<Encoded> {
        let Some(ttl) = self.limits().entry_ttl else {
            return Vec::new();
        };
        let old: Vec<Bytes> = self
            .board
            .iter()
            .filter(|(_, e)| now.saturating_duration_since(e.written) >= ttl)
            .map(|(key, _)| key.clone())
            .collect();
        let mut removals = Vec::with_capacity(old.len());
        for key in old {
            let removal = board::removal(room, std::str::from_utf8(&key).unwrap_or("null"));
            if let Ok(Some(message)) = self.write(&removal.frame, &removal.write, now) {
                removals.push(message);
            }
        }
        removals
    }

    fn limits(&self) -> BoardLimits {
        self.durability.board.unwrap_or(BoardLimits {
            max_keys: usize::MAX,
            entry_ttl: None,
        })
    }

    /// The board now: its entries (those not expired) at the newest offset.
    fn snapshot(&self, now: Instant) -> Snapshot {
        let ttl = self.limits().entry_ttl;
        Snapshot {
            offset: self.last,
            entries: self
                .board
                .values()
                .filter(|e| ttl.is_none_or(|ttl| now.saturating_duration_since(e.written) < ttl))
                .map(|e| e.json.clone())
                .collect(),
        }
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

    pub fn query(&self, replay: &Replay, now: Instant) -> History {
        let newest = |n: usize| -> Vec<Encoded> {
            let skip = self.items.len().saturating_sub(n);
            self.items.iter().skip(skip).cloned().collect()
        };
        let whole = |offset: u64, epoch: &str| {
            *epoch == *self.epoch && offset <= self.last && offset.saturating_add(1) >= self.first()
        };
        let mut board = None;
        let (messages, recovered) = match replay {
            Replay::Last(n) => (newest(*n), None),
            Replay::Since { offset, epoch } if whole(*offset, epoch) => {
                (newest((self.last - offset) as usize), Some(true))
            }
            Replay::Since { .. } => (newest(self.items.len()), Some(false)),
            Replay::SinceOrSnapshot { offset, epoch } if whole(*offset, epoch) => {
                (newest((self.last - offset) as usize), Some(true))
            }
            Replay::SinceOrSnapshot { .. } => {
                board = Some(self.snapshot(now));
                (Vec::new(), Some(false))
            }
            Replay::Snapshot => {
                board = Some(self.snapshot(now));
                (Vec::new(), None)
            }
        };
        History {
            epoch: self.epoch.clone(),
            messages,
            offset: self.last,
            recovered,
            board,
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
                board: None,
            },
            Instant::now(),
        )
    }

    impl Ring {
        fn query_now(&self, replay: &Replay) -> History {
            self.query(replay, Instant::now())
        }
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
        assert_eq!(offsets(&r.query_now(&Replay::Last(10))), vec![3, 4, 5]);
        assert_eq!(offsets(&r.query_now(&Replay::Last(1))), vec![5]);
        let since = |offset, epoch: &str| Replay::Since {
            offset,
            epoch: epoch.into(),
        };
        let epoch = r.epoch.to_string();
        let h = r.query_now(&since(3, &epoch));
        assert_eq!((offsets(&h), h.recovered), (vec![4, 5], Some(true)));
        let h = r.query_now(&since(2, &epoch));
        assert_eq!((offsets(&h), h.recovered), (vec![3, 4, 5], Some(true)));
        let h = r.query_now(&since(5, &epoch));
        assert_eq!((offsets(&h), h.recovered), (vec![], Some(true)));
        // Trimmed past the position, or another epoch: not recovered, the latest instead.
        let h = r.query_now(&since(1, &epoch));
        assert_eq!((offsets(&h), h.recovered), (vec![3, 4, 5], Some(false)));
        let h = r.query_now(&since(4, "another"));
        assert_eq!(h.recovered, Some(false));
        let h = r.query_now(&since(9, &epoch));
        assert_eq!(h.recovered, Some(false), "a position from the future");
    }
}
