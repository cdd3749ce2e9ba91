//! The node's due list: sockets with messages waiting for the next delivery tick, and
//! the one task per node that flushes them at each tick (instead of a timer per socket
//! per window). The tick times are the delivery window's policy (`batch`); this is who
//! acts on them.

use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::Mutex;

use super::{Outbox, SocketWrite};
use crate::batch::DeliveryWindow;

pub struct DueList<W: SocketWrite = super::SocketOut> {
    /// Each socket is listed at most once per window (`Outbox::push` sees to it).
    due: Mutex<Vec<Arc<Outbox<W>>>>,
}

impl<W: SocketWrite> Default for DueList<W> {
    fn default() -> Self {
        DueList {
            due: Mutex::new(Vec::new()),
        }
    }
}

impl<W: SocketWrite> DueList<W> {
    /// Lists a socket for the next tick.
    pub fn schedule(&self, outbox: Arc<Outbox<W>>) {
        self.due.lock().push(outbox);
    }

    /// Flushes the sockets due at each tick of `window`, until the list is dropped.
    pub async fn run_ticks(list: Weak<DueList<W>>, window: Arc<DeliveryWindow>) {
        // Window 0 sends everything at once and never schedules: no clock to run (it
        // would wake every millisecond for nothing).
        if window.is_immediate() {
            return;
        }
        let mut due = Vec::new();
        loop {
            let next = window.next_tick(Instant::now());
            tokio::time::sleep_until(next.into()).await;
            let Some(list) = list.upgrade() else {
                return;
            };
            std::mem::swap(&mut *list.due.lock(), &mut due);
            drop(list);
            for outbox in due.drain(..) {
                outbox.flush();
            }
        }
    }
}
