//! How an outbox writes: the `SocketWrite` seam and the non-blocking vectored write that
//! both the inline flush and the writer task use.
//!
//! The seam is a generic parameter, not a trait object: the hot path makes no dynamic
//! call, and the unit tests drive the outbox's hand-overs with a scripted socket that
//! takes part of a write, would block, or fails.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::Shutdown;

use std::sync::Arc;

use bytes::{Buf, Bytes};
use tokio::net::tcp::OwnedWriteHalf;

use super::sse::SseSink;
use crate::tls::TlsSocket;

/// Slices per `writev`; Linux accepts up to 1024, 64 keeps the array on the stack.
pub(super) const IOV_CHUNK: usize = 64;

/// The write side of a socket, as an outbox needs it.
pub trait SocketWrite: Send + Sync + 'static {
    /// Writes what the socket takes now, without waiting; `WouldBlock` when it takes
    /// nothing.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;

    /// Resolves when the socket may take more.
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// Ends the sending side (FIN after the last frame).
    fn shutdown_write(&self);

    /// Bytes accepted by a write still wait below it (TLS records not yet sent):
    /// `writable` sends them.
    fn has_backlog(&self) -> bool {
        false
    }

    /// Whether a window's messages for this socket may share one `batch` frame (a
    /// WebSocket); false: one frame each (an SSE stream: one event each, one write).
    fn batches(&self) -> bool {
        true
    }
}

/// A node's socket: plain TCP (its write half), TLS (shared with the reader), or an SSE
/// stream's response body.
pub enum SocketOut {
    Tcp(OwnedWriteHalf),
    Tls(Arc<TlsSocket>),
    Sse(Arc<SseSink>),
}

impl SocketOut {
    /// The socket's descriptor when it is plain TCP (written directly, as by io_uring).
    pub(super) fn tcp_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match self {
            SocketOut::Tcp(half) => Some(half.as_ref().as_raw_fd()),
            SocketOut::Tls(_) | SocketOut::Sse(_) => None,
        }
    }
}

impl SocketWrite for SocketOut {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            SocketOut::Tcp(half) => half.try_write_vectored(bufs),
            SocketOut::Tls(tls) => tls.try_write_vectored(bufs),
            SocketOut::Sse(sink) => sink.try_write_vectored(bufs),
        }
    }

    async fn writable(&self) -> io::Result<()> {
        match self {
            SocketOut::Tcp(half) => half.writable().await,
            SocketOut::Tls(tls) => tls.writable().await,
            SocketOut::Sse(sink) => sink.writable().await,
        }
    }

    fn shutdown_write(&self) {
        match self {
            SocketOut::Tcp(half) => SocketWrite::shutdown_write(half),
            SocketOut::Tls(tls) => tls.shutdown_write(),
            SocketOut::Sse(sink) => sink.shutdown_write(),
        }
    }

    fn has_backlog(&self) -> bool {
        match self {
            SocketOut::Tcp(_) | SocketOut::Sse(_) => false,
            SocketOut::Tls(tls) => tls.has_backlog(),
        }
    }

    fn batches(&self) -> bool {
        !matches!(self, SocketOut::Sse(_))
    }
}

impl SocketWrite for OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        OwnedWriteHalf::try_write_vectored(self, bufs)
    }

    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        OwnedWriteHalf::writable(self)
    }

    fn shutdown_write(&self) {
        let _ = socket2::SockRef::from(self.as_ref()).shutdown(Shutdown::Write);
    }
}

/// Writes `frames` in order without blocking. `Ok(true)`: all written and `frames` is
/// empty; `Ok(false)`: the socket is full and `frames` holds what is left (its first
/// frame advanced past the bytes written), or only a backlog below it is left.
pub(super) fn try_write_all<W: SocketWrite>(io: &W, frames: &mut Vec<Bytes>) -> io::Result<bool> {
    let mut done = 0;
    while done < frames.len() {
        match write_some(io, &mut frames[done..]) {
            Ok(whole) => done += whole,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                frames.drain(..done);
                return Ok(false);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    frames.clear();
    Ok(!io.has_backlog())
}

/// Writes every frame, in order, waiting for the socket to become writable as needed.
pub(super) async fn write_all<W: SocketWrite>(io: &W, frames: &mut [Bytes]) -> io::Result<()> {
    let mut done = 0;
    while done < frames.len() {
        match write_some(io, &mut frames[done..]) {
            Ok(whole) => done += whole,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => io.writable().await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if io.has_backlog() {
        io.writable().await?;
    }
    Ok(())
}

/// One non-blocking vectored write of up to `IOV_CHUNK` frames from the front of
/// `frames`. Returns how many went out whole; the next one is advanced past any part
/// written. `WouldBlock` when the socket takes nothing now.
fn write_some<W: SocketWrite>(io: &W, frames: &mut [Bytes]) -> io::Result<usize> {
    let chunk = &frames[..frames.len().min(IOV_CHUNK)];
    let mut slices: [IoSlice<'_>; IOV_CHUNK] = [IoSlice::new(&[]); IOV_CHUNK];
    for (slot, frame) in slices.iter_mut().zip(chunk) {
        *slot = IoSlice::new(frame);
    }
    match io.try_write_vectored(&slices[..chunk.len()])? {
        0 => Err(io::ErrorKind::WriteZero.into()),
        n => Ok(advance(frames, n)),
    }
}

/// Consumes `n` written bytes from the front of `frames`: returns how many frames were
/// written whole and advances the next one past its written part.
pub(super) fn advance(frames: &mut [Bytes], mut n: usize) -> usize {
    let mut whole = 0;
    for frame in frames.iter_mut() {
        if n >= frame.len() {
            n -= frame.len();
            whole += 1;
        } else {
            frame.advance(n);
            break;
        }
    }
    whole
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_counts_whole_frames_and_cuts_the_next() {
        let mut frames = vec![
            Bytes::from_static(b"abc"),
            Bytes::from_static(b"defg"),
            Bytes::from_static(b"hi"),
        ];
        assert_eq!(advance(&mut frames, 5), 1);
        assert_eq!(&frames[1][..], b"fg");
        assert_eq!(advance(&mut frames[1..], 4), 2);
    }
}
