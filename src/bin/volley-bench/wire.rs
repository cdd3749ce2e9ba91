//! A subscriber's view of the wire, under fastwebsockets: counts the bytes the socket
//! reads after its upgrade (wire bytes per delivery) and, with `--deflate`, takes
//! permessage-deflate's RSV1 off server frames, which fastwebsockets would refuse,
//! recording in order which messages were compressed; `Tap::text` inflates them.

use std::collections::VecDeque;
use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use fastwebsockets::{Frame, OpCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use volley::protocol::frame_scan::{FrameScan, Scanned};

/// What the subscriber keeps of its wire.
#[derive(Clone, Default)]
pub struct Tap {
    /// Per text or binary frame, in order: whether it came compressed and was text.
    starts: Arc<Mutex<VecDeque<(bool, bool)>>>,
    deflate: bool,
}

impl Tap {
    /// A text frame's JSON, inflated if it came compressed; `None` for other frames.
    pub fn text(&self, frame: &Frame<'_>) -> Option<Vec<u8>> {
        if frame.opcode != OpCode::Text && frame.opcode != OpCode::Binary {
            return None;
        }
        let start = if self.deflate {
            self.starts.lock().ok()?.pop_front()
        } else {
            None
        };
        match start {
            Some((true, true)) => inflate(&frame.payload),
            Some((false, true)) => Some(frame.payload.to_vec()),
            Some((_, false)) => None,
            None if frame.opcode == OpCode::Text => Some(frame.payload.to_vec()),
            None => None,
        }
    }
}

fn inflate(body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len() * 4);
    let mut decoder = flate2::write::DeflateDecoder::new(&mut out);
    decoder.write_all(body).ok()?;
    decoder.write_all(&[0, 0, 0xff, 0xff]).ok()?;
    decoder.flush().ok()?;
    drop(decoder);
    Some(out)
}

enum Scan {
    /// Still in the HTTP response head: the last four bytes seen.
    Head(u32),
    Frames(FrameScan),
}

/// The stream under the WebSocket.
pub struct Wire<S> {
    inner: S,
    scan: Scan,
    bytes: Arc<AtomicU64>,
    tap: Tap,
}

impl<S> Wire<S> {
    /// `bytes` counts what is read after the upgrade's response head.
    pub fn new(inner: S, bytes: Arc<AtomicU64>, deflate: bool) -> (Wire<S>, Tap) {
        let tap = Tap {
            starts: Arc::default(),
            deflate,
        };
        let wire = Wire {
            inner,
            scan: Scan::Head(0),
            bytes,
            tap: tap.clone(),
        };
        (wire, tap)
    }

    fn observe(&mut self, bytes: &mut [u8]) {
        let mut at = 0;
        while let Scan::Head(last) = &mut self.scan {
            let Some(byte) = bytes.get(at) else {
                return;
            };
            *last = (*last << 8) | u32::from(*byte);
            at += 1;
            if *last == u32::from_be_bytes(*b"\r\n\r\n") {
                self.scan = Scan::Frames(FrameScan::default());
            }
        }
        let rest = &mut bytes[at..];
        self.bytes.fetch_add(rest.len() as u64, Relaxed);
        let (Scan::Frames(frames), true) = (&mut self.scan, self.tap.deflate) else {
            return;
        };
        let starts = &self.tap.starts;
        frames.scan(rest, |event| {
            let Scanned::First(first) = event else {
                return;
            };
            let opcode = *first & 0x0f;
            if opcode == 0x1 || opcode == 0x2 {
                let compressed = *first & 0x40 != 0;
                if compressed {
                    *first = (*first & 0x80) | 0x2;
                }
                if let Ok(mut starts) = starts.lock() {
                    starts.push_back((compressed, opcode == 0x1));
                }
            }
        });
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Wire<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.observe(&mut buf.filled_mut()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Wire<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_frame_bytes_after_the_head_and_takes_rsv1_off() {
        let (mut wire, tap) = Wire::new(tokio::io::empty(), Arc::default(), true);
        let mut stream = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n".to_vec();
        let frames_at = stream.len();
        stream.extend([0xC1, 0x03, 1, 2, 3]); // compressed text, 3 bytes
        stream.extend([0x81, 0x02, b'{', b'}']); // plain text
        stream.extend([0x89, 0x00]); // ping: not a message
                                     // One byte at a time: headers split across reads are the hard case.
        for i in 0..stream.len() {
            let (_, rest) = stream.split_at_mut(i);
            wire.observe(&mut rest[..1]);
        }
        assert_eq!(wire.bytes.load(Relaxed), (stream.len() - frames_at) as u64);
        assert_eq!(
            stream[frames_at], 0x82,
            "RSV1 off, marked binary for the parser"
        );
        let starts: Vec<_> = tap.starts.lock().unwrap().iter().copied().collect();
        assert_eq!(starts, [(true, true), (false, true)]);
    }
}
