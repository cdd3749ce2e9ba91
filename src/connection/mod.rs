//! One WebSocket connection: its reader and its session.
//!
//! After the HTTP upgrade the TCP stream is taken back from hyper and split. The reader
//! (fastwebsockets) turns frames into session actions; the write half goes to the
//! socket's `Outbox` (`crate::outbox`), which fan-out fills from any thread and whose
//! writer task this module starts. They meet only at the outbox, whose lock is never
//! held across an `.await`.

mod access;
mod reader;
mod rules;
mod session;

pub use access::UpgradeAuth;

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::node::Node;
use crate::outbox::{self, CloseReason, Outbox};
use session::Session;

/// Serves one upgraded socket until it closes. `early` holds bytes the client sent
/// right after the handshake, already read by the HTTP layer.
pub async fn serve(
    node: Arc<Node>,
    outbox: Arc<Outbox>,
    stream: TcpStream,
    early: Bytes,
    upgrade: UpgradeAuth,
) {
    let (read_half, write_half) = stream.into_split();
    outbox.attach(write_half);
    // The writer is a task of its own: waking it must not poll the reader.
    let writer = {
        let outbox = outbox.clone();
        tokio::spawn(async move { outbox::run_writer(&*outbox).await })
    };
    let mut read_half = std::io::Cursor::new(early).chain(read_half);
    let mut session = Session::new(node.clone(), outbox.clone(), upgrade);
    let limits = reader::Limits::from_config(node.config());
    reader::run(&mut read_half, &outbox, &mut session, limits).await;
    // Rooms were normally left already, when the close began; this covers every other
    // way out, and the socket's user and presence watch.
    session.end();
    outbox.close(CloseReason::Gone);
    if writer.await.is_err() {
        tracing::error!(conn = outbox.id(), "socket writer panicked");
    }
    node.disconnect(&outbox);
}
