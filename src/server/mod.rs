//! The listener: accepts TCP, serves HTTP/1.1, upgrades WebSockets, and shuts down
//! gracefully.
//!
//! Any path that asks for a WebSocket upgrade gets one (the reference servers' clients connect to
//! the root). After the handshake the TCP stream is taken back from hyper so volley's own
//! writer can send shared, pre-encoded frames with vectored writes.
//!
//! `GET /sse` is a Server-Sent Events stream (`sse.rs`), admitted as a WebSocket is.
//!
//! Shutdown: refuse new WebSockets and answer `/readyz` 503, ask every socket to flush its
//! pending window and close with 1001, wait for them up to the drain timeout, then stop
//! accepting and let HTTP requests in flight finish.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, Body};
use crate::broker::{Broker, RedisStartError};
use crate::config::{Config, RoomClasses};
use crate::connection;
use crate::features::Features;
use crate::node::Node;
use crate::outbox::CloseReason;
use crate::throttle::LogThrottle;
pub use crate::tls::TlsError;
use crate::tls::{self, TlsAcceptor, TlsSocket, TlsStream};

mod sse;

/// Why a node could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Redis(#[from] RedisStartError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A running node and its listener.
pub struct Server {
    node: Arc<Node>,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

/// What every connection's tasks share.
struct Shared {
    node: Arc<Node>,
    features: Features,
    shutdown: CancellationToken,
    /// Upgraded sockets; shutdown waits for these.
    sockets: TaskTracker,
    /// WebSockets per client address, for `limits.max_connections_per_ip`.
    per_ip: Arc<DashMap<IpAddr, usize>>,
    /// Set when `tls.cert` / `tls.key` are: every connection is TLS.
    tls: Option<TlsAcceptor>,
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Every socket closed within the drain timeout.
    pub drained: bool,
    /// Sockets still open when the drain timeout ended.
    pub left_open: usize,
}

impl Server {
    /// Binds `server.listen` and serves with the broker the config asks for
    /// (`broker::start`), which shares the node's room classes, compiled once.
    pub async fn bind(config: Config) -> Result<Server, ServeError> {
        let (config, classes) = prepare(config)?;
        let broker = crate::broker::start(&config, &classes)?;
        Self::serve(config, broker, classes).await
    }

    /// Binds `server.listen` and serves with the given broker engine.
    pub async fn bind_with_broker(
        config: Config,
        broker: Arc<dyn Broker>,
    ) -> Result<Server, ServeError> {
        let (config, classes) = prepare(config)?;
        Self::serve(config, broker, classes).await
    }

    async fn serve(
        config: Config,
        broker: Arc<dyn Broker>,
        classes: Arc<RoomClasses>,
    ) -> Result<Server, ServeError> {
        if let Some(warning) = crate::fdlimit::raise_for(config.limits.max_connections) {
            tracing::warn!("{warning}");
        }
        let tls = tls::acceptor(&config.tls)?;
        let addr = config.server.listen;
        let listen_error = |source| ServeError::Listen { addr, source };
        let listener = listen(addr).map_err(listen_error)?;
        let local_addr = listener.local_addr().map_err(listen_error)?;
        let node = Node::with_classes(config, broker, classes);
        let shared = Arc::new(Shared {
            features: Features::start(&node),
            node: node.clone(),
            shutdown: CancellationToken::new(),
            sockets: TaskTracker::new(),
            per_ip: Arc::new(DashMap::new()),
            tls,
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        let tls = shared.tls.is_some();
        tracing::info!(addr = %local_addr, node = node.id(), tls, "volley listening");
        Ok(Server {
            node,
            local_addr,
            shared,
            accept,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Drains: refuses new WebSockets (503) and answers `/readyz` 503 while every socket
    /// is flushed and closed (1001) and what is queued for other nodes is sent; then stops
    /// accepting. All of it within the drain timeout, whatever Redis does. The listener
    /// stays open until the drain ends, so a balancer's health checks see the node go
    /// unready instead of a refused connection.
    pub async fn shutdown(self) -> ShutdownReport {
        let deadline = tokio::time::Instant::now() + self.node.config().drain_timeout();
        let shared = &self.shared;
        self.node.start_draining();
        // Features first: nothing publishes while sockets drain and the broker flushes.
        shared.features.stop(deadline).await;
        self.node.close_all_sockets();
        shared.sockets.close();
        // Sockets that never answer their close may keep the drain until the end; the
        // broker keeps a part of it to send what they left (their goodbyes) all the same.
        let sockets_deadline = deadline - broker_share(self.node.config().drain_timeout());
        let drained = tokio::time::timeout_at(sockets_deadline, shared.sockets.wait())
            .await
            .is_ok();
        let report = ShutdownReport {
            drained,
            left_open: shared.sockets.len(),
        };
        // The drain is over: no more requests; those in flight finish.
        shared.shutdown.cancel();
        let _ = self.accept.await;
        // Publishes still queued for other nodes go out before the node stops, as far as
        // the deadline allows; what cannot is counted and logged by the broker.
        self.node.broker().shutdown(deadline.into_std()).await;
        tracing::info!(drained, left_open = report.left_open, "volley stopped");
        report
    }
}

/// Connections waiting to be accepted, at most: a reconnect storm of thousands of
/// sockets must not overflow the queue (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: u32 = 4096;

/// Binds `addr` with a backlog for reconnect storms (`TcpListener::bind` asks for 1 024).
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// The part of the drain timeout kept for the broker after the sockets: a fifth, at most
/// a second.
fn broker_share(drain: Duration) -> Duration {
    (drain / 5).min(Duration::from_secs(1))
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Frames are already coalesced per window; Nagle would only add delay.
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(stream, peer.ip(), shared.clone()));
            }
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning, and log
                // once per interval instead of twenty lines a second.
                static LOG: LogThrottle = LogThrottle::new(Duration::from_secs(10));
                if let Some(held_back) = LOG.allow() {
                    tracing::warn!(error = %e, held_back, "accept failed (is ulimit -n below limits.max_connections?)");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves one TCP connection, first finishing its TLS handshake when TLS is on.
async fn serve_connection(stream: TcpStream, peer: IpAddr, shared: Arc<Shared>) {
    let Some(acceptor) = &shared.tls else {
        return serve_http(stream, peer, shared).await;
    };
    // A handshake that never finishes is bounded like a request head that never does.
    let timeout = Duration::from_millis(shared.node.config().server.header_timeout_ms);
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => serve_http(stream, peer, shared.clone()).await,
        Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

async fn serve_http<S>(stream: S, peer: IpAddr, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let for_service = shared.clone();
    // Cancelled by an SSE stream whose peer stopped taking its bytes: the connection is
    // dropped, since hyper would wait on the full socket for ever.
    let abort = CancellationToken::new();
    let for_streams = abort.clone();
    let service =
        service_fn(move |req| handle(for_service.clone(), peer, for_streams.clone(), req));
    // The header timeout also bounds an idle keep-alive connection: hyper starts it
    // whenever it waits for the head of the next request.
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(
            shared.node.config().server.header_timeout_ms,
        ))
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = abort.cancelled() => return,
        _ = shared.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn => result,
                _ = abort.cancelled() => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}

async fn handle(
    shared: Arc<Shared>,
    peer: IpAddr,
    abort: CancellationToken,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    // Only a GET may become a WebSocket (RFC 6455 section 4.1); a POST with upgrade
    // headers is an ordinary request.
    if req.method() == hyper::Method::GET && fastwebsockets::upgrade::is_upgrade_request(&req) {
        return Ok(upgrade(&shared, peer, req));
    }
    if sse::wanted(&req) {
        return Ok(sse::stream(&shared, peer, abort, &req));
    }
    Ok(api::route(&shared.node, &shared.features.reports, req).await)
}

fn upgrade(shared: &Arc<Shared>, peer: IpAddr, mut req: Request<Incoming>) -> Response<Body> {
    let Admitted {
        credentials,
        per_ip,
        outbox,
    } = match admit(shared, peer, &req, "WebSocket") {
        Ok(admitted) => admitted,
        Err(refused) => return *refused,
    };
    let config = shared.node.config();
    let deflate = config.compression.enabled && offers_deflate(&req);
    let (mut response, upgrading) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => {
            shared.node.disconnect(&outbox);
            return api::error(StatusCode::BAD_REQUEST, "bad_upgrade", &e.to_string());
        }
    };
    if deflate {
        response.headers_mut().insert(
            hyper::header::SEC_WEBSOCKET_EXTENSIONS,
            hyper::header::HeaderValue::from_static(crate::deflate::RESPONSE),
        );
        outbox.set_deflate();
    }
    if shared.node.is_draining() {
        outbox.close(CloseReason::Shutdown);
    }
    let node = shared.node.clone();
    shared.sockets.spawn(async move {
        // Held while the socket lives: its place in the per-address count.
        let _per_ip = per_ip;
        let upgraded = match upgrading.await {
            Ok(ws) => ws.into_inner().into_inner(),
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket upgrade failed");
                node.disconnect(&outbox);
                return;
            }
        };
        let Some((transport, early)) = transport(upgraded) else {
            tracing::error!("upgraded connection is neither TCP nor TLS over TCP");
            node.disconnect(&outbox);
            return;
        };
        connection::serve(node, outbox, transport, early, credentials, deflate).await
    });
    response.map(|_| Body::default())
}

/// A connection the node takes: its credentials, its place in its address's count, and
/// its outbox.
struct Admitted {
    credentials: connection::UpgradeAuth,
    per_ip: PerIp,
    outbox: Arc<crate::outbox::Outbox>,
}

/// What every connection (a WebSocket, an SSE stream) passes before it is served: the
/// node not draining, its page's origin allowed, its API key right, room under the
/// per-address and node limits. `kind` names it in the refusals.
fn admit(
    shared: &Shared,
    peer: IpAddr,
    req: &Request<Incoming>,
    kind: &str,
) -> Result<Admitted, Box<Response<Body>>> {
    let config = shared.node.config();
    if shared.node.is_draining() {
        return Err(Box::new(api::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "this node is shutting down: connect to another one",
        )));
    }
    if let Some(origin) = req.headers().get(hyper::header::ORIGIN) {
        if !origin_allowed(&config.server.allowed_origins, origin.as_bytes()) {
            tracing::debug!(origin = %String::from_utf8_lossy(origin.as_bytes()), "refusing a {kind} from an origin not in server.allowed_origins");
            return Err(Box::new(api::error(
                StatusCode::FORBIDDEN,
                "forbidden_origin",
                "this page's origin is not in server.allowed_origins",
            )));
        }
    }
    let Ok(credentials) = upgrade_credentials(&shared.node, req) else {
        return Err(Box::new(api::error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the request's Authorization: apikey is not this node's api.key (or api.key is not set)",
        )));
    };
    let Some(per_ip) = PerIp::take(&shared.per_ip, peer, config.limits.max_connections_per_ip)
    else {
        return Err(Box::new(api::error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections_from_ip",
            &format!("this address holds limits.max_connections_per_ip connections on this node already (this one: a {kind})"),
        )));
    };
    let Some(outbox) = shared.node.open_socket() else {
        tracing::warn!("refusing a {kind}: limits.max_connections reached");
        return Err(Box::new(api::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "this node is at limits.max_connections",
        )));
    };
    Ok(Admitted {
        credentials,
        per_ip,
        outbox,
    })
}

/// The config as the node runs it (with the demo's rooms under `--demo`), checked, and
/// its room classes compiled once.
fn prepare(mut config: Config) -> Result<(Config, Arc<RoomClasses>), ServeError> {
    if config.demo.enabled {
        config.add_demo_rooms();
    }
    config.validate()?;
    crate::auth::Authenticator::new(&config.auth)?;
    let classes = Arc::new(RoomClasses::compile(&config.rooms, &config.batch)?);
    Ok((config, classes))
}

/// Whether the upgrade offers permessage-deflate in a form volley accepts.
fn offers_deflate(req: &Request<Incoming>) -> bool {
    let offers: Vec<&str> = req
        .headers()
        .get_all(hyper::header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    crate::deflate::accepts(&offers.join(","))
}

/// The socket under an upgraded connection (TCP, or TLS over TCP), with the bytes
/// hyper read past the request.
fn transport(upgraded: hyper::upgrade::Upgraded) -> Option<(connection::Transport, bytes::Bytes)> {
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => Some((
            connection::Transport::Tcp(parts.io.into_inner()),
            parts.read_buf,
        )),
        Err(upgraded) => {
            let parts = upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>().ok()?;
            let (tcp, session) = parts.io.into_inner().into_inner();
            let tls = TlsSocket::new(tcp, session);
            Some((connection::Transport::Tls(tls), parts.read_buf))
        }
    }
}

/// Whether a page of `origin` may open a WebSocket: any when the list is empty, else an
/// exact match (case-insensitive) or a `scheme://*.domain` pattern matching a subdomain.
fn origin_allowed(allowed: &[String], origin: &[u8]) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Ok(origin) = std::str::from_utf8(origin) else {
        return false;
    };
    let origin = origin.trim().to_ascii_lowercase();
    allowed.iter().any(|pattern| {
        let pattern = pattern.trim_end_matches('/').to_ascii_lowercase();
        match pattern.split_once("://*.") {
            Some((scheme, domain)) => origin
                .strip_prefix(scheme)
                .and_then(|rest| rest.strip_prefix("://"))
                .and_then(|host| host.strip_suffix(domain))
                .is_some_and(|sub| sub.ends_with('.') && sub.len() > 1),
            None => origin == pattern,
        }
    })
}

/// One WebSocket's place in its address's count (`limits.max_connections_per_ip`),
/// given back when dropped.
struct PerIp {
    counts: Option<(Arc<DashMap<IpAddr, usize>>, IpAddr)>,
}

impl PerIp {
    /// A place for one more socket from `ip`, or `None` at the limit (0 = no limit).
    fn take(counts: &Arc<DashMap<IpAddr, usize>>, ip: IpAddr, limit: usize) -> Option<PerIp> {
        if limit == 0 {
            return Some(PerIp { counts: None });
        }
        let mut count = counts.entry(ip).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(PerIp {
            counts: Some((counts.clone(), ip)),
        })
    }
}

impl Drop for PerIp {
    fn drop(&mut self) {
        if let Some((counts, ip)) = self.counts.take() {
            counts.remove_if_mut(&ip, |_, count| {
                *count -= 1;
                *count == 0
            });
        }
    }
}

/// An upgrade's `Authorization: apikey` that is not the node's key.
struct WrongApiKey;

/// A token (`?token=` or `Authorization: Bearer`) or the API key (`Authorization: apikey`)
/// on the upgrade request. An API key that is not the node's (or with the API off) is
/// refused with 401: a backend that meant to be trusted must hear that it is not, not
/// get an ordinary socket that fails later in confusing ways.
fn upgrade_credentials(
    node: &Node,
    req: &Request<Incoming>,
) -> Result<connection::UpgradeAuth, WrongApiKey> {
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .map(|(scheme, value)| (scheme.to_ascii_lowercase(), value.trim().to_string()));
    let query_token = req.uri().query().and_then(|q| {
        q.split('&').find_map(|pair| {
            let value = pair.strip_prefix("token=")?;
            Some(
                percent_encoding::percent_decode_str(value)
                    .decode_utf8_lossy()
                    .into_owned(),
            )
        })
    });
    let key = &node.config().api.key;
    Ok(match authorization {
        Some((scheme, value)) if scheme == "bearer" => connection::UpgradeAuth {
            token: Some(value),
            api_key: false,
        },
        Some((scheme, value)) if scheme == "apikey" => {
            if key.is_empty() || !crate::api::same_secret(value.as_bytes(), key.as_bytes()) {
                return Err(WrongApiKey);
            }
            connection::UpgradeAuth {
                token: query_token,
                api_key: true,
            }
        }
        _ => connection::UpgradeAuth {
            token: query_token,
            api_key: false,
        },
    })
}
