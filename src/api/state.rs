//! State rooms over HTTP: `GET /api/state/{roomId}` (the board, as the `snapshot` frame a
//! `state:true` join gets) and `POST /api/publish` to a state room, answered once the
//! engine has given the message its offset or refused it.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use parking_lot::Mutex;
use serde_json::json;
use serde_json::value::RawValue;

use super::{
    bad_request, error, frame_response, json_response, publish_refused, refusal, room_in_path, Body,
};
use crate::broker::Outcome;
use crate::metrics::Source;
use crate::node::Node;
use crate::protocol::board;
use crate::protocol::inbound::Replay;
use crate::protocol::{ErrorCode, ProtocolError};

/// How long a publish to a state room waits for the engine's answer before it is
/// answered `202 Accepted` (queued: Redis is slow or away; the message still goes out
/// when it is back).
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// `GET /api/state/{roomId}`: `{"type":"snapshot","roomId","epoch","offset","entries"}`.
pub(super) async fn snapshot(node: &Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    if let Some(refused) = refusal(node, &req) {
        return refused;
    }
    let room = match room_in_path(&req, "/api/state/") {
        Ok(room) => room,
        Err(e) => return bad_request(&e),
    };
    if !node.keeps_board(&room) {
        return error(
            StatusCode::NOT_FOUND,
            "not_a_board",
            &format!("room {room:?} keeps no board: no [[rooms]] class with state_key matches it"),
        );
    }
    match node.history(&room, &Replay::Snapshot).await {
        Ok(Some(history)) => {
            let snapshot = history.board.unwrap_or_default();
            frame_response(&board::snapshot(
                &room,
                &history.epoch,
                snapshot.offset,
                &snapshot.entries,
                None,
            ))
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_a_board",
            "the room keeps no board",
        ),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "state_unavailable",
            &e.to_string(),
        ),
    }
}

/// A publish to a state room: `200 {"ok":true,"offset":O}` once the engine appended it,
/// `409 state_full` when the board has no room for a new key, `202` when the engine has
/// not answered within `ANSWER_WAIT` (it is still queued), `503` when it never will.
pub(super) async fn publish(
    node: &Arc<Node>,
    room: &str,
    content: &RawValue,
    remove: bool,
) -> Response<Body> {
    let (tell, answer) = tokio::sync::oneshot::channel();
    let tell = Mutex::new(Some(tell));
    let outcome = Outcome::new(move |outcome| {
        if let Some(tell) = tell.lock().take() {
            let _ = tell.send(outcome);
        }
    });
    if let Err(e) = node.publish_to(room, content, remove, Source::Api, || outcome) {
        return publish_refused(&e);
    }
    match tokio::time::timeout(ANSWER_WAIT, answer).await {
        Ok(Ok(Ok(offset))) => json_response(StatusCode::OK, &json!({ "ok": true, "offset": offset })),
        Ok(Ok(Err(refused))) => {
            publish_refused(&ProtocolError::new(ErrorCode::StateFull, refused.to_string()))
        }
        Ok(Err(_)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unconfirmed",
            "the node lost its connection to Redis before Redis confirmed the message; it may or may not have been appended",
        ),
        Err(_) => json_response(
            StatusCode::ACCEPTED,
            &json!({ "ok": true, "queued": true, "message": "queued; Redis has not confirmed it yet" }),
        ),
    }
}
