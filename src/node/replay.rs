//! Joins with history: a durable room's replay, read on a task of its own and ended in
//! the hub with no gap and no duplicate; the HTTP API's history reads.

use std::sync::Arc;

use super::state::not_a_board;
use super::{Node, READ_WAIT};
use crate::broker::{History, HistoryError};
use crate::config::Durability;
use crate::outbox::Outbox;
use crate::protocol::inbound::Replay;
use crate::protocol::outbound::{self, Membership};
use crate::protocol::{board, Encoded, ErrorCode, ProtocolError};

impl Node {
    /// A durable room's history, for the HTTP API; `None` for a plain room.
    pub async fn history(
        &self,
        room: &str,
        replay: &Replay,
    ) -> Result<Option<History>, HistoryError> {
        let Some(durability) = self.classes.durability(room) else {
            return Ok(None);
        };
        let read = self.broker.history(room, replay, durability);
        match tokio::time::timeout(READ_WAIT, read).await {
            Ok(history) => history.map(Some),
            Err(_) => Err(HistoryError::Unavailable("timed out reading it".into())),
        }
    }

    /// Puts a socket in a room with a replay of its history: the `history` frame (or an
    /// `error` if the history cannot be read), then every later message, none twice and
    /// none missed, then live. A plain room has no history: its frame is empty, and a
    /// `since` join learns `"recovered":false`.
    ///
    /// The socket is in the room at once (what the room sends is held for it); the
    /// history is read on a task of its own, so a join waiting for a slow or absent Redis
    /// never holds up the socket's other frames.
    pub fn join_replaying(
        self: &Arc<Self>,
        outbox: &Arc<Outbox>,
        room: &str,
        replay: Replay,
        delta: bool,
    ) {
        let Some(ticket) = self
            .hub
            .join_replaying(room, outbox, delta, |name| self.room_held(name))
        else {
            return;
        };
        self.stats.joined();
        let (node, outbox, room) = (self.clone(), outbox.clone(), Arc::<str>::from(room));
        tokio::spawn(async move { node.replay(&outbox, &room, ticket, &replay).await });
    }

    /// Reads a replaying join's history and ends the replay (see `join_replaying`).
    async fn replay(
        self: &Arc<Self>,
        outbox: &Arc<Outbox>,
        room: &str,
        ticket: u64,
        replay: &Replay,
    ) {
        let since = replay.since();
        let (first, after, epoch) = match self.classes.durability(room) {
            _ if replay.wants_board() && !self.keeps_board(room) => {
                (outbound::error(&not_a_board(room, "state")), 0, None)
            }
            None => (
                outbound::history(room, "", None, &[], since.map(|_| false)),
                0,
                None,
            ),
            // Joiners of a board share its snapshot reads (see `state.rs`).
            Some(durability) if *replay == Replay::Snapshot => {
                self.shared_snapshot(room, durability).await
            }
            Some(durability) => self.read_replay(room, replay, durability).await,
        };
        // A socket that left (or closed) meanwhile is not told anything.
        let Some(fan) = self
            .hub
            .finish_replay(room, ticket, &first, after, epoch.as_ref())
        else {
            return;
        };
        self.log_slow_consumers(fan);
        if self.classes.durability(room).is_some() {
            // The engine's history read waited for the room's subscription already (and
            // gave up on it when Redis was away): no second wait.
            self.notify_room(room, Membership::Joined, self.hub.members(room));
        } else {
            self.answer_join(outbox, room);
        }
    }
}

/// What a replaying join gets first (the history frame, or a state room's snapshot), the
/// offset after which live messages follow it, and the room's epoch (`None` when the
/// history could not be read).
pub(super) type Replayed = (Encoded, u64, Option<Arc<str>>);

impl Node {
    /// Reads a durable room's history as `replay` asks, within `READ_WAIT`.
    pub(super) async fn read_replay(
        &self,
        room: &str,
        replay: &Replay,
        durability: Durability,
    ) -> Replayed {
        let read = self.broker.history(room, replay, durability);
        match tokio::time::timeout(READ_WAIT, read).await {
            Ok(Ok(history)) => self.replay_frame(room, replay.since(), history),
            Ok(Err(e)) => (history_unavailable(room, &e.to_string()), 0, None),
            Err(_) => (history_unavailable(room, "timed out reading it"), 0, None),
        }
    }

    /// What a replaying join gets first, from the history read for it.
    fn replay_frame(&self, room: &str, since: Option<u64>, history: History) -> Replayed {
        if let Some(snapshot) = &history.board {
            let frame = board::snapshot(
                room,
                &history.epoch,
                snapshot.offset,
                &snapshot.entries,
                history.recovered,
            );
            let bound = self.config.limits.max_outbox_bytes;
            if frame.wire_len() > bound {
                let why = format!(
                    "the board is {} bytes, more than limits.max_outbox_bytes ({bound}): raise it, or lower the class's state_max_keys",
                    frame.wire_len()
                );
                return (history_unavailable(room, &why), 0, None);
            }
            return (frame, snapshot.offset, Some(history.epoch));
        }
        let newest = history
            .messages
            .last()
            .and_then(|m| outbound::offset_of(m.json()));
        let after = match (newest, history.recovered, since) {
            (Some(offset), _, _) => offset,
            (None, Some(true), Some(offset)) => offset,
            _ => 0,
        }
        .max(history.offset);
        let frame = outbound::history(
            room,
            &history.epoch,
            Some(after),
            &history.messages,
            history.recovered,
        );
        (frame, after, Some(history.epoch))
    }
}

pub(super) fn history_unavailable(room: &str, why: &str) -> Encoded {
    outbound::error(&ProtocolError::new(
        ErrorCode::HistoryUnavailable,
        format!("the history of room {room:?} could not be read ({why}); live messages follow"),
    ))
}
