//! One socket's writer task: the slow path of writing.
//!
//! Most writes happen in `Outbox::flush`, on the thread that found messages due. This
//! task takes over what that cannot finish without blocking: the rest of a write the
//! kernel would not take at once (it waits for the socket to become writable), messages
//! queued before the socket was attached, and the close: the final close frame follows
//! the flushed messages, and a peer that does not take them within `CLOSE_GRACE` is cut
//! off, so a stuck reader cannot hold a task forever.

use std::io;
use std::net::Shutdown;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::tcp::OwnedWriteHalf;

use super::outbox::{write_some, CloseReason, Drained, Outbox};

/// How long a closing socket gets to take its last frames.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

pub async fn run(outbox: &Outbox) {
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
                shutdown(io);
                return;
            }
            if close.is_some() {
                shutdown(io);
                return;
            }
            if !outbox.writer_done() {
                break;
            }
        }
    }
}

/// Ends the sending side (FIN after the last frame); the socket itself closes when the
/// connection's halves are dropped.
fn shutdown(io: &OwnedWriteHalf) {
    let _ = socket2::SockRef::from(io.as_ref()).shutdown(Shutdown::Write);
}

async fn grace_after_close(outbox: &Outbox) {
    outbox.closed().await;
    tokio::time::sleep(CLOSE_GRACE).await;
}

/// Writes every frame, in order, waiting for the socket to become writable as needed.
async fn write_all(io: &OwnedWriteHalf, frames: &mut [Bytes]) -> io::Result<()> {
    let mut done = 0;
    while done < frames.len() {
        match write_some(io, &mut frames[done..]) {
            Ok(whole) => done += whole,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => io.writable().await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
