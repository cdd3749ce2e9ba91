//! The outbox against a scripted socket: the hand-overs between the inline flush and the
//! writer task (a partial write, a socket that would block, messages due while another
//! thread writes), the byte bound across them, errors and the close.

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::*;

/// A socket that takes `capacity` more bytes, then would block until `open` gives it more.
#[derive(Default)]
struct Scripted {
    capacity: Mutex<usize>,
    written: Mutex<Vec<u8>>,
    room: Notify,
    fail: AtomicBool,
    shut: AtomicBool,
    /// Like TLS: accepted bytes wait below the socket (`held`) until `writable` runs.
    holds_back: AtomicBool,
    held: Mutex<Vec<u8>>,
}

impl Scripted {
    fn with_capacity(capacity: usize) -> Arc<Scripted> {
        let s = Arc::new(Scripted::default());
        *s.capacity.lock() = capacity;
        s
    }

    fn open(&self, more: usize) {
        *self.capacity.lock() += more;
        self.room.notify_one();
    }

    fn written(&self) -> Vec<u8> {
        self.written.lock().clone()
    }
}

impl SocketWrite for Arc<Scripted> {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let mut capacity = self.capacity.lock();
        if *capacity == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut taken = 0;
        let mut written = if self.holds_back.load(Ordering::Relaxed) {
            self.held.lock()
        } else {
            self.written.lock()
        };
        for buf in bufs {
            let n = buf.len().min(*capacity - taken);
            written.extend_from_slice(&buf[..n]);
            taken += n;
            if taken == *capacity {
                break;
            }
        }
        *capacity -= taken;
        Ok(taken)
    }

    async fn writable(&self) -> io::Result<()> {
        let held = std::mem::take(&mut *self.held.lock());
        if !held.is_empty() {
            self.written.lock().extend_from_slice(&held);
            return Ok(());
        }
        self.room.notified().await;
        Ok(())
    }

    fn shutdown_write(&self) {
        self.shut.store(true, Ordering::Relaxed);
    }

    fn has_backlog(&self) -> bool {
        !self.held.lock().is_empty()
    }
}

fn window(ms: u64) -> Arc<DeliveryPolicy> {
    Arc::new(DeliveryPolicy::new(&crate::config::BatchConfig {
        delivery_window_ms: ms,
        ..Default::default()
    }))
}

/// An outbox on window 0 (every message due at once) writing to `socket`, with its
/// writer task running.
fn attached(
    max_bytes: usize,
    socket: &Arc<Scripted>,
) -> (Arc<Outbox<Arc<Scripted>>>, tokio::task::JoinHandle<()>) {
    let outbox = Arc::new(Outbox::new(
        1,
        max_bytes,
        window(0),
        Arc::default(),
        Arc::default(),
    ));
    outbox.attach(socket.clone());
    let writer = {
        let outbox = outbox.clone();
        tokio::spawn(async move { run_writer(&*outbox).await })
    };
    (outbox, writer)
}

fn message(n: u8) -> Encoded {
    Encoded::from_json(&[b'0' + n; 40])
}

/// Waits (bounded) until the socket holds `want`.
async fn until_written(socket: &Scripted, want: &[u8]) {
    let waited = tokio::time::timeout(Duration::from_secs(5), async {
        while socket.written().len() < want.len() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "only {} of {} bytes written",
        socket.written().len(),
        want.len()
    );
    assert_eq!(socket.written(), want, "bytes out of order or interleaved");
}

#[tokio::test]
async fn a_partial_write_is_finished_by_the_writer_and_later_messages_follow_it() {
    let socket = Scripted::with_capacity(5);
    let (outbox, _writer) = attached(1 << 20, &socket);
    let (m1, m2, m3) = (message(1), message(2), message(3));
    // The flush writes 5 bytes of m1, then the socket is full: the writer takes over.
    assert_eq!(outbox.send(&m1), Pushed::Due);
    assert_eq!(socket.written(), &m1.frame()[..5]);
    // Due while the writer holds the socket: queued for it, never written beside it.
    assert_eq!(outbox.send(&m2), Pushed::Due);
    assert_eq!(outbox.send(&m3), Pushed::Queued);
    assert_eq!(socket.written().len(), 5);
    socket.open(1 << 20);
    let want = [&m1.frame()[..], &m2.frame()[..], &m3.frame()[..]].concat();
    until_written(&socket, &want).await;
    assert_eq!(outbox.held_bytes(), 0, "everything written is released");
    // The writer gave the socket back: the next message is written inline again.
    let m4 = message(4);
    assert_eq!(outbox.send(&m4), Pushed::Due);
    assert_eq!(socket.written(), [want, m4.frame().to_vec()].concat());
}

#[tokio::test]
async fn bytes_a_write_has_taken_still_count_until_they_are_written() {
    let socket = Scripted::with_capacity(0);
    let m = message(1);
    let frame = m.wire_len();
    let (outbox, _writer) = attached(2 * frame + 10, &socket);
    assert_eq!(outbox.send(&m), Pushed::Due);
    // The first frame sits with the writer, unwritten: it still counts.
    assert_eq!(outbox.send(&m), Pushed::Due);
    assert_eq!(outbox.held_bytes(), 2 * frame);
    assert_eq!(outbox.send(&m), Pushed::Overflowed);
    assert!(outbox.is_closing());
}

#[tokio::test]
async fn a_write_error_closes_the_socket_and_ends_the_writer() {
    let socket = Scripted::with_capacity(1 << 20);
    socket.fail.store(true, Ordering::Relaxed);
    let (outbox, writer) = attached(1 << 20, &socket);
    outbox.send(&message(1));
    assert!(outbox.is_closing());
    tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .expect("the writer ended")
        .unwrap();
    assert!(socket.shut.load(Ordering::Relaxed));
}

#[tokio::test]
async fn the_close_frame_follows_what_was_queued() {
    let socket = Scripted::with_capacity(0);
    let (outbox, writer) = attached(1 << 20, &socket);
    let m = message(1);
    outbox.send(&m);
    assert!(outbox.close(CloseReason::Shutdown));
    socket.open(1 << 20);
    tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .expect("the writer ended")
        .unwrap();
    let close = CloseReason::Shutdown.frame().unwrap();
    assert_eq!(
        socket.written(),
        [m.frame().to_vec(), close.to_vec()].concat()
    );
    assert!(socket.shut.load(Ordering::Relaxed));
}

#[tokio::test]
async fn messages_queued_before_attach_go_out_when_the_writer_starts() {
    let outbox = Arc::new(Outbox::new(
        1,
        1 << 20,
        window(0),
        Arc::default(),
        Arc::default(),
    ));
    let m = message(1);
    assert_eq!(outbox.send(&m), Pushed::Due);
    let socket = Scripted::with_capacity(1 << 20);
    outbox.attach(socket.clone());
    let writer = outbox.clone();
    tokio::spawn(async move { run_writer(&*writer).await });
    until_written(&socket, m.frame()).await;
}

#[tokio::test]
async fn a_windowed_socket_waits_for_the_tick_then_writes_one_batch() {
    let socket = Scripted::with_capacity(1 << 20);
    let due: Arc<DueList<Arc<Scripted>>> = Arc::default();
    let window = window(20);
    let outbox = Arc::new(Outbox::new(
        1,
        1 << 20,
        window.clone(),
        due.clone(),
        Arc::default(),
    ));
    outbox.attach(socket.clone());
    tokio::spawn(DueList::run_ticks(
        Arc::downgrade(&due),
        window,
        Pace::DEFAULT,
        |_| true,
    ));
    let (m1, m2, m3) = (message(1), message(2), message(3));
    // Leading edge: the first goes at once; the next two wait for the tick.
    assert_eq!(outbox.send(&m1), Pushed::Due);
    assert_eq!(outbox.send(&m2), Pushed::Queued);
    assert_eq!(outbox.send(&m3), Pushed::Queued);
    assert_eq!(socket.written(), m1.frame().to_vec());
    let batch = crate::batch::delivery::batch_frame(&[m2.clone(), m3.clone()]);
    until_written(
        &socket,
        &[m1.frame().to_vec(), batch.frame().to_vec()].concat(),
    )
    .await;
}

#[test]
fn overflow_closes_as_slow_consumer_and_drops_the_queue() {
    let outbox: Arc<Outbox> = Arc::new(Outbox::new(
        1,
        100,
        window(0),
        Arc::default(),
        Arc::default(),
    ));
    let m = Encoded::from_json(&[b'1'; 40]);
    assert_eq!(outbox.push(&m), Pushed::Due);
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
fn control_frames_count_against_the_bound() {
    // Not attached: nothing is written, so every pong stays queued.
    let outbox: Arc<Outbox> = Arc::new(Outbox::new(
        1,
        100,
        window(0),
        Arc::default(),
        Arc::default(),
    ));
    let pong = Bytes::from(vec![0x8a; 30]);
    for _ in 0..3 {
        assert_eq!(outbox.push_control(pong.clone()), Pushed::Due);
    }
    assert_eq!(outbox.push_control(pong.clone()), Pushed::Overflowed);
    assert_eq!(outbox.push_control(pong), Pushed::Closed);
    let mut d = Drained::default();
    outbox.drain(&mut d);
    assert!(d.control.is_empty(), "the queued pongs were dropped");
    assert_eq!(d.close, Some(CloseReason::SlowConsumer));
}

#[test]
fn shutdown_keeps_what_is_queued() {
    let outbox: Arc<Outbox> = Arc::new(Outbox::new(
        1,
        1000,
        window(0),
        Arc::default(),
        Arc::default(),
    ));
    let m = Encoded::from_json(b"1");
    outbox.push(&m);
    assert!(outbox.close(CloseReason::Shutdown));
    assert!(!outbox.close(CloseReason::SlowConsumer));
    let mut d = Drained::default();
    outbox.drain(&mut d);
    assert_eq!(d.messages.len(), 1);
    assert_eq!(d.close, Some(CloseReason::Shutdown));
}

#[tokio::test]
async fn bytes_a_write_accepted_but_left_below_the_socket_are_sent_by_the_writer() {
    // TLS: rustls takes the plaintext and keeps the records the kernel would not take.
    let socket = Scripted::with_capacity(1 << 20);
    socket.holds_back.store(true, Ordering::Relaxed);
    let (outbox, _writer) = attached(1 << 20, &socket);
    let (m1, m2) = (message(1), message(2));
    assert_eq!(outbox.send(&m1), Pushed::Due);
    until_written(&socket, m1.frame()).await;
    assert_eq!(outbox.send(&m2), Pushed::Due);
    let want = [&m1.frame()[..], &m2.frame()[..]].concat();
    until_written(&socket, &want).await;
}
