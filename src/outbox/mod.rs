//! One socket's outbox: the bounded queue between fan-out and the socket, and the
//! write that empties it. It sits on the fan-out side, below the hub (as rumqttd's
//! `iobufs`), so the hub pushes into it without knowing about connections.
//!
//! | file | job |
//! | --- | --- |
//! | `mod.rs` | the queue, its byte bound, and the inline flush |
//! | `write.rs` | the `SocketWrite` seam and the non-blocking vectored write |
//! | `writer.rs` | the socket's writer task: what would block, and the close |
//! | `due.rs` | the node's list of sockets due at the next window tick, and the tick task |
//! | `scratch.rs` | per-thread reusable buffers for flushing threads |
//! | `sse.rs` | an SSE stream's response body as a socket: frames become events |
//!
//! Fan-out pushes shared `Encoded` handles under a short `parking_lot` lock (never held
//! across an `.await`). The byte bound is the slow-consumer rule: a push that would pass
//! `limits.max_outbox_bytes` empties the queue and marks the socket for closing with 1008,
//! so a reader that stopped reading costs at most one outbox of memory, and nobody else
//! waits for it.
//!
//! When queued messages are due (the window's tick, the leading edge, window 0), the
//! thread that found them due writes them itself with one non-blocking vectored write
//! (`flush`): a socket that takes the bytes costs no task wake-up at all. Only what the
//! kernel would not take at once goes to the socket's writer task (`writer.rs`), which
//! waits for the socket to become writable. One flag (`busy`) makes sure a single thread
//! writes a socket at a time, so frames never interleave.

mod due;
mod scratch;
mod sse;
mod uring;
mod write;
mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::batch::{DeliveryPolicy, Pace};
use crate::metrics::Stats;
use crate::protocol::{close_code, outbound, Encoded};

pub use due::DueList;
pub use scratch::with_scratch;
pub use sse::{SseBody, SseSink};
pub use uring::flush_each;
use write::try_write_all;
pub use write::{SocketOut, SocketWrite};
pub use writer::{run as run_writer, CLOSE_GRACE};

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
    /// Queued, and due now (leading edge or window 0): the caller must `flush` the
    /// socket once it holds no lock.
    Due,
    /// This push overflowed the outbox: the socket is now closing as a slow consumer.
    Overflowed,
    /// The socket was already closing; the message was dropped.
    Closed,
}

/// One socket's outbox. Generic over how it writes (`SocketWrite`), so the hot path makes
/// no dynamic call and unit tests can script a socket; the node's sockets use the default.
pub struct Outbox<W: SocketWrite = SocketOut> {
    id: ConnId,
    max_bytes: usize,
    state: Mutex<State>,
    /// Decides when a queued message may leave: at once, or at the next window tick.
    policy: Arc<DeliveryPolicy>,
    /// Where a socket with messages for the next tick is listed.
    due: Arc<DueList<W>>,
    stats: Arc<Stats>,
    /// The socket's write half, set once the upgrade is done.
    io: OnceLock<W>,
    /// Wakes the writer task: for a close, for bytes the socket would not take at once,
    /// or for messages that became due while another thread was writing.
    wake: Notify,
    /// The socket negotiated permessage-deflate: its message frames go compressed.
    deflate: AtomicBool,
    /// Set once a close reason is recorded: the reader stops, the writer's wait ends.
    /// An atomic, not a CancellationToken: the writer checks it on every wake-up.
    closing: AtomicBool,
    closed: Notify,
}

#[derive(Default)]
struct State {
    queue: Vec<Encoded>,
    control: Vec<Bytes>,
    /// Every byte held for this socket: queued messages and control frames, and what a
    /// writer has taken but the kernel has not yet accepted. The slow-consumer bound.
    bytes: usize,
    /// The part of `bytes` a writer has taken; released when its write completes.
    writing: usize,
    close: Option<CloseReason>,
    /// A write is coming at once (a push returned `Due`, or the writer was woken):
    /// pushes only queue.
    wake_pending: bool,
    /// The paces (bits) whose due list holds this socket for its next tick.
    scheduled: u64,
    /// Something queued waited for a window: what leaves may go as batch frames.
    batched: bool,
    /// When the oldest queued message was queued; for the delivery latency histogram.
    since: Option<Instant>,
    /// When messages were last taken for writing; decides the leading edge.
    last_flush: Option<Instant>,
    /// A thread (a flusher or the writer task) is writing this socket.
    busy: bool,
    /// Messages became due while `busy`: the writing thread takes them when it is done.
    due_while_busy: bool,
    /// What a flush could not write without blocking, for the writer task; the first
    /// frame may be a tail already advanced past its written bytes.
    unsent: Vec<Bytes>,
    /// A flush left the rest of its write (`unsent`, or a backlog below the socket's
    /// write) to the writer task, which is now the one writing.
    left_to_writer: bool,
}

/// What the writer takes from the outbox in one step.
#[derive(Default)]
pub struct Drained {
    pub messages: Vec<Encoded>,
    /// Some of `messages` waited for a window (else each leaves as a frame of its own).
    pub batched: bool,
    /// When the oldest of `messages` was queued.
    pub since: Option<Instant>,
    pub control: Vec<Bytes>,
    pub close: Option<CloseReason>,
}

impl<W: SocketWrite> Outbox<W> {
    pub fn new(
        id: ConnId,
        max_bytes: usize,
        policy: Arc<DeliveryPolicy>,
        due: Arc<DueList<W>>,
        stats: Arc<Stats>,
    ) -> Outbox<W> {
        Outbox {
            id,
            max_bytes,
            state: Mutex::new(State::default()),
            policy,
            due,
            stats,
            io: OnceLock::new(),
            deflate: AtomicBool::new(false),
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            closed: Notify::new(),
        }
    }

    pub fn id(&self) -> ConnId {
        self.id
    }

    /// Gives the outbox its socket; writes can start.
    pub fn attach(&self, io: W) {
        if self.io.set(io).is_err() {
            tracing::error!(conn = self.id, "socket attached twice; second one ignored");
        }
    }

    /// The socket negotiated permessage-deflate: compress its message frames.
    pub fn set_deflate(&self) {
        self.deflate.store(true, Ordering::Relaxed);
    }

    fn io(&self) -> Option<&W> {
        self.io.get()
    }

    /// Appends the frames that carry what was drained: control frames first, then the
    /// messages as the window groups them; counts the write and its oldest message's wait.
    fn frames_for(&self, drained: &mut Drained, frames: &mut Vec<Bytes>) {
        frames.append(&mut drained.control);
        if !drained.messages.is_empty() {
            let first = frames.len();
            let batch_messages = &self.stats.batch_messages;
            let mut delivered = 0;
            let batched = drained.batched && self.io().is_none_or(SocketWrite::batches);
            self.policy
                .frames(&drained.messages, batched, frames, |messages, n| {
                    delivered += messages * n;
                    batch_messages.record_n(messages as u64, n as u64)
                });
            if self.deflate.load(Ordering::Relaxed) {
                for frame in &mut frames[first..] {
                    *frame = self.policy.compressed(frame);
                }
            }
            self.stats.record_write(delivered, frames.len() - first);
            drained.messages.clear();
        }
        if let Some(since) = drained.since.take() {
            self.stats.delivery_latency.record_duration(since.elapsed());
        }
    }

    /// Queues a message of the default pace (not a room's, or a room without a class
    /// window); see `push_paced`.
    pub fn push(self: &Arc<Self>, message: &Encoded) -> Pushed {
        self.push_paced(message, Pace::DEFAULT)
    }

    /// Queues a message for this socket, due by `pace`'s clock. The first message of a
    /// pace after a flush is either due at once (`Pushed::Due`: window 0, or the socket
    /// was idle for a whole window) or puts the socket on that pace's list for its next
    /// tick; later ones only queue, so a busy window costs one write per socket, not one
    /// per message. Whatever is queued leaves with the first write, of any pace. (Rooms
    /// with a window push here only their leading edge; the rest comes at the tick,
    /// framed, through `push_due`.)
    pub fn push_paced(self: &Arc<Self>, message: &Encoded, pace: Pace) -> Pushed {
        let (mut state, message) = match self.admit(message) {
            Ok(admitted) => admitted,
            Err(refused) => return refused,
        };
        // One clock read serves the latency mark and the leading-edge check: the first
        // push after a flush is the one that finds the queue empty.
        let now = state.queue.is_empty().then(Instant::now);
        if now.is_some() {
            state.since = now;
        }
        state.queue.push(message.clone());
        state.bytes += message.wire_len();
        let immediate = self.policy.is_immediate(pace);
        state.batched |= !immediate;
        if state.wake_pending || state.scheduled & pace.bit() != 0 {
            return Pushed::Queued;
        }
        let now = now.unwrap_or_else(Instant::now);
        if self.policy.sends_at_once(pace, state.last_flush, now) {
            state.wake_pending = true;
            return Pushed::Due;
        }
        state.scheduled |= pace.bit();
        drop(state);
        self.due.schedule(pace, self.clone());
        Pushed::Queued
    }

    /// Room-major delivery, at a tick: queues a room's framed window (or, for a conflated
    /// room, one of its window's messages), due now; `since` is when the room queued the
    /// oldest of them. The first push since the socket's last write returns
    /// `Pushed::Due`: the caller flushes the socket once every room of the tick has
    /// pushed, so a socket in several rooms gets all their frames in one vectored write.
    pub fn push_due(&self, message: &Encoded, since: Instant) -> Pushed {
        let (mut state, message) = match self.admit(message) {
            Ok(admitted) => admitted,
            Err(refused) => return refused,
        };
        if state.queue.is_empty() {
            state.since = Some(since);
        }
        state.queue.push(message.clone());
        state.bytes += message.wire_len();
        state.batched = true;
        if std::mem::replace(&mut state.wake_pending, true) {
            return Pushed::Queued;
        }
        Pushed::Due
    }

    /// The locked state if `message` may be queued; else why not (the socket is
    /// closing, or this message overflowed it: it is now closing as a slow consumer).
    /// The locked state and what to queue for `message` if it may be queued; else why
    /// not (the socket is closing, or this message overflowed it: it is now closing as
    /// a slow consumer).
    fn admit<'m>(
        &self,
        message: &'m Encoded,
    ) -> Result<(parking_lot::MutexGuard<'_, State>, &'m Encoded), Pushed> {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return Err(Pushed::Closed);
        }
        let message = self.make_room(&mut state, message);
        if state.bytes + message.wire_len() > self.max_bytes {
            self.overflow(state);
            return Err(Pushed::Overflowed);
        }
        Ok((state, message))
    }

    /// What to queue for `message`, with room made for it. Conflation first: the socket
    /// gets the latest message per key, never a stale one after a fresh one; a queued
    /// older one gives way before the bound is checked, so a slow reader of conflated
    /// rooms holds one message per key. A delta whose predecessor gave way is queued as
    /// its full message: a delta applies only to the message before it.
    fn make_room<'m>(&self, state: &mut State, message: &'m Encoded) -> &'m Encoded {
        let key = message.conflation_key();
        if key != 0 {
            if let Some(at) = state.queue.iter().rposition(|m| m.conflation_key() == key) {
                let old = state.queue.remove(at);
                state.bytes -= old.wire_len();
                self.stats.conflated();
                return message.full().unwrap_or(message);
            }
        }
        message
    }

    /// `pace`'s tick: the socket is off that pace's list; writes what is queued.
    pub fn tick(&self, pace: Pace) {
        self.state.lock().scheduled &= !pace.bit();
        self.flush();
    }

    /// Queues one message and writes it if it is due; for callers that hold no lock.
    pub fn send(self: &Arc<Self>, message: &Encoded) -> Pushed {
        let pushed = self.push(message);
        if pushed == Pushed::Due {
            self.flush();
        }
        pushed
    }

    /// Queues a control frame (a pong) ahead of the next messages and writes it. Control
    /// frames count against the outbox bound like messages: a client that floods pings
    /// and never reads the pongs is a slow consumer too.
    pub fn push_control(&self, frame: Bytes) -> Pushed {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return Pushed::Closed;
        }
        if state.bytes + frame.len() > self.max_bytes {
            self.overflow(state);
            return Pushed::Overflowed;
        }
        state.bytes += frame.len();
        state.control.push(frame);
        drop(state);
        self.flush();
        Pushed::Due
    }

    /// The outbox is over its bound: drop what is queued and close as a slow consumer.
    fn overflow(&self, mut state: parking_lot::MutexGuard<'_, State>) {
        state.queue.clear();
        state.control.clear();
        state.bytes = state.writing;
        state.close = Some(CloseReason::SlowConsumer);
        drop(state);
        self.stats.slow_consumer();
        self.mark_closing();
    }

    /// Writes everything queued, from the calling thread, with non-blocking vectored
    /// writes. What the socket does not take at once is handed to the writer task, as is
    /// a close. If another thread is writing this socket, it takes the messages when done.
    pub fn flush(&self) {
        let Some(io) = self.io.get() else {
            // Not attached yet: the writer task starts with whatever is queued.
            self.wake.notify_one();
            return;
        };
        thread_local! {
            static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
        }
        with_scratch(&SCRATCH, |scratch| {
            self.flush_with(io, scratch);
            scratch.trim();
        });
    }

    fn flush_with(&self, io: &W, scratch: &mut Scratch) {
        let Scratch { drained, frames } = scratch;
        frames.clear();
        while self.begin_write(drained, frames) {
            let written = try_write_all(io, frames);
            if !self.end_write(written, frames) {
                return;
            }
        }
    }

    /// Takes what is queued for a write from this thread and appends its frames to
    /// `frames`; false if another thread is writing (it takes them when done) or a close
    /// is pending (the writer task's).
    fn begin_write(&self, drained: &mut Drained, frames: &mut Vec<Bytes>) -> bool {
        {
            let mut state = self.state.lock();
            if state.busy {
                state.due_while_busy = true;
                return false;
            }
            if state.close.is_some() {
                drop(state);
                self.wake.notify_one();
                return false;
            }
            take(&mut state, drained);
            state.busy = true;
        }
        self.frames_for(drained, frames);
        true
    }

    /// After the write `begin_write` began: `Ok(false)` hands what is left in `frames`
    /// to the writer task, an error closes. True if more became due meanwhile (write
    /// again); `frames` is empty then.
    fn end_write(&self, written: std::io::Result<bool>, frames: &mut Vec<Bytes>) -> bool {
        let mut state = self.state.lock();
        match written {
            Ok(true) => {
                state.busy = false;
                release(&mut state);
                std::mem::take(&mut state.due_while_busy)
            }
            Ok(false) => {
                // The socket is full: the writer task waits until it takes the rest.
                state.unsent.append(frames);
                state.left_to_writer = true;
                drop(state);
                self.wake.notify_one();
                false
            }
            Err(e) => {
                state.busy = false;
                release(&mut state);
                drop(state);
                tracing::debug!(conn = self.id, error = %e, "socket write failed");
                self.close(CloseReason::Gone);
                false
            }
        }
    }

    /// For the writer task: takes the unsent frames and everything queued, unless a
    /// flush is writing (then that flush takes them when done). Marks the socket busy.
    fn take_for_writer(&self, into: &mut Drained, unsent: &mut Vec<Bytes>) -> bool {
        let mut state = self.state.lock();
        if state.busy && !state.left_to_writer {
            state.due_while_busy = true;
            return false;
        }
        state.left_to_writer = false;
        unsent.append(&mut state.unsent);
        take(&mut state, into);
        state.busy = true;
        true
    }

    /// For the writer task, after a write: clears `busy`; true if more became due.
    fn writer_done(&self) -> bool {
        let mut state = self.state.lock();
        state.busy = false;
        release(&mut state);
        std::mem::take(&mut state.due_while_busy)
    }

    /// Asks the writer to close the socket. Returns false if it was already closing.
    pub fn close(&self, reason: CloseReason) -> bool {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return false;
        }
        if matches!(reason, CloseReason::Gone | CloseReason::Echo(_)) {
            state.queue.clear();
            state.bytes = state.writing + state.control.iter().map(Bytes::len).sum::<usize>();
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

    /// Takes everything queued, reusing the vectors in `into`; the caller owns it from
    /// here, so it no longer counts against the bound.
    pub fn drain(&self, into: &mut Drained) {
        let mut state = self.state.lock();
        take(&mut state, into);
        release(&mut state);
    }

    /// Bytes held for this socket: queued, and taken by a write not yet complete.
    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        self.state.lock().bytes
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

fn take(state: &mut State, into: &mut Drained) {
    std::mem::swap(&mut state.queue, &mut into.messages);
    std::mem::swap(&mut state.control, &mut into.control);
    // What is taken stays counted until the write that carries it completes.
    state.writing = state.bytes;
    state.wake_pending = false;
    into.batched = std::mem::take(&mut state.batched);
    if !into.messages.is_empty() {
        state.last_flush = Some(Instant::now());
    }
    into.since = state.since.take();
    into.close = state.close.clone();
}

/// A write completed: what the writer had taken no longer counts against the bound.
fn release(state: &mut State) {
    state.bytes -= state.writing;
    state.writing = 0;
}

/// A flushing thread's reusable buffers.
#[derive(Default)]
pub(crate) struct Scratch {
    drained: Drained,
    frames: Vec<Bytes>,
}

impl Scratch {
    /// Most entries a thread keeps room for between flushes: one huge flush (a flood
    /// that overflowed) must not pin its buffers to the thread for ever.
    const KEEP: usize = 1024;

    fn trim(&mut self) {
        if self.frames.capacity() > Self::KEEP {
            self.frames = Vec::new();
        }
        if self.drained.messages.capacity() > Self::KEEP {
            self.drained.messages = Vec::new();
        }
        if self.drained.control.capacity() > Self::KEEP {
            self.drained.control = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests;
