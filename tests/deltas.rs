//! Fossil deltas of state rooms: made once per room and shared, applied by the client
//! to what it last received of the key; full where the client has no base (a late
//! joiner, a conflated outbox); plain subscribers of the same room unaffected.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::boards::api_state;
use common::*;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use volley::config::RoomClass;
use volley::Config;

fn deltas(window_ms: u64, conflate: bool) -> impl Fn(&mut Config) + Clone {
    move |c: &mut Config| {
        c.limits.publish_rate = 0;
        c.rooms = vec![RoomClass {
            pattern: "quotes*".into(),
            state_key: Some("symbol".into()),
            delta: Some("fossil".into()),
            delivery_window_ms: Some(window_ms),
            conflate: conflate.then(|| "symbol".into()),
            ..Default::default()
        }];
    }
}

/// One message of a board frame, its content kept as the raw JSON the node sent (a
/// delta applies to those bytes, not to a re-encoding).
#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "type", default)]
    ty: String,
    messages: Option<Vec<Box<RawValue>>>,
    key: Option<Box<RawValue>>,
    content: Option<Box<RawValue>>,
    delta: Option<String>,
    removed: Option<bool>,
    offset: Option<u64>,
    entries: Option<Vec<Box<RawValue>>>,
}

/// A delta subscriber's board: per key the content's raw JSON, rebuilt from full
/// messages and deltas; counts what came how.
#[derive(Default, Debug)]
struct DeltaBoard {
    offset: u64,
    entries: BTreeMap<String, String>,
    fulls: usize,
    deltas: usize,
    delta_bytes: usize,
    frames: Vec<String>,
    /// Keys that came in full since the last snapshot.
    fresh: std::collections::HashSet<String>,
    /// Deltas for a key that had not come in full since the snapshot: a client keeping
    /// only messages' bytes as bases (not the snapshot's) could not apply them.
    deltas_before_full: usize,
}

impl DeltaBoard {
    /// Takes one text frame (a batch, a message, a snapshot); notices are skipped.
    fn take(&mut self, text: &str) {
        let frame: Raw = serde_json::from_str(text).expect("a JSON frame");
        if matches!(frame.ty.as_str(), "batch" | "message") {
            self.frames.push(text.to_string());
        }
        match frame.ty.as_str() {
            "batch" => {
                for m in frame.messages.expect("messages") {
                    let item: Raw = serde_json::from_str(m.get()).expect("a message");
                    match item.ty.as_str() {
                        "message" => self.take_message(item, m.get()),
                        // A room's window may carry its notices too.
                        _ => self.take(m.get()),
                    }
                }
            }
            "message" => self.take_message(frame, text),
            "snapshot" => {
                self.fresh.clear();
                self.offset = frame.offset.expect("an offset");
                for entry in frame.entries.expect("entries") {
                    let e: Raw = serde_json::from_str(entry.get()).unwrap();
                    let (key, content) = (e.key.unwrap(), e.content.unwrap());
                    self.entries
                        .insert(key.get().to_string(), content.get().to_string());
                }
            }
            "user_joined" | "user_left" => {}
            // A board starts again in a new epoch (here: the first one after "").
            "epoch_changed" => {
                self.entries.clear();
                self.offset = 0;
            }
            other => panic!("unexpected {other}: {text}"),
        }
    }

    fn take_message(&mut self, m: Raw, text: &str) {
        assert_eq!(m.ty, "message", "{text}");
        let offset = m.offset.expect("an offset");
        assert_eq!(
            offset,
            self.offset + 1,
            "a gap or a duplicate before {text}"
        );
        self.offset = offset;
        let key = m.key.expect("a key").get().to_string();
        if m.removed == Some(true) {
            self.entries.remove(&key);
        } else if let Some(delta) = m.delta {
            if !self.fresh.contains(&key) {
                self.deltas_before_full += 1;
            }
            let base = self
                .entries
                .get(&key)
                .unwrap_or_else(|| panic!("a delta for {key} without its base: {text}"));
            let applied = fossil_delta::apply(base.as_bytes(), delta.as_bytes())
                .unwrap_or_else(|e| panic!("the delta does not apply to its base ({e:?}): {text}"));
            self.entries
                .insert(key, String::from_utf8(applied).expect("UTF-8 content"));
            self.deltas += 1;
            self.delta_bytes += text.len();
        } else {
            let content = m.content.expect("a content");
            self.fresh.insert(key.clone());
            self.entries.insert(key, content.get().to_string());
            self.fulls += 1;
        }
    }

    /// The board as values, for comparing with the node's.
    fn values(&self) -> BTreeMap<String, Value> {
        self.entries
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::from_str(v).unwrap()))
            .collect()
    }
}

/// The node's board as values.
async fn node_board(addr: std::net::SocketAddr, room: &str) -> (u64, BTreeMap<String, Value>) {
    let (status, snapshot) = api_state(addr, room).await;
    assert_eq!(status, 200, "{snapshot}");
    let entries = snapshot["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["key"].to_string(), e["content"].clone()))
        .collect();
    (snapshot["offset"].as_u64().unwrap(), entries)
}

/// The node's board once it reached `offset` (the feed's publishes all taken).
async fn node_board_at(
    addr: std::net::SocketAddr,
    room: &str,
    offset: u64,
) -> BTreeMap<String, Value> {
    tokio::time::timeout(WAIT, async {
        loop {
            let (last, truth) = node_board(addr, room).await;
            if last == offset {
                return truth;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the feed never reached the board")
}

/// A quote of about 150 bytes in which one or two fields change per update.
fn quote(room: &str, symbol: usize, n: u64) -> Value {
    json!({"type":"message","roomId":room,"content":{
        "symbol":format!("SYM{symbol:03}"),"bid":100.0 + (n % 7) as f64 * 0.25,
        "ask":100.5 + (n % 5) as f64 * 0.25,"last":100.25,"volume":1_000_000 + n * 13,
        "time":"2026-12-05T12:00:00.000Z","exchange":"XNAS"}})
}

/// Reads `client` until its board reaches `offset`.
async fn read_until(client: &mut Client, board: &mut DeltaBoard, offset: u64) {
    while board.offset < offset {
        let text = client.next_frame().await;
        board.take(&text);
    }
}

#[tokio::test]
async fn delta_subscribers_rebuild_every_update_from_deltas_made_once_per_room() {
    let bus = volley::broker::MemoryBus::new();
    let a = start_with_broker(deltas(50, false), Arc::new(bus.broker())).await;
    let b = start_with_broker(deltas(50, false), Arc::new(bus.broker())).await;
    let room = "quotes";
    let mut subscribers = Vec::new();
    for (node, delta) in [(&a, true), (&a, true), (&b, true), (&a, false)] {
        let mut c = Client::connect(node.local_addr()).await;
        let mut join = json!({"type":"join","roomId":room});
        if delta {
            join["delta"] = json!("fossil");
        }
        c.send(join).await;
        c.expect_type("user_joined").await;
        subscribers.push((c, DeltaBoard::default()));
    }
    let mut publisher = Client::connect(a.local_addr()).await;
    let updates: Vec<Value> = (0..400u64)
        .map(|n| quote(room, (n % 20) as usize, n))
        .collect();
    for chunk in updates.chunks(20) {
        publisher.send_burst(chunk).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (client, board) in &mut subscribers {
        read_until(client, board, 400).await;
    }
    let (offset, node) = node_board(b.local_addr(), room).await;
    assert_eq!(offset, 400);
    for (i, (_, board)) in subscribers.iter().enumerate() {
        assert_eq!(board.values(), node, "subscriber {i}'s board");
    }
    let plain = &subscribers[3].1;
    assert_eq!(
        (plain.deltas, plain.fulls),
        (0, 400),
        "a plain subscriber gets plain messages"
    );
    let (one, two, other_node) = (&subscribers[0].1, &subscribers[1].1, &subscribers[2].1);
    // Each key's first update has no base: 20 in full, the rest as deltas.
    assert_eq!((one.fulls, one.deltas), (20, 380), "{one:?}");
    assert_eq!((other_node.fulls, other_node.deltas), (20, 380));
    assert!(
        one.frames == two.frames,
        "delta subscribers of a node share the same frames"
    );
    let plain_bytes: usize = plain.frames.iter().map(String::len).sum();
    let delta_bytes: usize = one.frames.iter().map(String::len).sum();
    assert!(
        delta_bytes * 2 < plain_bytes,
        "deltas {delta_bytes} B, plain {plain_bytes} B"
    );
}

#[tokio::test]
async fn a_late_delta_joiner_gets_the_board_then_each_key_in_full_first() {
    let node = start(deltas(0, false)).await;
    let room = "quotes-late";
    let mut early = Client::connect(node.local_addr()).await;
    early
        .send(json!({"type":"join","roomId":room,"state":true,"delta":"fossil"}))
        .await;
    let mut board = DeltaBoard::default();
    read_until(&mut early, &mut board, 0).await;
    let mut publisher = Client::connect(node.local_addr()).await;
    let warm: Vec<Value> = (0..30u64)
        .map(|n| quote(room, (n % 3) as usize, n))
        .collect();
    publisher.send_burst(&warm).await;
    read_until(&mut early, &mut board, 30).await;
    let mut late = Client::connect(node.local_addr()).await;
    late.send(json!({"type":"join","roomId":room,"state":true,"delta":"fossil"}))
        .await;
    let mut late_board = DeltaBoard::default();
    read_until(&mut late, &mut late_board, 30).await;
    assert_eq!(late_board.entries.len(), 3, "the snapshot's board");
    let more: Vec<Value> = (30..60u64)
        .map(|n| quote(room, (n % 3) as usize, n))
        .collect();
    publisher.send_burst(&more).await;
    read_until(&mut early, &mut board, 60).await;
    read_until(&mut late, &mut late_board, 60).await;
    assert_eq!(
        (late_board.fulls, late_board.deltas),
        (3, 27),
        "one full per key first"
    );
    assert_eq!(late_board.deltas_before_full, 0);
    assert_eq!(
        (board.fulls, board.deltas),
        (3, 57),
        "the early joiner kept every base"
    );
    let (_, truth) = node_board(node.local_addr(), room).await;
    assert_eq!(late_board.values(), truth);
    assert_eq!(board.values(), truth);
}

#[tokio::test]
async fn delta_chains_hold_through_outbox_conflation_of_a_slow_reader() {
    let node = start(|c| {
        deltas(0, true)(c);
        c.limits.max_frame_bytes = 16 * 1024;
    })
    .await;
    let addr = node.local_addr();
    let room = "quotes-slow";
    // A reader with a tiny receive buffer that stops reading: once the socket buffers
    // are full its outbox holds one message per key, the latest, and a delta whose
    // predecessor gave way must go in full.
    let mut slow = RawWs::connect_with(addr, Some(4096)).await;
    let join = json!({"type":"join","roomId":room,"delta":"fossil"}).to_string();
    slow.send(&RawWs::frame(0x1, join.as_bytes(), true)).await;
    let (_, joined) = slow.read_frame().await.expect("the join's answer");
    assert!(String::from_utf8_lossy(&joined).contains("user_joined"));
    let mut publisher = Client::connect(addr).await;
    // Each update keeps 2 000 bytes and changes 400: its delta is a fifth of it.
    let fixed = "f".repeat(2000);
    let mut seed = 7u64;
    let total = 6000u64;
    for chunk in (0..total).collect::<Vec<_>>().chunks(200) {
        let frames: Vec<Value> = chunk
            .iter()
            .map(|n| {
                let changed: String = (0..400)
                    .map(|_| {
                        seed = seed
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        char::from(b'a' + (seed >> 59) as u8)
                    })
                    .collect();
                json!({"type":"message","roomId":room,"content":{
                    "symbol":format!("S{}", n % 20),"fixed":fixed,"changed":changed}})
            })
            .collect();
        publisher.send_burst(&frames).await;
    }
    let truth = node_board_at(addr, room, total).await;
    let conflated = metric(addr, "volley_conflated_total").await;
    assert!(
        conflated > 100,
        "the outbox must have conflated: {conflated}"
    );
    // Now read: offsets skip what was conflated away; every delta still applies.
    let mut board = DeltaBoard::default();
    while board.offset < total {
        let (opcode, payload) = slow.read_frame().await.expect("a frame");
        assert_eq!(opcode, 0x1, "closed: {}", String::from_utf8_lossy(&payload));
        board.take_conflated(std::str::from_utf8(&payload).unwrap());
    }
    assert!(
        board.deltas > 0 && board.fulls > 20,
        "{} deltas, {} full",
        board.deltas,
        board.fulls
    );
    assert_eq!(board.values(), truth);
}

impl DeltaBoard {
    /// As `take`, for a conflated room: offsets may skip (superseded messages of a key
    /// were dropped), never go back.
    fn take_conflated(&mut self, text: &str) {
        let frame: Raw = serde_json::from_str(text).expect("a JSON frame");
        let messages: Vec<String> = match frame.ty.as_str() {
            "batch" => frame
                .messages
                .unwrap()
                .iter()
                .map(|m| m.get().to_string())
                .collect(),
            "message" => vec![text.to_string()],
            _ => return,
        };
        for m in messages {
            let raw: Raw = serde_json::from_str(&m).unwrap();
            let offset = raw.offset.unwrap();
            assert!(offset > self.offset, "offsets go forward: {m}");
            self.offset = offset - 1;
            self.take_message(raw, &m);
        }
    }
}

#[tokio::test]
async fn deltas_are_asked_for_where_offered_and_named_exactly() {
    let node = start(|c| {
        deltas(0, false)(c);
        c.rooms.push(RoomClass {
            pattern: "plain-board".into(),
            state_key: Some("symbol".into()),
            ..Default::default()
        });
    })
    .await;
    let mut c = Client::connect(node.local_addr()).await;
    c.send(json!({"type":"join","roomId":"quotes","delta":"gzip"}))
        .await;
    c.expect_error("invalid_field").await;
    c.send(json!({"type":"join","roomId":"plain-board","delta":"fossil"}))
        .await;
    let e = c.expect_error("invalid_field").await;
    assert!(
        e["message"].as_str().unwrap().contains("offers no deltas"),
        "{e}"
    );
    c.send(json!({"type":"join","roomId":"quotes","delta":"fossil"}))
        .await;
    c.expect_type("user_joined").await;
}

#[tokio::test]
async fn deltas_after_window_conflation_apply_to_what_was_delivered() {
    // Five hot symbols in a 50 ms conflated window: most quotes are superseded in the
    // window, and each delta is against the key's last delivered quote, not its last
    // published one.
    let node = start(deltas(50, true)).await;
    let addr = node.local_addr();
    let room = "quotes-hot";
    let mut watchers = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect(addr).await;
        c.send(json!({"type":"join","roomId":room,"delta":"fossil"}))
            .await;
        c.expect_type("user_joined").await;
        watchers.push((c, DeltaBoard::default()));
    }
    let mut publisher = Client::connect(addr).await;
    let total = 1000u64;
    let updates: Vec<Value> = (0..total)
        .map(|n| quote(room, (n % 5) as usize, n))
        .collect();
    for chunk in updates.chunks(50) {
        publisher.send_burst(chunk).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let truth = node_board_at(addr, room, total).await;
    assert!(metric(addr, "volley_conflated_total").await > 100);
    for (client, board) in &mut watchers {
        while board.offset < total {
            let text = client.next_frame().await;
            board.take_conflated(&text);
        }
        assert!(board.deltas > 0, "{board:?}");
        assert_eq!(board.values(), truth);
    }
}

#[tokio::test]
async fn a_joiner_whose_snapshot_covered_the_open_window_gets_each_key_in_full_first() {
    // A long window: a message waits in it while a joiner's snapshot (which has it
    // already) is read and its replay ends. The tick then makes that message the key's
    // base; the joiner never got it as a message, so the key's next one must come to it
    // in full (a client that keeps only messages' bytes as bases needs that).
    let node = start(deltas(1000, false)).await;
    let addr = node.local_addr();
    let room = "quotes-window";
    let mut early = Client::connect(addr).await;
    early
        .send(json!({"type":"join","roomId":room,"state":true,"delta":"fossil"}))
        .await;
    let mut board = DeltaBoard::default();
    read_until(&mut early, &mut board, 0).await;
    let mut publisher = Client::connect(addr).await;
    publisher.send(quote(room, 0, 1)).await;
    read_until(&mut early, &mut board, 1).await;
    publisher.send(quote(room, 0, 2)).await;
    // On the board (so in the joiner's snapshot), still in the window.
    node_board_at(addr, room, 2).await;
    let mut late = Client::connect(addr).await;
    late.send(json!({"type":"join","roomId":room,"state":true,"delta":"fossil"}))
        .await;
    let mut late_board = DeltaBoard::default();
    read_until(&mut late, &mut late_board, 2).await;
    read_until(&mut early, &mut board, 2).await;
    publisher.send(quote(room, 0, 3)).await;
    read_until(&mut late, &mut late_board, 3).await;
    assert_eq!(
        (late_board.fulls, late_board.deltas_before_full),
        (1, 0),
        "the key in full first: {:?}",
        late_board.frames
    );
    read_until(&mut early, &mut board, 3).await;
    assert_eq!(board.deltas, 2, "the early subscriber keeps its deltas");
}
