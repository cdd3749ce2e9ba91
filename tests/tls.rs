//! TLS: with `tls.cert` and `tls.key` a node serves `wss://` and `https://` on its one
//! listener, with a self-signed certificate the test clients trust.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_tungstenite::WebSocketStream;

/// A self-signed certificate for `localhost` in PEM files of its own.
struct Certificate {
    dir: PathBuf,
    der: rustls::pki_types::CertificateDer<'static>,
}

impl Certificate {
    fn new(name: &str) -> Certificate {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("generate a certificate");
        let dir = std::env::temp_dir().join(format!("volley-tls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("cert.pem"), made.cert.pem()).expect("write cert");
        std::fs::write(dir.join("key.pem"), made.signing_key.serialize_pem()).expect("write key");
        Certificate {
            dir,
            der: made.cert.der().clone(),
        }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }

    fn use_in(&self, config: &mut volley::Config) {
        config.tls.cert = self.path("cert.pem");
        config.tls.key = self.path("key.pem");
    }

    /// A TLS connection to the node that trusts only this certificate.
    async fn connect(&self, addr: SocketAddr) -> TlsStream<TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).expect("trust the certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
        tokio::time::timeout(
            WAIT,
            tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
        )
        .await
        .expect("TLS handshake timed out")
        .expect("TLS handshake")
    }

    async fn websocket(&self, addr: SocketAddr) -> WebSocketStream<TlsStream<TcpStream>> {
        let tls = self.connect(addr).await;
        let url = format!("wss://localhost:{}/ws", addr.port());
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tls))
            .await
            .expect("upgrade timed out")
            .expect("upgrade over TLS");
        ws
    }

    /// One HTTP/1.1 request over TLS: status and body.
    async fn https(&self, addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut tls = self.connect(addr).await;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Authorization: apikey test-key\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(request.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        // The node may end without close_notify after `Connection: close`; what was read
        // before that is the whole response.
        let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut response))
            .await
            .expect("https timed out");
        parse_response(&response)
    }
}

impl Drop for Certificate {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The next text frame's messages (a batch frame taken apart).
async fn next_messages(ws: &mut WebSocketStream<TlsStream<TcpStream>>) -> Vec<Value> {
    loop {
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("the socket ended")
            .expect("a frame");
        if let Message::Text(text) = frame {
            return frame_messages(&text);
        }
    }
}

async fn join(ws: &mut WebSocketStream<TlsStream<TcpStream>>, room: &str) {
    let join = json!({"type": "join", "roomId": room}).to_string();
    ws.send(Message::text(join)).await.expect("send join");
    // The membership notice to the joiner says the join is done.
    let notice = next_messages(ws).await;
    assert_eq!(notice[0]["type"], "user_joined", "{notice:?}");
}

#[tokio::test]
async fn a_node_with_a_certificate_serves_wss_and_the_https_api() {
    let cert = Certificate::new("serves");
    let server = start(|c| cert.use_in(c)).await;
    let addr = server.local_addr();

    let (status, body) = cert.https(addr, "GET", "/healthz", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("healthz JSON")["status"],
        "ok"
    );

    let mut listener = cert.websocket(addr).await;
    join(&mut listener, "scores").await;
    let publish = json!({"roomId": "scores", "content": {"home": 2, "away": 1}});
    let (status, body) = cert
        .https(addr, "POST", "/api/publish", &publish.to_string())
        .await;
    assert_eq!(status, 200, "{body}");
    let got = next_messages(&mut listener).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        without_timestamp(got[0].clone()),
        json!({"type": "message", "roomId": "scores", "content": {"home": 2, "away": 1}})
    );

    // A client publishing over wss reaches the other wss client.
    let mut publisher = cert.websocket(addr).await;
    let message = json!({"type": "message", "roomId": "scores", "content": "goal"});
    publisher
        .send(Message::text(message.to_string()))
        .await
        .expect("send");
    let got = next_messages(&mut listener).await;
    assert_eq!(got[0]["content"], "goal", "{got:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_reader_that_falls_behind_over_tls_gets_every_message_in_order() {
    falls_behind(false).await;
}

/// `server.io_uring` writes only plain TCP sockets that way; TLS goes through rustls.
#[tokio::test]
async fn with_io_uring_on_a_tls_reader_still_gets_every_message_in_order() {
    falls_behind(true).await;
}

async fn falls_behind(io_uring: bool) {
    // Far more than the socket buffers hold: most of it waits in the outbox, the writer
    // task and rustls's own output, and must come out whole and in order.
    const MESSAGES: usize = 300;
    let cert = Certificate::new(if io_uring { "behind-uring" } else { "behind" });
    let server = start(|c| {
        cert.use_in(c);
        c.batch.delivery_window_ms = if io_uring { 5 } else { 0 };
        c.limits.max_outbox_bytes = 16 << 20;
        c.limits.publish_rate = 0;
        c.server.io_uring = io_uring;
    })
    .await;
    let addr = server.local_addr();
    let mut reader = cert.websocket(addr).await;
    join(&mut reader, "feed").await;
    let mut publisher = cert.websocket(addr).await;
    let filler = "x".repeat(16 * 1024);
    for seq in 0..MESSAGES {
        let frame =
            json!({"type": "message", "roomId": "feed", "content": {"seq": seq, "filler": filler}});
        publisher
            .send(Message::text(frame.to_string()))
            .await
            .expect("send");
    }
    let mut seen = Vec::new();
    while seen.len() < MESSAGES {
        for message in next_messages(&mut reader).await {
            assert_eq!(
                message["content"]["filler"].as_str().map(str::len),
                Some(16 * 1024)
            );
            seen.push(message["content"]["seq"].as_u64().expect("seq"));
        }
    }
    assert_eq!(seen, (0..MESSAGES as u64).collect::<Vec<_>>());
    server.shutdown().await;
}

#[tokio::test]
async fn a_large_client_message_spans_many_records_and_arrives_whole() {
    let cert = Certificate::new("large");
    let server = start(|c| {
        cert.use_in(c);
        c.limits.max_frame_bytes = 1 << 20;
    })
    .await;
    let addr = server.local_addr();
    let mut listener = cert.websocket(addr).await;
    join(&mut listener, "big").await;
    let mut publisher = cert.websocket(addr).await;
    // 600 KB: about forty 16 KB TLS records for one WebSocket frame.
    let content = "y".repeat(600 * 1024);
    let frame = json!({"type": "message", "roomId": "big", "content": content});
    publisher
        .send(Message::text(frame.to_string()))
        .await
        .expect("send");
    let got = next_messages(&mut listener).await;
    assert_eq!(got[0]["content"].as_str().map(str::len), Some(600 * 1024));
    server.shutdown().await;
}

#[tokio::test]
async fn plain_connections_to_a_tls_node_are_refused_and_it_keeps_serving() {
    let cert = Certificate::new("plain");
    let server = start(|c| {
        cert.use_in(c);
        c.server.header_timeout_ms = 500;
    })
    .await;
    let addr = server.local_addr();

    // Plain HTTP where a ClientHello belongs: the handshake fails, the node answers with
    // a TLS alert record (content type 21), not HTTP, and hangs up.
    let mut plain = TcpStream::connect(addr).await.expect("connect");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let answer = expect_hangup(&mut plain).await;
    assert!(
        answer.first() == Some(&21),
        "a plain request got something other than a TLS alert: {:?}",
        String::from_utf8_lossy(&answer)
    );

    // A connection that never says anything is dropped after server.header_timeout_ms.
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let answer = expect_hangup(&mut silent).await;
    assert!(answer.is_empty(), "{answer:?}");

    let (status, _) = cert.https(addr, "GET", "/healthz", "").await;
    assert_eq!(status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn a_missing_or_half_tls_config_stops_the_node_naming_the_key() {
    let cert = Certificate::new("config");
    let mut half = config();
    half.tls.cert = cert.path("cert.pem");
    let error = volley::Server::bind(half).await.err().expect("refused");
    assert_eq!(
        error.to_string(),
        "tls.cert and tls.key must be set together (one is empty)"
    );

    let mut missing = config();
    cert.use_in(&mut missing);
    missing.tls.key = cert.path("nope.pem");
    let error = volley::Server::bind(missing).await.err().expect("refused");
    let text = error.to_string();
    assert!(
        text.starts_with(&format!("tls.key = {:?}: ", cert.path("nope.pem"))),
        "{text}"
    );

    let mut swapped = config();
    swapped.tls.cert = cert.path("key.pem");
    swapped.tls.key = cert.path("cert.pem");
    let error = volley::Server::bind(swapped).await.err().expect("refused");
    assert!(error.to_string().starts_with("tls.cert = "), "{error}");
}
