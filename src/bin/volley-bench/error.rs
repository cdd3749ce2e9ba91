//! What can stop a run, with what the tool was doing when it did.

/// Why a run could not finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{url}: {reason}")]
    Url { url: String, reason: String },
    #[error("{url}: cannot connect: {source}")]
    Connect {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: WebSocket handshake failed: {reason}")]
    Handshake { url: String, reason: String },
    #[error("socket failed: {0}")]
    Socket(#[from] fastwebsockets::WebSocketError),
    #[error("the server closed the socket")]
    Closed,
    #[error("HTTP publish failed: {0}")]
    Http(String),
    #[error("only {joined} of {total} sockets joined: {reason}")]
    NotJoined {
        joined: usize,
        total: usize,
        reason: String,
    },
    #[error("the joins ended {by_ms} ms after --start-at: start the shards with more time")]
    Late { by_ms: u64 },
    #[error("publisher failed: {0}")]
    Publisher(Box<BenchError>),
}
