//! The publish queue between callers (any thread, any socket) and the publisher task: a
//! short `parking_lot` lock around a `Vec` that the publisher swaps out whole once per
//! window. Measured against a crossbeam channel (`benches/choices.rs`, tuning.md): one
//! lock per batch and one swap per window beat a channel's per-envelope send and receive.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::broker::{Envelope, PublishError, Target};
use crate::config::RoomClasses;

/// Which publish window an envelope waits for: pace 0 is `batch.publish_window_ms`, the
/// others come from `[[rooms]]` classes with a `publish_window_ms` of their own (classes
/// with equal windows share one; `config::RoomClasses` compiles them). Broadcasts and
/// direct messages keep pace 0.
pub struct PublishPaces {
    windows: Vec<Duration>,
    classes: Arc<RoomClasses>,
}

impl PublishPaces {
    /// The paces of the node's room classes, compiled once and shared with its delivery.
    pub fn new(classes: Arc<RoomClasses>) -> PublishPaces {
        PublishPaces {
            windows: classes
                .publish_windows()
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
            classes,
        }
    }

    /// How many publish windows there are.
    pub fn count(&self) -> usize {
        self.windows.len()
    }

    /// Pace `pace`'s window; zero sends as soon as the previous pipeline returns.
    pub fn window(&self, pace: usize) -> Duration {
        self.windows.get(pace).copied().unwrap_or_default()
    }

    fn pace_of(&self, envelope: &Envelope) -> usize {
        match &envelope.target {
            // One window for all: no class lookup on the hot path.
            _ if self.windows.len() == 1 => 0,
            Target::Room(room) => self.classes.publish_pace(room),
            Target::Broadcast | Target::User(_) => 0,
        }
    }
}

/// The publish queue between callers and the publisher task.
pub struct PublishQueue {
    items: Mutex<Queued>,
    paces: PublishPaces,
    /// `redis.outage_buffer`: most publishes queued here and held by the publisher
    /// together. A publish past it is refused, so nothing accepted is ever dropped for
    /// room.
    capacity: usize,
    /// Publishes the publisher task holds (taken, not yet sent).
    pub(super) held: AtomicUsize,
    pub(super) ready: tokio::sync::Notify,
}

impl PublishQueue {
    pub fn new(capacity: usize, paces: PublishPaces) -> PublishQueue {
        PublishQueue {
            items: Mutex::new(Queued {
                items: (0..paces.count()).map(|_| Vec::new()).collect(),
                doubtful: Vec::new(),
                since: None,
                len: 0,
            }),
            paces,
            capacity,
            held: AtomicUsize::new(0),
            ready: tokio::sync::Notify::new(),
        }
    }

    /// Queues a batch of envelopes, all or none: refused when the queue and what the
    /// publisher holds would pass the capacity.
    pub fn push(&self, batch: &[Envelope]) -> Result<(), PublishError> {
        let mut queued = self.items.lock();
        if queued.len + self.held.load(Relaxed) + batch.len() > self.capacity {
            return Err(PublishError::Overloaded);
        }
        if queued.len == 0 {
            queued.since = Some(Instant::now());
        }
        // The publisher hears of a pace that had nothing queued: it may be due sooner
        // than the one the publisher is waiting for.
        let mut wake = false;
        for envelope in batch {
            let pace = self.paces.pace_of(envelope);
            let items = &mut queued.items[pace];
            wake |= items.is_empty();
            items.push(envelope.clone());
        }
        queued.len += batch.len();
        drop(queued);
        if wake {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Publishes queued or held by the publisher, and the most there may be
    /// (`redis.outage_buffer`): how full the outage buffer is.
    pub fn fill(&self) -> (usize, usize) {
        let queued = self.items.lock().len;
        (queued + self.held.load(Relaxed), self.capacity)
    }

    /// The publish windows, for the publisher's clocks.
    pub fn paces(&self) -> &PublishPaces {
        &self.paces
    }

    /// The paces with something queued, as bits.
    pub fn queued_paces(&self) -> u64 {
        let queued = self.items.lock();
        queued
            .items
            .iter()
            .enumerate()
            .filter(|(_, items)| !items.is_empty())
            .fold(0, |bits, (pace, _)| bits | 1 << pace)
    }

    /// Queues durable messages another engine sent without an answer, ahead of the
    /// rest. Not bounded here: they were accepted, and counted, by that engine's queue.
    pub fn push_doubtful(&self, batch: &[Envelope]) {
        if batch.is_empty() {
            return;
        }
        self.items.lock().doubtful.extend_from_slice(batch);
        self.ready.notify_one();
    }

    /// Whether doubtful messages wait: they are due at once, whatever the windows.
    pub fn has_doubtful(&self) -> bool {
        !self.items.lock().doubtful.is_empty()
    }

    /// Takes the doubtful messages queued (see `push_doubtful`).
    pub fn take_doubtful(&self, into: &mut Vec<Envelope>) {
        into.append(&mut self.items.lock().doubtful);
    }

    /// Takes everything queued; returns when the oldest of it was queued.
    pub fn take(&self, into: &mut Vec<Envelope>) -> Option<Instant> {
        self.take_paces(u64::MAX, into)
    }

    /// Takes what is queued for the paces in `paces` (bits), in pace order; returns when
    /// the oldest queued message was queued (the rest keep their place).
    pub fn take_paces(&self, paces: u64, into: &mut Vec<Envelope>) -> Option<Instant> {
        let mut queued = self.items.lock();
        let mut taken = 0;
        for (pace, items) in queued.items.iter_mut().enumerate() {
            if paces & (1 << pace) != 0 {
                taken += items.len();
                if into.is_empty() {
                    std::mem::swap(items, into);
                } else {
                    into.append(items);
                }
            }
        }
        queued.len -= taken;
        if queued.len == 0 {
            queued.since.take()
        } else {
            queued.since
        }
    }
}

struct Queued {
    /// Per publish pace.
    items: Vec<Vec<Envelope>>,
    /// Envelopes in `items`, all paces.
    len: usize,
    doubtful: Vec<Envelope>,
    /// When the oldest queued item was queued; for the publish latency histogram.
    since: Option<Instant>,
}
