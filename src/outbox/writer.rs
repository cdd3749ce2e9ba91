//! One socket's writer task: the slow path of writing.
//!
//! Most writes happen in `Outbox::flush`, on the thread that found messages due. This
//! task takes over what that cannot finish without blocking: the rest of a write the
//! kernel would not take at once (it waits for the socket to become writable), messages
//! queued before the socket was attached, and the close: the final close frame follows
//! the flushed messages, and a peer that does not take them within `CLOSE_GRACE` is cut
//! off, so a stuck reader cannot hold a task forever.

use std::io;
use std::time::Duration;

use bytes::Bytes;

use super::write::write_all;
use super::{CloseReason, Drained, Outbox, SocketWrite};

/// How long a closing socket gets to take its last frames.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

pub async fn run<W: SocketWrite>(outbox: &Outbox<W>) {
    let Some(io) = outbox.io() else {
        tracing::error!(conn = outbox.id(), "socket writer started before attach");
        return;
    };
    let mut drained = Drained::default();
    let mut frames: Vec<Bytes> = Vec::new();
    loop {
        outbox.ready().await;
        // Loops while more became due during the write.
        while outbox.take_for_writer(&mut drained, &mut frames) {
            outbox.frames_for(&mut drained, &mut frames);
            let close = drained.close.take();
            if let Some(frame) = close.as_ref().and_then(CloseReason::frame) {
                frames.push(frame);
            }
            let written = tokio::select! {
                r = write_all(io, &mut frames) => r,
                _ = grace_after_close(outbox) => Err(io::ErrorKind::TimedOut.into()),
            };
            frames.clear();
            if let Err(e) = written {
                tracing::debug!(conn = outbox.id(), error = %e, "socket write failed");
                outbox.writer_done();
                outbox.close(CloseReason::Gone);
                io.shutdown_write();
                return;
            }
            if close.is_some() {
                io.shutdown_write();
                return;
            }
            if !outbox.writer_done() {
                break;
            }
        }
    }
}

async fn grace_after_close<W: SocketWrite>(outbox: &Outbox<W>) {
    outbox.closed().await;
    tokio::time::sleep(CLOSE_GRACE).await;
}
