//! An HTTP response body as an outbox's socket: a Server-Sent Events stream.
//!
//! The outbox writes WebSocket frames, as for any socket; the sink turns each into an
//! event (`protocol::sse`) as it takes it, keeping the stream's durable positions for the
//! events' ids, and hyper takes what the sink holds as the body's next chunk: a window's
//! frames leave as one chunk, one write. The sink takes a write whole or not at all, so
//! the frames it sees are always whole. While the peer does not read, hyper stops asking,
//! the sink fills up to its own bound and says `WouldBlock`, and the outbox's bound
//! (`limits.max_outbox_bytes`) decides about the slow consumer, as for a WebSocket. A
//! ping frame becomes a comment line; a close frame ends the body.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::SocketWrite;
use crate::protocol::sse::{self, Positions};

/// Bytes a sink holds before it stops taking writes: about a socket's send buffer.
const HOLD: usize = 64 * 1024;

/// One SSE stream's sink: the events not yet taken by the body, and the positions.
pub struct SseSink {
    state: Mutex<State>,
    /// Wakes a writer waiting for room, when the body takes the held bytes or goes.
    taken: Notify,
}

struct State {
    held: BytesMut,
    positions: Positions,
    /// The body waiting for bytes.
    waker: Option<Waker>,
    /// A close frame or the writer's shutdown: the body ends after what is held.
    ended: bool,
    /// The body is gone (the peer hung up, or the response was dropped).
    gone: bool,
    /// When the body last took bytes (or the stream began).
    taken_at: Instant,
}

impl SseSink {
    /// A sink resuming `positions` (from the request's `Last-Event-ID`), starting the
    /// stream with `head` (the reconnection delay, a first comment).
    pub fn new(positions: Positions, head: &[u8]) -> Arc<SseSink> {
        Arc::new(SseSink {
            state: Mutex::new(State {
                held: BytesMut::from(head),
                positions,
                waker: None,
                ended: false,
                gone: false,
                taken_at: Instant::now(),
            }),
            taken: Notify::new(),
        })
    }

    /// How long bytes have waited for the peer to take them (zero when nothing waits).
    pub fn stalled_for(&self) -> Duration {
        let state = self.state.lock();
        if state.held.is_empty() {
            Duration::ZERO
        } else {
            state.taken_at.elapsed()
        }
    }

    /// Resolves once the body is gone: the peer hung up.
    pub async fn dropped(&self) {
        self.until(|state| state.gone).await
    }

    /// Resolves once the body has ended (its last bytes taken) or is gone.
    pub async fn finished(&self) {
        self.until(|state| state.gone || (state.ended && state.held.is_empty()))
            .await
    }

    async fn until(&self, done: impl Fn(&State) -> bool) {
        loop {
            let taken = self.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            if done(&self.state.lock()) {
                return;
            }
            taken.await;
        }
    }

    /// The body for hyper; the stream ends when it is dropped.
    pub fn body(self: &Arc<Self>) -> SseBody {
        SseBody { sink: self.clone() }
    }

    fn wake_body(state: &mut State) {
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
    }
}

impl SocketWrite for SseSink {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut state = self.state.lock();
        if state.gone {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if state.held.len() >= HOLD {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut taken = 0;
        for buf in bufs {
            let mut frames: &[u8] = buf;
            while let Some((opcode, payload, rest)) = split_frame(frames) {
                state.add(opcode, payload);
                frames = rest;
            }
            taken += buf.len();
        }
        Self::wake_body(&mut state);
        Ok(taken)
    }

    async fn writable(&self) -> io::Result<()> {
        loop {
            let taken = self.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            {
                let state = self.state.lock();
                if state.gone {
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                if state.held.len() < HOLD {
                    return Ok(());
                }
            }
            taken.await;
        }
    }

    fn shutdown_write(&self) {
        let mut state = self.state.lock();
        state.ended = true;
        Self::wake_body(&mut state);
        drop(state);
        self.taken.notify_waiters();
    }
}

impl State {
    /// One frame, as the stream carries it.
    fn add(&mut self, opcode: u8, payload: &[u8]) {
        match opcode {
            0x1 => {
                let moved = self.positions.follow(payload);
                let id = moved.then(|| self.positions.id());
                sse::write_event(&mut self.held, payload, id);
            }
            0x9 => self.held.extend_from_slice(sse::PING),
            0x8 => self.ended = true,
            _ => {}
        }
    }
}

/// The first frame of `bytes` (a server's frame: unmasked): its opcode, its payload, and
/// the bytes after it.
fn split_frame(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&first, rest) = bytes.split_first()?;
    let (&second, rest) = rest.split_first()?;
    let (len, rest) = match second & 0x7f {
        126 => {
            let (len, rest) = rest.split_first_chunk::<2>()?;
            (u16::from_be_bytes(*len) as usize, rest)
        }
        127 => {
            let (len, rest) = rest.split_first_chunk::<8>()?;
            (usize::try_from(u64::from_be_bytes(*len)).ok()?, rest)
        }
        n => (n as usize, rest),
    };
    if rest.len() < len {
        return None;
    }
    let (payload, rest) = rest.split_at(len);
    Some((first & 0x0f, payload, rest))
}

/// The response body of an SSE stream: what the sink holds, chunk by chunk.
pub struct SseBody {
    sink: Arc<SseSink>,
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut state = self.sink.state.lock();
        if !state.held.is_empty() {
            let chunk = state.held.split().freeze();
            state.taken_at = Instant::now();
            drop(state);
            self.sink.taken.notify_waiters();
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if state.ended {
            return Poll::Ready(None);
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        self.sink.state.lock().gone = true;
        self.sink.taken.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::outbound;

    #[test]
    fn frames_become_events_pings_comments_and_a_close_ends_the_body() {
        let sink = SseSink::new(Positions::default(), b"retry: 1000\n\n");
        let joined = outbound::history("r", "e1", Some(4), &[], None);
        let close = outbound::close_frame(1001, "server shutting down");
        let frames = [
            joined.frame().clone(),
            Bytes::from_static(outbound::PING),
            close,
        ];
        let slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
        let all: usize = frames.iter().map(Bytes::len).sum();
        assert_eq!(sink.try_write_vectored(&slices).unwrap(), all);
        let mut body = sink.body();
        let waker = futures_waker();
        let mut cx = Context::from_waker(&waker);
        let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut cx) else {
            panic!("a chunk was due");
        };
        let text = String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap();
        assert_eq!(
            text,
            "retry: 1000\n\nevent: history\ndata: {\"type\":\"history\",\"roomId\":\"r\",\"epoch\":\"e1\",\"offset\":4,\"messages\":[]}\nid: r:e1:4\n\n: ping\n\n"
        );
        assert!(matches!(
            Pin::new(&mut body).poll_frame(&mut cx),
            Poll::Ready(None)
        ));
        drop(body);
        assert_eq!(
            sink.try_write_vectored(&slices).unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
    }

    fn futures_waker() -> Waker {
        struct Noop;
        impl std::task::Wake for Noop {
            fn wake(self: Arc<Self>) {}
        }
        Waker::from(Arc::new(Noop))
    }
}
