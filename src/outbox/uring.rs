//! An experiment behind `server.io_uring` (off by default): the sockets a tick makes due
//! are written with one `io_uring_enter` for up to `RING` of them (one `IORING_OP_WRITEV`
//! each) instead of one `writev` system call each. The sockets stay registered with tokio
//! for reading; what a socket does not take at once, and every socket that is not plain
//! TCP (TLS, SSE), goes the usual way (`try_write_all`, then the writer task).

use std::cell::RefCell;
use std::io;
use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::Arc;

use bytes::Bytes;
use io_uring::{opcode, types, IoUring};

use super::write::{advance, try_write_all, IOV_CHUNK};
use super::{Drained, Outbox};

/// Sockets per submission.
const RING: usize = 256;

/// Writes every outbox in `due` and empties it: through io_uring when their node asks
/// for it (`server.io_uring`), else one `flush` each.
pub fn flush_each(due: &mut Vec<Arc<Outbox>>) {
    if due.first().is_some_and(|outbox| outbox.due.io_uring()) {
        thread_local! {
            static BATCH: RefCell<Batch> = RefCell::new(Batch::new());
        }
        let done = BATCH.with(|batch| match batch.try_borrow_mut() {
            Ok(mut batch) if batch.ring.is_some() => {
                for chunk in due.chunks(RING) {
                    batch.write(chunk);
                }
                true
            }
            _ => false,
        });
        if done {
            due.clear();
            return;
        }
    }
    for outbox in due.drain(..) {
        outbox.flush();
    }
}

/// A thread's ring and the buffers a submission borrows from until it completes.
struct Batch {
    ring: Option<IoUring>,
    drained: Drained,
    frames: Vec<Bytes>,
    /// Per submitted write: the outbox's index in the chunk, its socket, its frames.
    writes: Vec<(usize, RawFd, Range<usize>)>,
    iovecs: Vec<libc::iovec>,
    results: Vec<i32>,
    /// Per write: in flight (submitted, not yet completed).
    pending: Vec<bool>,
}

impl Batch {
    fn new() -> Batch {
        let ring = IoUring::new(RING as u32)
            .map_err(|e| tracing::warn!(error = %e, "server.io_uring: no ring on this thread, writing with writev"))
            .ok();
        Batch {
            ring,
            drained: Drained::default(),
            frames: Vec::new(),
            writes: Vec::new(),
            iovecs: Vec::new(),
            results: Vec::new(),
            pending: Vec::new(),
        }
    }

    fn write(&mut self, chunk: &[Arc<Outbox>]) {
        self.frames.clear();
        self.writes.clear();
        for (i, outbox) in chunk.iter().enumerate() {
            let Some(fd) = outbox.io().and_then(super::SocketOut::tcp_fd) else {
                outbox.flush();
                continue;
            };
            let start = self.frames.len();
            if outbox.begin_write(&mut self.drained, &mut self.frames) {
                self.writes.push((i, fd, start..self.frames.len()));
            }
        }
        let submitted = self.submit();
        if let Some(first) = chunk.first() {
            first.stats.io_uring_writes(submitted);
        }
        for (k, (i, _, range)) in self.writes.iter().enumerate() {
            let outbox = &chunk[*i];
            let Some(io) = outbox.io() else { continue };
            let frames = &mut self.frames[range.clone()];
            let mut rest = Vec::new();
            let written = match self.results[k] {
                n if n > 0 => {
                    let whole = advance(frames, n as usize);
                    rest.extend(frames[whole..].iter_mut().map(std::mem::take));
                    try_write_all(io, &mut rest)
                }
                0 if frames.is_empty() => Ok(true),
                0 => Err(io::ErrorKind::WriteZero.into()),
                e if e == -libc::EAGAIN || e == -libc::EINTR => {
                    rest.extend(frames.iter_mut().map(std::mem::take));
                    try_write_all(io, &mut rest)
                }
                e => Err(io::Error::from_raw_os_error(-e)),
            };
            if outbox.end_write(written, &mut rest) {
                outbox.flush();
            }
        }
        self.frames.clear();
    }

    /// Submits one `writev` per write and waits for every completion (a non-blocking
    /// socket completes at once: written, partly written, or `EAGAIN`). Returns how many
    /// were submitted.
    fn submit(&mut self) -> usize {
        self.results.clear();
        self.results.resize(self.writes.len(), -libc::EAGAIN);
        self.pending.clear();
        self.pending.resize(self.writes.len(), false);
        let Some(ring) = self.ring.as_mut() else {
            return 0;
        };
        self.iovecs.clear();
        for (_, _, range) in &self.writes {
            self.iovecs
                .extend(
                    self.frames[range.clone()]
                        .iter()
                        .take(IOV_CHUNK)
                        .map(|f| libc::iovec {
                            iov_base: f.as_ptr() as *mut libc::c_void,
                            iov_len: f.len(),
                        }),
                );
        }
        let mut submitted = 0;
        let mut at = 0;
        {
            let mut sq = ring.submission();
            for (k, (_, fd, range)) in self.writes.iter().enumerate() {
                let n = range.len().min(IOV_CHUNK);
                if n == 0 {
                    self.results[k] = 0;
                    continue;
                }
                let entry =
                    opcode::Writev::new(types::Fd(*fd), self.iovecs[at..].as_ptr(), n as u32)
                        .build()
                        .user_data(k as u64);
                // SAFETY: the iovecs and the frames they point into are not touched until
                // every submitted entry has completed (below), and the sockets stay open:
                // `writes` holds their outboxes' chunk, which holds the write halves.
                if unsafe { sq.push(&entry) }.is_err() {
                    break;
                }
                at += n;
                submitted += 1;
                self.pending[k] = true;
            }
        }
        let mut completed = 0;
        while completed < submitted {
            if let Err(e) = ring.submit_and_wait(submitted - completed) {
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                ) {
                    continue;
                }
                // The kernel may still read the iovecs: they, and the frames they point
                // into, are never freed; a socket whose write is unknown is closed.
                tracing::error!(error = %e, "server.io_uring: submission failed; writing with writev from now on");
                std::mem::forget(self.iovecs.clone());
                std::mem::forget(self.frames.clone());
                self.ring = None;
                for (result, pending) in self.results.iter_mut().zip(&self.pending) {
                    if *pending {
                        *result = -libc::EIO;
                    }
                }
                return 0;
            }
            for cqe in ring.completion() {
                let k = cqe.user_data() as usize;
                if let Some(slot) = self.results.get_mut(k) {
                    *slot = cqe.result();
                    self.pending[k] = false;
                }
                completed += 1;
            }
        }
        submitted
    }
}
