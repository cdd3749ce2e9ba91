//! A state room's board as a client keeps it: a snapshot, then messages and removals
//! applied in offset order. Tests compare it with the node's own snapshot.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde_json::{json, Value};

use super::{http, Client};

/// A client's copy of one board.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Board {
    pub epoch: String,
    /// The offset of the last message applied.
    pub offset: u64,
    /// Key (as JSON text) -> (content, offset).
    pub entries: BTreeMap<String, (Value, u64)>,
}

impl Board {
    /// A board from a `snapshot` frame (or `GET /api/state` body).
    pub fn from_snapshot(snapshot: &Value) -> Board {
        assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
        let mut board = Board {
            epoch: snapshot["epoch"].as_str().expect("an epoch").to_string(),
            offset: snapshot["offset"].as_u64().expect("an offset"),
            entries: BTreeMap::new(),
        };
        for entry in snapshot["entries"].as_array().expect("entries") {
            let offset = entry["offset"].as_u64().expect("an entry offset");
            assert!(
                offset <= board.offset,
                "an entry from after the snapshot: {entry}"
            );
            let key = entry["key"].to_string();
            let fresh = board
                .entries
                .insert(key, (entry["content"].clone(), offset));
            assert!(fresh.is_none(), "a key twice in one snapshot: {entry}");
        }
        board
    }

    /// Applies one room message: the next offset, exactly.
    pub fn apply(&mut self, m: &Value) {
        assert_eq!(m["type"], "message", "{m}");
        let offset = m["offset"].as_u64().expect("an offset");
        assert_eq!(offset, self.offset + 1, "a gap or a duplicate before {m}");
        self.offset = offset;
        let key = m["key"].to_string();
        if m["removed"] == true {
            assert!(m.get("content").is_none(), "a removal has no content: {m}");
            self.entries.remove(&key);
        } else {
            self.entries.insert(key, (m["content"].clone(), offset));
        }
    }

    /// Applies what a `since` join answered: a `history` frame (recovered: the messages
    /// after the position) or a fresh `snapshot`.
    pub fn resume(&mut self, answer: &Value) {
        match answer["type"].as_str() {
            Some("history") => {
                assert_eq!(answer["recovered"], true, "{answer}");
                for m in answer["messages"].as_array().expect("messages") {
                    self.apply(m);
                }
            }
            Some("snapshot") => *self = Board::from_snapshot(answer),
            _ => panic!("a board join answered {answer}"),
        }
    }

    /// The entries as `{key: content}` (keys as JSON text), for comparing boards.
    pub fn contents(&self) -> BTreeMap<String, Value> {
        self.entries
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect()
    }
}

/// Joins `room` with `"state":true` (and `since`, when given); returns the first answer
/// (`snapshot`, or `history` for a recovered `since`).
pub async fn join_board(client: &mut Client, room: &str, since: Option<(u64, &str)>) -> Value {
    let mut join = json!({"type":"join","roomId":room,"state":true});
    if let Some((offset, epoch)) = since {
        join["since"] = json!({"offset":offset,"epoch":epoch});
    }
    client.send(join).await;
    loop {
        let m = client.next_message().await;
        match m["type"].as_str() {
            Some("snapshot") | Some("history") => return m,
            Some("user_joined") | Some("user_left") => continue,
            _ => panic!("a board join answered {m}"),
        }
    }
}

/// The next message of a board (skipping notices), applied to `board`; returns it.
pub async fn next_board_message(client: &mut Client, board: &mut Board) -> Value {
    loop {
        let m = client.next_message().await;
        match m["type"].as_str() {
            Some("user_joined") | Some("user_left") => continue,
            Some("epoch_changed") => {
                // The board was lost with the history (Redis restarted empty): the new
                // epoch's board is what its messages, from offset 1, leave.
                *board = Board {
                    epoch: m["epoch"].as_str().expect("an epoch").to_string(),
                    ..Board::default()
                };
            }
            Some("message") => {
                board.apply(&m);
                return m;
            }
            _ => panic!("unexpected {m}"),
        }
    }
}

/// `GET /api/state/{room}` with the test key: status and body.
pub async fn api_state(addr: SocketAddr, room: &str) -> (u16, Value) {
    let (status, body) = http(
        addr,
        "GET",
        &format!("/api/state/{room}"),
        &[("Authorization", "apikey test-key")],
        b"",
    )
    .await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}
