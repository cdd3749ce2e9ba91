//! The publish queue between callers (any thread, any socket) and the publisher task: a
//! short `parking_lot` lock around a `Vec` that the publisher swaps out whole once per
//! window. Measured against a crossbeam channel (`benches/choices.rs`, tuning.md): one
//! lock per batch and one swap per window beat a channel's per-envelope send and receive.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use parking_lot::Mutex;

use crate::broker::{Envelope, PublishError};

/// The publish queue between callers and the publisher task.
pub struct PublishQueue {
    items: Mutex<Queued>,
    /// `redis.outage_buffer`: most publishes queued here and held by the publisher
    /// together. A publish past it is refused, so nothing accepted is ever dropped for
    /// room.
    capacity: usize,
    /// Publishes the publisher task holds (taken, not yet sent).
    pub(super) held: AtomicUsize,
    pub(super) ready: tokio::sync::Notify,
}

impl PublishQueue {
    pub fn new(capacity: usize) -> PublishQueue {
        PublishQueue {
            items: Mutex::new(Queued::default()),
            capacity,
            held: AtomicUsize::new(0),
            ready: tokio::sync::Notify::new(),
        }
    }

    /// Queues a batch of envelopes, all or none: refused when the queue and what the
    /// publisher holds would pass the capacity.
    pub fn push(&self, batch: &[Envelope]) -> Result<(), PublishError> {
        let mut queued = self.items.lock();
        if queued.items.len() + self.held.load(Relaxed) + batch.len() > self.capacity {
            return Err(PublishError::Overloaded);
        }
        let was_empty = queued.items.is_empty();
        queued.items.extend_from_slice(batch);
        if was_empty {
            queued.since = Some(Instant::now());
        }
        drop(queued);
        if was_empty {
            self.ready.notify_one();
        }
        Ok(())
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

    /// Takes the doubtful messages queued (see `push_doubtful`).
    pub fn take_doubtful(&self, into: &mut Vec<Envelope>) {
        into.append(&mut self.items.lock().doubtful);
    }

    /// Takes everything queued; returns when the oldest of it was queued.
    pub fn take(&self, into: &mut Vec<Envelope>) -> Option<Instant> {
        let mut queued = self.items.lock();
        std::mem::swap(&mut queued.items, into);
        queued.since.take()
    }
}

#[derive(Default)]
struct Queued {
    items: Vec<Envelope>,
    doubtful: Vec<Envelope>,
    /// When the oldest queued item was queued; for the publish latency histogram.
    since: Option<Instant>,
}
