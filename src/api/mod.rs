//! HTTP routes other than the WebSocket upgrade: health, the publish API, Prometheus
//! `/metrics`, `/api/cluster`, `/api/demo` and the pages (`/`, `/dashboard`).
//!
//! `POST /api/publish` lets a backend push a scoreboard update without holding a socket.
//! It goes through the same `Node::publish` as a socket's `message`, so API publishes
//! reach the same subscribers, on every node, in the same frames. `state.rs`: state
//! rooms' routes (the board's snapshot, and publishes that wait for the engine's answer).

mod body;
mod state;

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::metrics::Source;
use crate::node::Node;
use crate::protocol::inbound::Replay;
use crate::protocol::inbound::{check_room_id, parse_publish_request, PublishRequest};
use crate::protocol::{check_content, outbound, ErrorCode, ProtocolError};
use crate::reports::NodeReports;

pub use body::Body;

pub async fn route(
    node: &Arc<Node>,
    reports: &NodeReports,
    req: Request<Incoming>,
) -> Response<Body> {
    // HEAD is GET without the body; hyper leaves the body out of the response.
    let method = match req.method() {
        &Method::HEAD => &Method::GET,
        other => other,
    };
    match (method, req.uri().path()) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &node.health()),
        (&Method::GET, "/readyz") => ready(node),
        (&Method::POST, "/api/publish") => publish(node, req).await,
        (&Method::GET, path) if path.starts_with("/api/history/") => history(node, req).await,
        (&Method::GET, path) if path.starts_with("/api/state/") => state::snapshot(node, req).await,
        (&Method::GET, path) if path == "/api/presence" || path.starts_with("/api/presence/") => {
            presence(node, req).await
        }
        (_, "/api/publish") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use POST",
        ),
        (&Method::GET, "/metrics") => Response::builder()
            .header(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")
            .body(Body::from(node.prometheus()))
            .unwrap_or_default(),
        (&Method::GET, "/api/cluster") => node_reports(node, reports).await,
        (&Method::GET, "/api/demo") => {
            json_response(StatusCode::OK, &crate::demo::catalog(&node.config().demo))
        }
        (&Method::GET, path) => match crate::web::asset(path) {
            Some(asset) => Response::builder()
                .header(CONTENT_TYPE, asset.content_type)
                .header(CACHE_CONTROL, "no-cache")
                .body(Body::from(asset.body))
                .unwrap_or_default(),
            None => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
        },
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
    }
}

/// Checks the API key: the refusal when it is missing or wrong, else `None`.
fn refusal<B>(node: &Node, req: &Request<B>) -> Option<Response<Body>> {
    let key = &node.config().api.key;
    if key.is_empty() {
        return Some(error(
            StatusCode::FORBIDDEN,
            "api_disabled",
            "the API is off: set api.key to enable it",
        ));
    }
    // The scheme is case-insensitive (RFC 9110 section 11.1): `ApiKey KEY` works too.
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("apikey"))
        .map_or("", |(_, key)| key.trim());
    if !same_secret(given.as_bytes(), key.as_bytes()) {
        return Some(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the header Authorization: apikey <api.key>",
        ));
    }
    None
}

/// The room id after `prefix` in the path, checked as a join checks it: an id no socket
/// could join is not read either.
fn room_in_path<B>(req: &Request<B>, prefix: &str) -> Result<String, ProtocolError> {
    let encoded = req.uri().path().trim_start_matches(prefix);
    let Ok(room) = percent_encoding::percent_decode_str(encoded).decode_utf8() else {
        return Err(ProtocolError::new(
            ErrorCode::InvalidField,
            "roomId is not UTF-8 once percent-decoded",
        ));
    };
    check_room_id(&room)?;
    Ok(room.into_owned())
}

/// A server frame's JSON as the body of a 200 (the frame's own bytes, not a copy).
fn frame_response(frame: &crate::protocol::Encoded) -> Response<Body> {
    Response::builder()
        .header(CONTENT_TYPE, "application/json")
        .body(Body::from(frame.json_bytes()))
        .unwrap_or_default()
}

/// A request the client got wrong: 400 with its code.
fn bad_request(e: &ProtocolError) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, e.code.as_str(), &e.message)
}

/// `GET /api/history/{roomId}?limit=N` (the last N) or `?since=O[&epoch=E]` (everything
/// after offset O; without an epoch, the room's current one): the history frame a join
/// would get.
async fn history(node: &Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    if let Some(refused) = refusal(node, &req) {
        return refused;
    }
    let room = match room_in_path(&req, "/api/history/") {
        Ok(room) => room,
        Err(e) => return bad_request(&e),
    };
    let (mut limit, mut since, mut epoch) = (None, None, None);
    for pair in req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
        let number = || value.parse::<u64>().ok();
        match name {
            "limit" => limit = Some(number()),
            "since" => since = Some(number()),
            "epoch" => epoch = Some(value.to_string()),
            _ => {}
        }
    }
    let bad = |message: &str| error(StatusCode::BAD_REQUEST, "invalid_field", message);
    let replay = match (since, limit) {
        (Some(None), _) => return bad("since must be an offset"),
        (_, Some(None)) => return bad("limit must be a number of messages"),
        (Some(Some(offset)), _) => {
            let epoch = match epoch {
                Some(epoch) => epoch,
                // No epoch given: the room's current one.
                None => match node.history(&room, &Replay::Last(0)).await {
                    Ok(Some(h)) => h.epoch.to_string(),
                    Ok(None) => String::new(),
                    Err(e) => return unavailable(&e.to_string()),
                },
            };
            Replay::Since { offset, epoch }
        }
        (None, Some(Some(n))) => Replay::Last(n as usize),
        (None, None) => Replay::Last(usize::MAX),
    };
    match node.history(&room, &replay).await {
        Ok(Some(h)) => frame_response(&outbound::history(
            &room,
            &h.epoch,
            Some(h.offset),
            &h.messages,
            h.recovered,
        )),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_durable",
            &format!("room {room:?} keeps no history: no [[rooms]] class with history_size > 0 matches it"),
        ),
        Err(e) => unavailable(&e.to_string()),
    }
}

/// `GET /api/presence` (who is online, as `online_users`) and `GET /api/presence/{userId}`.
async fn presence(node: &Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    if let Some(refused) = refusal(node, &req) {
        return refused;
    }
    let presence_unavailable =
        |why: &str| error(StatusCode::SERVICE_UNAVAILABLE, "presence_unavailable", why);
    match req.uri().path().strip_prefix("/api/presence/") {
        Some(encoded) => {
            let Ok(user) = percent_encoding::percent_decode_str(encoded).decode_utf8() else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_field",
                    "userId is not UTF-8 once percent-decoded",
                );
            };
            match node.presence_of(&user).await {
                Ok(Some(p)) => json_response(StatusCode::OK, &p),
                Ok(None) => error(
                    StatusCode::NOT_FOUND,
                    "user_offline",
                    &format!("user {user:?} has no socket on any node"),
                ),
                Err(e) => presence_unavailable(&e.to_string()),
            }
        }
        None => match node.online_users().await {
            // The frame a socket gets, `"type":"online_users"` included.
            Ok(listing) => frame_response(&listing),
            Err(e) => presence_unavailable(&e.to_string()),
        },
    }
}

fn unavailable(why: &str) -> Response<Body> {
    error(StatusCode::SERVICE_UNAVAILABLE, "history_unavailable", why)
}

async fn publish(node: &Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    if let Some(refused) = refusal(node, &req) {
        return refused;
    }
    let limit = node.config().limits.max_frame_bytes;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            &format!("body larger than limits.max_frame_bytes ({limit} bytes)"),
        )
    };
    // A declared length over the limit is refused before a byte of the body is read.
    if req.body().size_hint().lower() > limit as u64 {
        return too_large();
    }
    let timeout = Duration::from_millis(node.config().server.body_timeout_ms);
    let collected = tokio::time::timeout(timeout, Limited::new(req.into_body(), limit).collect());
    let body = match collected.await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(e)) if e.is::<LengthLimitError>() => return too_large(),
        Ok(Err(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("cannot read the body: {e}"),
            )
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                &format!(
                    "the body did not arrive within server.body_timeout_ms ({} ms)",
                    timeout.as_millis()
                ),
            )
        }
    };
    let max_depth = node.config().limits.max_json_depth;
    let published = match parse_publish_request(&body) {
        Ok(PublishRequest::Room {
            room,
            content,
            remove,
        }) => {
            if let Err(e) = check_content(content, "content", max_depth) {
                return error(StatusCode::BAD_REQUEST, e.code.as_str(), &e.message);
            }
            if node.keeps_board(&room) {
                return state::publish(node, &room, content, remove).await;
            }
            return match node.publish_to(&room, content, remove, Source::Api, || None) {
                Ok(fan) => json_response(
                    StatusCode::OK,
                    &json!({ "ok": true, "delivered": fan.queued }),
                ),
                Err(e) => publish_refused(&e),
            };
        }
        Ok(PublishRequest::Broadcast { payload }) => check_content(payload, "broadcast", max_depth)
            .map(|()| node.broadcast(payload, Source::Api)),
        Ok(PublishRequest::User { user, content }) => {
            if let Err(e) = check_content(content, "content", max_depth) {
                return error(StatusCode::BAD_REQUEST, e.code.as_str(), &e.message);
            }
            return match node.direct_message(None, &user, content).await {
                Ok(fan) => json_response(
                    StatusCode::OK,
                    &json!({ "ok": true, "delivered": fan.queued }),
                ),
                Err(e) if e.code == crate::protocol::ErrorCode::UserOffline => {
                    error(StatusCode::NOT_FOUND, e.code.as_str(), &e.message)
                }
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.code.as_str(), &e.message),
            };
        }
        Err(e) => Err(e),
    };
    let published = match published {
        Ok(published) => published,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.code.as_str(), &e.message),
    };
    match published {
        Ok(fan) => json_response(
            StatusCode::OK,
            &json!({ "ok": true, "delivered": fan.queued }),
        ),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            &e.to_string(),
        ),
    }
}

/// A publish the node refused: the client's mistake (400), or the node cannot take it now
/// (503, `overloaded`).
fn publish_refused(e: &ProtocolError) -> Response<Body> {
    let status = match e.code {
        ErrorCode::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::StateFull => StatusCode::CONFLICT,
        _ => StatusCode::BAD_REQUEST,
    };
    error(status, e.code.as_str(), &e.message)
}

/// Every live node's report (`{"nodes":[...]}`), or 503 when Redis cannot be read.
async fn node_reports(node: &Node, reports: &NodeReports) -> Response<Body> {
    match reports.nodes(&**node.broker()).await {
        Ok(nodes) => json_response(StatusCode::OK, &json!({ "nodes": nodes })),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "redis_unavailable",
            &format!("cannot read the node reports from Redis: {e}"),
        ),
    }
}

/// 200 while the broker is connected, 503 while it is not, so a load balancer can drain
/// a node that cannot reach the other nodes; 503 too while the node itself drains.
fn ready(node: &Arc<Node>) -> Response<Body> {
    let health = node.health();
    let draining = node.is_draining();
    let status = if node.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(
        status,
        &json!({ "ready": status == StatusCode::OK, "draining": draining, "broker": health.broker, "broker_state": health.broker_state }),
    )
}

/// Compares secrets in time that depends neither on where they first differ nor on
/// their lengths: their SHA-256 digests (always 32 bytes) are compared, every byte.
pub(crate) fn same_secret(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

pub fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(status, &json!({ "error": code, "message": message }))
}

pub fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap_or_default()
}
