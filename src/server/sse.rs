//! `GET /sse`: admits a Server-Sent Events stream as it admits a WebSocket (the same
//! origin check, credentials and connection limits), opens it (`connection::sse`) and
//! answers with its body; the stream is served on a task the drain waits for.

use std::net::IpAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, ORIGIN, VARY};
use hyper::{Request, Response, StatusCode};
use tokio_util::sync::CancellationToken;

use super::{admit, Admitted, Shared};
use crate::api::{self, Body};
use crate::connection::sse::{self, SseRequest};

/// Whether `req` asks for an SSE stream.
pub(super) fn wanted(req: &Request<Incoming>) -> bool {
    req.method() == hyper::Method::GET && req.uri().path() == "/sse"
}

/// The stream `req` asks for, or why not. `abort` drops the HTTP connection under it.
pub(super) fn stream(
    shared: &Arc<Shared>,
    peer: IpAddr,
    abort: CancellationToken,
    req: &Request<Incoming>,
) -> Response<Body> {
    let last_event_id = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok());
    let request = match SseRequest::parse(req.uri().query().unwrap_or(""), last_event_id) {
        Ok(request) => request,
        Err(e) => return refused(&e),
    };
    let Admitted {
        credentials,
        per_ip,
        outbox,
    } = match admit(shared, peer, req, "SSE stream") {
        Ok(admitted) => admitted,
        Err(refused) => return *refused,
    };
    let node = shared.node.clone();
    let opened = match sse::open(&node, &outbox, credentials, request) {
        Ok(opened) => opened,
        Err(e) => {
            node.disconnect(&outbox);
            node.stats().protocol_error(e.code);
            return refused(&e);
        }
    };
    let body = opened.body();
    shared.sockets.spawn(async move {
        // Held while the stream lives: its place in the per-address count.
        let _per_ip = per_ip;
        if !sse::serve(node, outbox, opened).await {
            abort.cancel();
        }
    });
    let mut response = Response::new(Body::Stream(body));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx (and proxies that follow it) pass each chunk on at once.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Some(origin) = req.headers().get(ORIGIN) {
        // The origin passed `server.allowed_origins` in `admit`.
        headers.insert("access-control-allow-origin", origin.clone());
        headers.insert(VARY, HeaderValue::from_static("origin"));
    }
    response
}

fn refused(e: &crate::protocol::ProtocolError) -> Response<Body> {
    let status = StatusCode::from_u16(sse::status_of(e)).unwrap_or(StatusCode::BAD_REQUEST);
    api::error(status, e.code.as_str(), &e.message)
}
