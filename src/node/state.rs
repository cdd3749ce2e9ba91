//! The node's side of boards (state rooms): which rooms are boards, their entries' expiry,
//! and snapshot reads shared by the joiners that wait for one.
//!
//! A storm of joiners (a page reloaded by thousands, a node restarted) must not cost one
//! board read and one encoded snapshot per joiner. A joiner's snapshot may be any read that
//! started after it joined (what arrived since its join is held for it, and the hub drops
//! what the snapshot already has), so a room has at most one read running and one
//! gathering: every joiner that comes while a read runs waits for the next one, which
//! starts when the running one ends, and all of them get the same frame, encoded once.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::replay::{history_unavailable, Replayed};
use super::Node;
use crate::config::Durability;
use crate::protocol::inbound::Replay;
use crate::protocol::{ErrorCode, ProtocolError};

/// The refusal of a board's option (`remove`, `state`) in a room that keeps no board.
pub(super) fn not_a_board(room: &str, option: &str) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::InvalidField,
        format!("{option} is for state rooms: room {room:?} keeps no board (no [[rooms]] class with state_key matches it)"),
    )
}

/// Per board with a read running: the joiners waiting for the next read.
#[derive(Default)]
pub(super) struct SnapshotReads {
    rooms: Mutex<HashMap<Arc<str>, Vec<oneshot::Sender<Replayed>>>>,
}

impl Node {
    /// Whether `room` keeps a history (its class has a `history_size`, or is a board).
    pub fn is_durable(&self, room: &str) -> bool {
        self.classes.durability(room).is_some()
    }

    /// Whether `room` is a state room (its class has a `state_key`).
    pub fn keeps_board(&self, room: &str) -> bool {
        self.classes.state_key_of(room).is_some()
    }

    /// Whether `room`'s class offers Fossil deltas (`delta = "fossil"`).
    pub fn offers_delta(&self, room: &str) -> bool {
        self.classes.offers_delta(room)
    }

    /// Asks the engine to take expired entries off the boards of the state rooms with
    /// local members (see `boards`).
    pub(crate) fn expire_board_entries(&self) {
        for room in self.hub.room_names() {
            if let Some(durability) = self.classes.durability(&room) {
                if durability.board.is_some_and(|b| b.entry_ttl.is_some()) {
                    self.broker.expire_entries(&room, durability);
                }
            }
        }
    }

    /// A board's snapshot for a joiner: from the next read of the room, shared with every
    /// joiner waiting for it (see the module's docs).
    pub(super) async fn shared_snapshot(
        self: &Arc<Self>,
        room: &str,
        durability: Durability,
    ) -> Replayed {
        let (tell, answer) = oneshot::channel();
        let first = {
            let mut rooms = self.snapshots.rooms.lock();
            match rooms.get_mut(room) {
                Some(waiting) => {
                    waiting.push(tell);
                    None
                }
                None => {
                    rooms.insert(Arc::from(room), Vec::new());
                    Some(tell)
                }
            }
        };
        if let Some(tell) = first {
            // This joiner starts the room's reads; they go on without it if it leaves.
            let (node, room) = (self.clone(), Arc::<str>::from(room));
            tokio::spawn(async move { node.read_snapshots(room, durability, vec![tell]).await });
        }
        answer.await.unwrap_or_else(|_| {
            (
                history_unavailable(room, "the snapshot read ended without an answer"),
                0,
                None,
            )
        })
    }

    /// Reads the room's board for `waiting`, then for whoever came meanwhile, until
    /// nobody waits.
    async fn read_snapshots(
        &self,
        room: Arc<str>,
        durability: Durability,
        mut waiting: Vec<oneshot::Sender<Replayed>>,
    ) {
        loop {
            let replayed = self.read_replay(&room, &Replay::Snapshot, durability).await;
            for tell in waiting.drain(..) {
                let _ = tell.send(replayed.clone());
            }
            let mut rooms = self.snapshots.rooms.lock();
            match rooms.get_mut(&room) {
                Some(next) if !next.is_empty() => waiting = std::mem::take(next),
                _ => {
                    rooms.remove(&room);
                    return;
                }
            }
        }
    }
}
