//! The node's due lists: sockets with messages waiting for the next delivery tick, one
//! list per pace (the default window and each room class's), and the one task per pace
//! that flushes them at each tick (instead of a timer per socket per window). The tick
//! times are the delivery window's policy (`batch`); this is who acts on them.

use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::Mutex;

use super::{Outbox, SocketWrite};
use crate::batch::{DeliveryPolicy, Pace};

pub struct DueList<W: SocketWrite = super::SocketOut> {
    /// Per pace; each socket is listed at most once per tick (`Outbox::push_paced` sees
    /// to it).
    due: Vec<Mutex<Vec<Arc<Outbox<W>>>>>,
    /// The node writes through io_uring (`server.io_uring`).
    io_uring: bool,
}

impl<W: SocketWrite> Default for DueList<W> {
    /// Lists for the default pace only.
    fn default() -> Self {
        DueList::new(1)
    }
}

impl<W: SocketWrite> DueList<W> {
    /// Lists for `paces` paces.
    pub fn new(paces: usize) -> DueList<W> {
        DueList {
            due: (0..paces.max(1)).map(|_| Mutex::default()).collect(),
            io_uring: false,
        }
    }

    /// Writes through io_uring where it can (`server.io_uring`).
    pub fn with_io_uring(mut self, on: bool) -> DueList<W> {
        self.io_uring = on;
        self
    }

    pub(super) fn io_uring(&self) -> bool {
        self.io_uring
    }

    /// Lists a socket for `pace`'s next tick.
    pub fn schedule(&self, pace: Pace, outbox: Arc<Outbox<W>>) {
        self.due
            .get(pace.index())
            .unwrap_or(&self.due[0])
            .lock()
            .push(outbox);
    }

    /// Flushes the sockets due at each tick of `pace`, until the list is dropped or
    /// `first` says to stop. At every tick `first(pace)` runs before the sockets are
    /// written: the node's rooms deliver their collected windows there (room-major
    /// delivery), so what they push leaves in the same writes.
    pub async fn run_ticks(
        list: Weak<DueList<W>>,
        policy: Arc<DeliveryPolicy>,
        pace: Pace,
        first: impl Fn(Pace) -> bool,
    ) {
        // Window 0 sends everything at once and never schedules: no clock to run (it
        // would wake every millisecond for nothing).
        if policy.is_immediate(pace) {
            return;
        }
        let mut due = Vec::new();
        loop {
            let next = policy.next_tick(pace, Instant::now());
            tokio::time::sleep_until(next.into()).await;
            let Some(list) = list.upgrade() else {
                return;
            };
            policy.new_tick();
            if !first(pace) {
                return;
            }
            match list.due.get(pace.index()) {
                Some(listed) => std::mem::swap(&mut *listed.lock(), &mut due),
                None => return,
            }
            drop(list);
            for outbox in due.drain(..) {
                outbox.tick(pace);
            }
        }
    }
}
