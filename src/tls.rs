//! TLS (rustls) for `wss://` and `https://`, when `tls.cert` and `tls.key` are set.
//!
//! The handshake and the HTTP requests run over tokio-rustls like any stream. After a
//! WebSocket upgrade the session is taken apart (`TlsSocket`): the TCP stream and the
//! rustls state are shared by the socket's reader and its outbox, so the outbox keeps
//! writing shared frames from whatever thread found them due, without a task per write,
//! exactly as on plain TCP. Both sides take the rustls state under a short lock, never
//! held across an `.await`.
//!
//! Bounded: rustls holds at most `SEND_BUFFER` bytes of encrypted output a socket would
//! not take yet (the outbox bound covers everything before it), and a handshake that
//! does not finish within `server.header_timeout_ms` is dropped.
//!
//! A leaf: it imports only `config`.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConnection;
use tokio::io::ReadBuf;
use tokio::net::TcpStream;
pub use tokio_rustls::server::TlsStream;
pub use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// Encrypted bytes rustls may hold for a socket that would not take them yet.
const SEND_BUFFER: usize = 64 * 1024;

/// Why the certificate or key could not be used; names the key and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert and tls.key must be set together (one is empty)")]
    Half,
    #[error("{key} = {path:?}: {reason}")]
    File {
        key: &'static str,
        path: String,
        reason: String,
    },
    #[error("tls.cert and tls.key do not make a usable certificate: {0}")]
    Rejected(rustls::Error),
}

/// The acceptor for `config`, or `None` when TLS is off (both keys empty).
pub fn acceptor(config: &TlsConfig) -> Result<Option<TlsAcceptor>, TlsError> {
    match (config.cert.is_empty(), config.key.is_empty()) {
        (true, true) => return Ok(None),
        (false, false) => {}
        _ => return Err(TlsError::Half),
    }
    let file_error = |key, path: &str, reason: String| TlsError::File {
        key,
        path: path.to_string(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| file_error("tls.cert", &config.cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_error(
            "tls.cert",
            &config.cert,
            "no PEM certificate in the file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key)
        .map_err(|e| file_error("tls.key", &config.key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rejected)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Rejected)?;
    // WebSockets upgrade over HTTP/1.1 only; a client offering h2 is told http/1.1.
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

/// An upgraded TLS socket, shared by its reader and its outbox.
pub struct TlsSocket {
    tcp: TcpStream,
    conn: Mutex<ServerConnection>,
}

impl TlsSocket {
    /// Takes over a finished session (`TlsStream::into_inner`): what rustls already
    /// decrypted or still has to send stays in `conn` and comes first.
    pub fn new(tcp: TcpStream, mut conn: ServerConnection) -> Arc<TlsSocket> {
        conn.set_buffer_limit(Some(SEND_BUFFER));
        Arc::new(TlsSocket {
            tcp,
            conn: Mutex::new(conn),
        })
    }

    /// Ready when plaintext is waiting (or the stream ended or failed: the read says
    /// which). Records that hold no plaintext yet are taken in here, so an idle socket
    /// waits on the kernel and not inside a read holding the reader's buffer.
    pub async fn readable(&self) -> io::Result<()> {
        loop {
            {
                let mut conn = self.conn.lock();
                match conn.process_new_packets() {
                    Ok(state)
                        if state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed() => {}
                    _ => return Ok(()),
                }
                // What the socket holds now; `WouldBlock` also clears its readiness.
                match conn.read_tls(&mut Raw(&self.tcp)) {
                    Ok(0) => return Ok(()),
                    Ok(_) => {
                        let _ = flush(&mut conn, &self.tcp);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Ok(()),
                }
            }
            self.tcp.readable().await?;
        }
    }

    /// Reads plaintext into `buf`, waiting for the socket as needed.
    pub fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.tcp.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Plaintext without waiting: `Ok(0)` at the end (close_notify or EOF),
    /// `WouldBlock` when a record is incomplete.
    fn try_read(&self, out: &mut [u8]) -> io::Result<usize> {
        let mut conn = self.conn.lock();
        loop {
            match conn.reader().read(out) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return done,
            }
            if conn.read_tls(&mut Raw(&self.tcp))? == 0 {
                // EOF: let rustls say whether it was clean.
                conn.process_new_packets().map_err(invalid)?;
                // A peer that hangs up without close_notify ends the stream like plain
                // TCP: WebSocket frames carry their own lengths, so a cut is still seen.
                return match conn.reader().read(out) {
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::UnexpectedEof
                        ) =>
                    {
                        Ok(0)
                    }
                    done => done,
                };
            }
            conn.process_new_packets().map_err(invalid)?;
            // Records rustls owes the peer (alerts, key updates) go out now if they can.
            flush(&mut conn, &self.tcp).or_else(would_block_ok)?;
        }
    }

    /// Encrypts and writes what the socket takes now. Plaintext is accepted only once
    /// earlier output is out, so at most one write's records wait in rustls
    /// (`has_backlog`, `writable` sends them).
    pub fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut conn = self.conn.lock();
        flush(&mut conn, &self.tcp)?;
        let n = conn.writer().write_vectored(bufs)?;
        flush(&mut conn, &self.tcp).or_else(would_block_ok)?;
        Ok(n)
    }

    /// Whether encrypted output is still waiting for the socket.
    pub fn has_backlog(&self) -> bool {
        self.conn.lock().wants_write()
    }

    /// Resolves once everything rustls holds is written and the socket may take more.
    pub async fn writable(&self) -> io::Result<()> {
        loop {
            match flush(&mut self.conn.lock(), &self.tcp) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return done,
            }
            self.tcp.writable().await?;
        }
    }

    /// Sends close_notify (if the socket takes it now) and ends the sending side.
    pub fn shutdown_write(&self) {
        {
            let mut conn = self.conn.lock();
            conn.send_close_notify();
            let _ = flush(&mut conn, &self.tcp);
        }
        let _ = socket2::SockRef::from(&self.tcp).shutdown(Shutdown::Write);
    }
}

/// Writes rustls's pending records without waiting; `WouldBlock` if some remain.
fn flush(conn: &mut ServerConnection, tcp: &TcpStream) -> io::Result<()> {
    while conn.wants_write() {
        if conn.write_tls(&mut Raw(tcp))? == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}

fn would_block_ok(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(())
    } else {
        Err(e)
    }
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The TCP stream as blocking-style `Read` / `Write` that never block (`WouldBlock`
/// instead), which is what rustls's `read_tls` / `write_tls` take.
struct Raw<'a>(&'a TcpStream);

impl Read for Raw<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Raw<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
