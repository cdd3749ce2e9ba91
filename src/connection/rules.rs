//! RFC 6455 rules fastwebsockets does not enforce on a server's read side: every client
//! frame is masked (section 5.1) and no control frame carries more than 125 bytes
//! (section 5.5; the library checks pings only).
//!
//! `FrameRules` watches the bytes on their way from the socket to the frame parser. It
//! reads only frame headers and counts payload bytes past, so it costs a few branches
//! per frame, not per byte. The reader asks it after each frame whether a rule broke;
//! the frame that broke it is not acted on.
//!
//! With permessage-deflate negotiated it also takes RSV1 off the first frame of a
//! compressed message (the library refuses reserved bits) and tells the reader, in order,
//! which messages came compressed (`Verdict::next_start`).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use crate::protocol::frame_scan::{FrameScan, Scanned};

/// A rule a client frame broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    Unmasked,
    ControlTooLong,
}

impl Broken {
    pub fn reason(self) -> &'static str {
        match self {
            Broken::Unmasked => "client frames must be masked",
            Broken::ControlTooLong => "control frame payload over 125 bytes",
        }
    }
}

/// Set by `FrameRules`, read by the reader; atomics so the reader's future stays `Send`.
#[derive(Default)]
pub struct Verdict {
    broken: AtomicU8,
    /// Whole frames that have passed.
    frames: AtomicU64,
    /// Part of a frame has passed, not all of it.
    partial: AtomicBool,
    /// With permessage-deflate, per message that began (a text or binary frame), in
    /// order: whether it is compressed, and whether it is text (a compressed text frame
    /// reaches the parser marked binary, so the parser does not check compressed bytes as
    /// UTF-8; the reader checks what they inflate to).
    starts: parking_lot::Mutex<VecDeque<Start>>,
}

/// How a message began, for a socket with permessage-deflate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    pub compressed: bool,
    pub text: bool,
}

impl Verdict {
    /// Whether every byte that passed belongs to one of the first `returned` frames: the
    /// parser that read them holds nothing more, and may be let go.
    pub fn drained(&self, returned: u64) -> bool {
        !self.partial.load(Ordering::Relaxed) && self.frames.load(Ordering::Relaxed) == returned
    }

    /// Whole frames that have passed.
    pub fn frames(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }

    /// How the next message began (with permessage-deflate; else `None`).
    pub fn next_start(&self) -> Option<Start> {
        self.starts.lock().pop_front()
    }

    pub fn broken(&self) -> Option<Broken> {
        match self.broken.load(Ordering::Relaxed) {
            1 => Some(Broken::Unmasked),
            2 => Some(Broken::ControlTooLong),
            _ => None,
        }
    }

    fn set(&self, broken: Broken) {
        let code = match broken {
            Broken::Unmasked => 1,
            Broken::ControlTooLong => 2,
        };
        // The first broken rule is the one reported.
        let _ = self
            .broken
            .compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
    }
}

pub struct FrameRules<'v, R> {
    inner: R,
    verdict: &'v Verdict,
    scan: FrameScan,
    /// The socket negotiated permessage-deflate: RSV1 marks a compressed message.
    deflate: bool,
}

impl<'v, R> FrameRules<'v, R> {
    pub fn new(inner: R, verdict: &'v Verdict) -> Self {
        FrameRules {
            inner,
            verdict,
            scan: FrameScan::default(),
            deflate: false,
        }
    }

    /// For a socket that negotiated permessage-deflate.
    pub fn with_deflate(mut self, deflate: bool) -> Self {
        self.deflate = deflate;
        self
    }

    /// The stream the bytes come from.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    fn observe(&mut self, bytes: &mut [u8]) {
        let (verdict, deflate) = (self.verdict, self.deflate);
        self.scan.scan(bytes, |event| match event {
            Scanned::First(first) if deflate => message_start(verdict, first),
            Scanned::First(_) => {}
            Scanned::Head(head) if !head.masked => verdict.set(Broken::Unmasked),
            Scanned::Head(head) if head.is_control() && head.len > 125 => {
                verdict.set(Broken::ControlTooLong)
            }
            Scanned::Head(_) => {}
            Scanned::End => {
                verdict.frames.fetch_add(1, Ordering::Relaxed);
            }
        });
        verdict
            .partial
            .store(self.scan.mid_frame(), Ordering::Relaxed);
    }
}

/// A frame's first byte, on a permessage-deflate socket: a text or binary frame begins a
/// message, recorded in order; RSV1 on it means compressed and is taken off (a compressed
/// text frame is marked binary for the parser). RSV1 anywhere else is left for the
/// parser to refuse.
fn message_start(verdict: &Verdict, first: &mut u8) {
    let opcode = *first & 0x0f;
    if opcode != 0x1 && opcode != 0x2 {
        return;
    }
    let compressed = *first & 0x40 != 0;
    if compressed {
        *first = (*first & !0x40 & 0xf0) | 0x2;
    }
    verdict.starts.lock().push_back(Start {
        compressed,
        text: opcode == 0x1,
    });
}

impl<R: AsyncRead + Unpin> AsyncRead for FrameRules<'_, R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let this = &mut *self;
            this.observe(&mut buf.filled_mut()[before..]);
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(bytes: &[u8]) -> Option<Broken> {
        let verdict = Verdict::default();
        let mut rules = FrameRules::new(tokio::io::empty(), &verdict);
        // One byte at a time: headers split across reads are the hard case.
        for b in bytes {
            rules.observe(&mut [*b]);
        }
        verdict.broken()
    }

    #[test]
    fn masked_frames_of_any_length_pass() {
        let mut frames = vec![0x81, 0x83, 1, 2, 3, 4, b'a', b'b', b'c'];
        frames.extend([0x82, 0xfe, 0x01, 0x00, 1, 2, 3, 4]);
        frames.extend(vec![0u8; 256]);
        frames.extend([0x89, 0x80, 1, 2, 3, 4]);
        assert_eq!(check(&frames), None);
    }

    #[test]
    fn unmasked_and_long_control_frames_are_caught() {
        assert_eq!(check(&[0x81, 0x01, b'a']), Some(Broken::Unmasked));
        let mut pong = vec![0x8a, 0xfe, 0x01, 0x2c, 1, 2, 3, 4];
        pong.extend(vec![0u8; 300]);
        assert_eq!(check(&pong), Some(Broken::ControlTooLong));
        // A long text frame is fine; a control frame after it is judged on its own.
        let mut ok = vec![0x81, 0xfe, 0x01, 0x2c, 1, 2, 3, 4];
        ok.extend(vec![0u8; 300]);
        ok.extend([0x88, 0x82, 1, 2, 3, 4, 0, 0]);
        assert_eq!(check(&ok), None);
    }

    #[test]
    fn with_deflate_rsv1_is_taken_off_message_starts_and_reported_in_order() {
        let verdict = Verdict::default();
        let mut rules = FrameRules::new(tokio::io::empty(), &verdict).with_deflate(true);
        let mut bytes = vec![0xC1, 0x81, 1, 2, 3, 4, 9]; // compressed text
        bytes.extend([0x82, 0x81, 1, 2, 3, 4, 9]); // plain binary
        bytes.extend([0x89, 0x80, 1, 2, 3, 4]); // ping: not a message
        for i in 0..bytes.len() {
            rules.observe(&mut bytes[i..i + 1]);
        }
        assert_eq!(bytes[0], 0x82, "RSV1 off, marked binary for the parser");
        assert_eq!(
            verdict.next_start(),
            Some(Start {
                compressed: true,
                text: true
            })
        );
        assert_eq!(
            verdict.next_start(),
            Some(Start {
                compressed: false,
                text: false
            })
        );
        assert_eq!(verdict.next_start(), None);
        assert_eq!(verdict.broken(), None);
    }
}
