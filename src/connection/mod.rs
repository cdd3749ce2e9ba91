//! One WebSocket connection: its reader, its outbox and its writer.
//!
//! After the HTTP upgrade the TCP stream is taken back from hyper and split. The reader
//! (fastwebsockets) turns frames into session actions; fan-out fills the outbox from any
//! thread, and whichever thread finds messages due (the window's tick, a leading-edge
//! push) writes them with a non-blocking vectored write; the writer task finishes what
//! would block, and the close. They meet only at the outbox, whose lock is never held
//! across an `.await`.

pub mod outbox;
mod reader;
mod rules;
mod session;
mod writer;

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

pub use outbox::{CloseReason, ConnId, Outbox, Pushed};

use crate::node::Node;
use session::Session;

/// Serves one upgraded socket until it closes. `early` holds bytes the client sent
/// right after the handshake, already read by the HTTP layer.
pub async fn serve(node: Arc<Node>, outbox: Arc<Outbox>, stream: TcpStream, early: Bytes) {
    let (read_half, write_half) = stream.into_split();
    outbox.attach(write_half);
    // The writer is a task of its own: waking it must not poll the reader.
    let writer = {
        let outbox = outbox.clone();
        tokio::spawn(async move { writer::run(&outbox).await })
    };
    let mut read_half = std::io::Cursor::new(early).chain(read_half);
    let mut session = Session::new(node.clone(), outbox.clone());
    let max_bytes = node.config().limits.max_frame_bytes;
    reader::run(&mut read_half, &outbox, &mut session, max_bytes).await;
    // Normally left already, when the close began; this covers every other way out.
    session.leave_all();
    outbox.close(CloseReason::Gone);
    if writer.await.is_err() {
        tracing::error!(conn = outbox.id(), "socket writer panicked");
    }
    node.disconnect(&outbox);
}
