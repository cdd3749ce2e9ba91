//! One socket's outbox: the bounded queue between fan-out and the socket's writer.
//!
//! Fan-out pushes shared `Encoded` handles under a short `parking_lot` lock (never held
//! across an `.await`); the writer swaps the whole queue out in one step. The byte bound
//! is the slow-consumer rule: a push that would pass `limits.max_outbox_bytes` empties the
//! queue and marks the socket for closing with 1008, so a reader that stopped reading costs
//! at most one outbox of memory, and nobody else waits for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::batch::DeliveryWindow;
use crate::protocol::{close_code, outbound, Encoded};

/// Identifies one socket on this node.
pub type ConnId = u64;

/// Why a socket is closing; the first reason recorded wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The outbox overflowed: close 1008 `slow consumer`, queued messages dropped.
    SlowConsumer,
    /// volley closes for a protocol reason (1009 too big, 1007 bad UTF-8, 1002 ...).
    Protocol { code: u16, reason: String },
    /// The client sent a close frame; this is the encoded echo.
    Echo(Bytes),
    /// The node is shutting down: flush what is queued, then close 1001.
    Shutdown,
    /// The peer is gone (EOF or a write error): nothing more can be sent.
    Gone,
}

impl CloseReason {
    /// The close frame to send, if the peer can still receive one.
    pub fn frame(&self) -> Option<Bytes> {
        match self {
            CloseReason::SlowConsumer => {
                Some(outbound::close_frame(close_code::POLICY, "slow consumer"))
            }
            CloseReason::Protocol { code, reason } => Some(outbound::close_frame(*code, reason)),
            CloseReason::Echo(frame) => Some(frame.clone()),
            CloseReason::Shutdown => Some(outbound::close_frame(
                close_code::GOING_AWAY,
                "server shutting down",
            )),
            CloseReason::Gone => None,
        }
    }
}

/// What happened to a pushed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// This push overflowed the outbox: the socket is now closing as a slow consumer.
    Overflowed,
    /// The socket was already closing; the message was dropped.
    Closed,
}

pub struct Outbox {
    id: ConnId,
    max_bytes: usize,
    state: Mutex<State>,
    /// Decides when a queued message may leave: at once, or at the next window tick.
    window: Arc<DeliveryWindow>,
    /// Wakes the writer: at once (leading edge, window 0, control, close) or from the
    /// window's tick.
    wake: Notify,
    /// Set once a close reason is recorded: the reader stops, the writer's wait ends.
    /// An atomic, not a CancellationToken: the writer checks it on every wake-up.
    closing: AtomicBool,
    closed: Notify,
}

#[derive(Default)]
struct State {
    queue: Vec<Encoded>,
    bytes: usize,
    control: Vec<Bytes>,
    close: Option<CloseReason>,
    /// The writer has been woken or is scheduled for the next tick: pushes only queue.
    wake_pending: bool,
    /// When the writer last took messages; decides the leading edge.
    last_flush: Option<Instant>,
}

/// What the writer takes from the outbox in one step.
#[derive(Default)]
pub struct Drained {
    pub messages: Vec<Encoded>,
    pub control: Vec<Bytes>,
    pub close: Option<CloseReason>,
}

impl Outbox {
    pub fn new(id: ConnId, max_bytes: usize, window: Arc<DeliveryWindow>) -> Outbox {
        Outbox {
            id,
            max_bytes,
            state: Mutex::new(State::default()),
            window,
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            closed: Notify::new(),
        }
    }

    pub fn id(&self) -> ConnId {
        self.id
    }

    /// Queues a message for this socket. The first message after a flush either wakes
    /// the writer at once (window 0, or the socket was idle for a whole window) or puts
    /// the socket on the window's list for the next tick; later ones only queue, so a
    /// busy window costs one wake-up per socket, not one per message.
    pub fn push(self: &Arc<Self>, message: &Encoded) -> Pushed {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return Pushed::Closed;
        }
        if state.bytes + message.wire_len() > self.max_bytes {
            state.queue.clear();
            state.bytes = 0;
            state.close = Some(CloseReason::SlowConsumer);
            drop(state);
            self.mark_closing();
            return Pushed::Overflowed;
        }
        state.queue.push(message.clone());
        state.bytes += message.wire_len();
        if state.wake_pending {
            return Pushed::Queued;
        }
        state.wake_pending = true;
        let now_ok = self.window.sends_at_once(state.last_flush);
        drop(state);
        if now_ok {
            self.wake.notify_one();
        } else {
            self.window.schedule(self.clone());
        }
        Pushed::Queued
    }

    /// Wakes the writer; called by the window's tick.
    pub fn wake_writer(&self) {
        self.wake.notify_one();
    }

    /// Queues a control frame (a pong) ahead of the next messages.
    pub fn push_control(&self, frame: Bytes) {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return;
        }
        state.control.push(frame);
        drop(state);
        self.wake.notify_one();
    }

    /// Asks the writer to close the socket. Returns false if it was already closing.
    pub fn close(&self, reason: CloseReason) -> bool {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return false;
        }
        if matches!(reason, CloseReason::Gone | CloseReason::Echo(_)) {
            state.queue.clear();
            state.bytes = 0;
        }
        state.close = Some(reason);
        drop(state);
        self.mark_closing();
        true
    }

    fn mark_closing(&self) {
        self.closing.store(true, Ordering::Release);
        self.closed.notify_waiters();
        self.wake.notify_one();
    }

    /// Takes everything queued, reusing the vectors in `into`.
    pub fn drain(&self, into: &mut Drained) {
        let mut state = self.state.lock();
        std::mem::swap(&mut state.queue, &mut into.messages);
        std::mem::swap(&mut state.control, &mut into.control);
        state.bytes = 0;
        state.wake_pending = false;
        if !into.messages.is_empty() {
            state.last_flush = Some(Instant::now());
        }
        into.close = state.close.clone();
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Resolves once the socket has a close reason.
    pub async fn closed(&self) {
        loop {
            let notified = self.closed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a close between the two is not missed.
            notified.as_mut().enable();
            if self.is_closing() {
                return;
            }
            notified.await;
        }
    }

    /// Resolves when there may be something to write.
    pub async fn ready(&self) {
        self.wake.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn immediate() -> Arc<DeliveryWindow> {
        Arc::new(DeliveryWindow::new(&crate::config::BatchConfig {
            delivery_window_ms: 0,
            ..Default::default()
        }))
    }

    #[test]
    fn overflow_closes_as_slow_consumer_and_drops_the_queue() {
        let outbox = Arc::new(Outbox::new(1, 100, immediate()));
        let m = Encoded::from_json(&[b'1'; 40]);
        assert_eq!(outbox.push(&m), Pushed::Queued);
        assert_eq!(outbox.push(&m), Pushed::Queued);
        assert_eq!(outbox.push(&m), Pushed::Overflowed);
        assert_eq!(outbox.push(&m), Pushed::Closed);
        let mut d = Drained::default();
        outbox.drain(&mut d);
        assert!(d.messages.is_empty());
        assert_eq!(d.close, Some(CloseReason::SlowConsumer));
        assert!(outbox.is_closing());
    }

    #[test]
    fn shutdown_keeps_what_is_queued() {
        let outbox = Arc::new(Outbox::new(1, 1000, immediate()));
        let m = Encoded::from_json(b"1");
        outbox.push(&m);
        assert!(outbox.close(CloseReason::Shutdown));
        assert!(!outbox.close(CloseReason::SlowConsumer));
        let mut d = Drained::default();
        outbox.drain(&mut d);
        assert_eq!(d.messages.len(), 1);
        assert_eq!(d.close, Some(CloseReason::Shutdown));
    }
}
