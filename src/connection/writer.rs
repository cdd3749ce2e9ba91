//! One socket's writer: waits for the delivery window, then writes everything queued
//! with as few system calls as possible.
//!
//! Messages are already WebSocket frames (`Encoded`), so writing is a vectored write of
//! shared buffers: one `writev` carries a whole window's frames. When the socket is
//! closing, the final close frame follows the flushed messages; a peer that does not take
//! them within `CLOSE_GRACE` is cut off, so a stuck reader cannot hold a task forever.

use std::io::{self, IoSlice};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;

use super::outbox::{CloseReason, Drained, Outbox};
use crate::batch::DeliveryWindow;
use crate::metrics::Stats;

/// How long a closing socket gets to take its last frames.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Slices per `writev`; Linux accepts up to 1024, 64 keeps the array on the stack.
const IOV_CHUNK: usize = 64;

pub async fn run(outbox: &Outbox, mut io: OwnedWriteHalf, window: &DeliveryWindow, stats: &Stats) {
    let mut drained = Drained::default();
    let mut frames: Vec<Bytes> = Vec::new();
    loop {
        // Woken when there is something to send now: the window's tick, the leading
        // edge, a control frame or a close (see `Outbox::push`).
        outbox.ready().await;
        outbox.drain(&mut drained);
        frames.clear();
        frames.append(&mut drained.control);
        window.frames(&drained.messages, &mut frames);
        let messages = drained.messages.len();
        drained.messages.clear();
        let close = drained.close.take();
        if let Some(frame) = close.as_ref().and_then(CloseReason::frame) {
            frames.push(frame);
        }
        if !frames.is_empty() {
            let written = tokio::select! {
                r = write_all(&mut io, &frames) => r,
                _ = grace_after_close(outbox) => Err(io::ErrorKind::TimedOut.into()),
            };
            if let Err(e) = written {
                tracing::debug!(conn = outbox.id(), error = %e, "socket write failed");
                outbox.close(CloseReason::Gone);
                return;
            }
            if messages > 0 {
                stats.record_write(messages, frames.len());
            }
        }
        if close.is_some() {
            let _ = io.shutdown().await;
            return;
        }
    }
}

async fn grace_after_close(outbox: &Outbox) {
    outbox.closed().await;
    tokio::time::sleep(CLOSE_GRACE).await;
}

/// Writes every frame, in order, in chunks of vectored writes.
async fn write_all(io: &mut OwnedWriteHalf, frames: &[Bytes]) -> io::Result<()> {
    for chunk in frames.chunks(IOV_CHUNK) {
        let mut slices: [IoSlice<'_>; IOV_CHUNK] = [IoSlice::new(&[]); IOV_CHUNK];
        for (slot, frame) in slices.iter_mut().zip(chunk) {
            *slot = IoSlice::new(frame);
        }
        let mut bufs = &mut slices[..chunk.len()];
        while !bufs.is_empty() {
            let n = io.write_vectored(bufs).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut bufs, n);
        }
    }
    Ok(())
}
