//! One client connection: a WebSocket (its reader and its session), or a Server-Sent
//! Events stream (`sse.rs`: a session whose rooms come from the request, no reader).
//!
//! After the HTTP upgrade the TCP stream is taken back from hyper and split (a TLS
//! socket is shared instead, `crate::tls`). The reader (fastwebsockets) turns frames
//! into session actions; the write side goes to the socket's `Outbox` (`crate::outbox`),
//! which fan-out fills from any thread and whose writer task this module starts. They meet only at the outbox, whose lock is never
//! held across an `.await`.

mod access;
mod reader;
pub(crate) mod rules;
mod session;
pub mod sse;

pub use access::UpgradeAuth;

use std::sync::Arc;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;

use crate::node::Node;
use crate::outbox::{self, CloseReason, Outbox, SocketOut};
use crate::tls::TlsSocket;
use session::Session;

/// An upgraded socket as the HTTP layer hands it over.
pub enum Transport {
    Tcp(TcpStream),
    Tls(Arc<TlsSocket>),
}

/// A socket's read side: first what the HTTP layer had already read past the handshake,
/// then the socket. Idle, it holds no buffer: the reader waits on `readable`.
pub struct SocketIn {
    early: Bytes,
    half: ReadSide,
}

enum ReadSide {
    Tcp(OwnedReadHalf),
    Tls(Arc<TlsSocket>),
}

impl SocketIn {
    /// Ready when there is something to read (or the socket failed).
    pub async fn readable(&self) -> std::io::Result<()> {
        if self.early.has_remaining() {
            return Ok(());
        }
        match &self.half {
            ReadSide::Tcp(half) => half.readable().await,
            ReadSide::Tls(tls) => tls.readable().await,
        }
    }
}

impl AsyncRead for SocketIn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.early.has_remaining() {
            let n = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early[..n]);
            self.early.advance(n);
            if !self.early.has_remaining() {
                self.early = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        match &mut self.half {
            ReadSide::Tcp(half) => Pin::new(half).poll_read(cx, buf),
            ReadSide::Tls(tls) => tls.poll_read(cx, buf),
        }
    }
}

/// Serves one upgraded socket until it closes. `early` holds bytes the client sent
/// right after the handshake, already read by the HTTP layer.
pub async fn serve(
    node: Arc<Node>,
    outbox: Arc<Outbox>,
    transport: Transport,
    early: Bytes,
    upgrade: UpgradeAuth,
    deflate: bool,
) {
    let half = match transport {
        Transport::Tcp(stream) => {
            let (read_half, write_half) = stream.into_split();
            outbox.attach(SocketOut::Tcp(write_half));
            ReadSide::Tcp(read_half)
        }
        Transport::Tls(tls) => {
            outbox.attach(SocketOut::Tls(tls.clone()));
            ReadSide::Tls(tls)
        }
    };
    // The writer is a task of its own: waking it must not poll the reader.
    let writer = {
        let outbox = outbox.clone();
        tokio::spawn(async move { outbox::run_writer(&*outbox).await })
    };
    let mut read_half = SocketIn {
        early: detach(early),
        half,
    };
    let mut session = Session::new(node.clone(), outbox.clone(), upgrade);
    let limits = reader::Limits {
        deflate,
        ..reader::Limits::from_config(node.config())
    };
    reader::run(&mut read_half, &outbox, &mut session, limits).await;
    // The session normally ended already, when the close began; this covers every other
    // way out.
    session.end();
    outbox.close(CloseReason::Gone);
    if writer.await.is_err() {
        tracing::error!(conn = outbox.id(), "socket writer panicked");
    }
    node.disconnect(&outbox);
}

/// `early` is a view of hyper's whole read buffer (8 KiB or more), even when empty: a
/// socket keeps a copy of the bytes, and the buffer is freed here (taken by value, so
/// nothing in the socket's task still holds it).
fn detach(early: Bytes) -> Bytes {
    if early.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&early)
    }
}
