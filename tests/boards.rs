//! State rooms (boards) beyond the contract every engine keeps (`tests/engines.rs`):
//! three nodes publishing into one board, a Redis restart, `since` under publishing, the
//! TTL, a 10 000-entry board on the default limits, and what a careless publisher or
//! joiner gets told.

mod common;

use std::time::Duration;

use common::boards::{api_state, join_board, next_board_message, Board};
use common::*;
use serde_json::{json, Value};
use volley::config::RoomClass;
use volley::Config;

fn boards(ttl_s: u64) -> impl Fn(&mut Config) + Clone {
    move |c: &mut Config| {
        c.limits.publish_rate = 0;
        c.rooms = vec![RoomClass {
            pattern: "quotes*".into(),
            state_key: Some("symbol".into()),
            state_ttl_s: ttl_s,
            ..Default::default()
        }];
    }
}

fn set(room: &str, symbol: &str, last: u64) -> Value {
    json!({"type":"message","roomId":room,"content":{"symbol":symbol,"last":last}})
}

fn remove(room: &str, symbol: &str) -> Value {
    json!({"type":"message","roomId":room,"content":{"symbol":symbol},"remove":true})
}

/// Reads `client`'s board messages until its board reaches `offset`.
async fn until_offset(client: &mut Client, board: &mut Board, offset: u64) {
    while board.offset < offset {
        next_board_message(client, board).await;
    }
}

#[tokio::test]
async fn three_nodes_publishing_into_one_board_keep_one_state() {
    let redis = RedisServer::start().await;
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        nodes.push(start_on_redis(&redis, id, boards(0)).await);
    }
    let room = "quotes-three";
    let mut watchers = Vec::new();
    for node in &nodes {
        let mut c = Client::connect(node.local_addr()).await;
        let board = Board::from_snapshot(&join_board(&mut c, room, None).await);
        watchers.push((c, board));
    }
    // Each node's publisher: 60 updates over 20 symbols, then one removal of its own.
    let mut feeds = Vec::new();
    for (p, node) in nodes.iter().enumerate() {
        let addr = node.local_addr();
        feeds.push(tokio::spawn(async move {
            let mut publisher = Client::connect(addr).await;
            let mut frames: Vec<Value> = (0..60)
                .map(|i| set(room, &format!("S{}", i % 20), (p * 1000 + i) as u64))
                .collect();
            frames.push(remove(room, &format!("S{p}")));
            for chunk in frames.chunks(10) {
                publisher.send_burst(chunk).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    for feed in feeds {
        feed.await.unwrap();
    }
    // 180 updates; each removal found its key (set by every publisher, removed once).
    let mut expected = None;
    for (client, board) in &mut watchers {
        until_offset(client, board, 183).await;
        assert!(board.entries.len() >= 17, "{board:?}");
        assert_eq!(*expected.get_or_insert_with(|| board.clone()), *board);
    }
    let board = expected.unwrap();
    for node in &nodes {
        let (status, api) = api_state(node.local_addr(), room).await;
        assert_eq!(status, 200);
        assert_eq!(Board::from_snapshot(&api), board, "the API's board");
        let mut late = Client::connect(node.local_addr()).await;
        let snapshot = join_board(&mut late, room, None).await;
        assert_eq!(
            Board::from_snapshot(&snapshot),
            board,
            "a late joiner's board"
        );
    }
}

#[tokio::test]
async fn after_a_redis_restart_every_client_holds_the_new_board_and_no_stale_entry() {
    let mut redis = RedisServer::start().await;
    let a = start_on_redis(&redis, "a", boards(0)).await;
    let b = start_on_redis(&redis, "b", boards(0)).await;
    let room = "quotes-restart";
    let mut watcher = Client::connect(b.local_addr()).await;
    let mut board = Board::from_snapshot(&join_board(&mut watcher, room, None).await);
    let mut publisher = Client::connect(a.local_addr()).await;
    let before: Vec<Value> = ["A", "B", "C", "D", "E"]
        .iter()
        .map(|s| set(room, s, 1))
        .collect();
    publisher.send_burst(&before).await;
    until_offset(&mut watcher, &mut board, 5).await;
    let old = board.clone();
    redis.restart().await;
    for node in [&a, &b] {
        wait_status(node.local_addr(), "/readyz", 200).await;
    }
    for symbol in ["X", "Y", "A"] {
        let content = json!({"roomId":room,"content":{"symbol":symbol,"last":2}});
        let (status, answer) = api_publish(a.local_addr(), &content).await;
        assert_eq!(status, 200, "{answer}");
    }
    // Told of the new epoch, the watcher's board is what the new epoch's messages left.
    while board.epoch == old.epoch || board.offset < 3 {
        next_board_message(&mut watcher, &mut board).await;
    }
    assert_ne!(board.epoch, old.epoch);
    let keys: Vec<&str> = board.entries.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [r#""A""#, r#""X""#, r#""Y""#],
        "no entry of the lost board"
    );
    let (_, api) = api_state(b.local_addr(), room).await;
    assert_eq!(Board::from_snapshot(&api), board);
    // A client that was away comes back from the old epoch: a fresh, whole board.
    let mut back = Client::connect(a.local_addr()).await;
    let answer = join_board(&mut back, room, Some((old.offset, &old.epoch))).await;
    assert_eq!(answer["recovered"], false, "{answer}");
    assert_eq!(Board::from_snapshot(&answer), board);
}

/// A client leaves a board while a feed publishes and comes back from its position:
/// its board (changes or a fresh snapshot) ends equal to the node's, on any engine.
async fn since_under_publishing_converges(
    a: &volley::Server,
    b: &volley::Server,
    room: &'static str,
) {
    let feed_addr = a.local_addr();
    let feed = tokio::spawn(async move {
        let mut publisher = Client::connect(feed_addr).await;
        for i in 0..400u64 {
            let frame = if i % 37 == 36 {
                remove(room, &format!("S{}", i % 50))
            } else {
                set(room, &format!("S{}", i % 50), i)
            };
            publisher.send(frame).await;
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        publisher.send(set(room, "end", 0)).await;
    });
    let mut first = Client::connect(b.local_addr()).await;
    let mut board = Board::from_snapshot(&join_board(&mut first, room, None).await);
    for _ in 0..30 {
        next_board_message(&mut first, &mut board).await;
    }
    drop(first);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut back = Client::connect(b.local_addr()).await;
    let answer = join_board(&mut back, room, Some((board.offset, &board.epoch))).await;
    board.resume(&answer);
    while !board.entries.contains_key(r#""end""#) {
        next_board_message(&mut back, &mut board).await;
    }
    feed.await.unwrap();
    let (_, api) = api_state(a.local_addr(), room).await;
    assert_eq!(Board::from_snapshot(&api), board);
}

#[tokio::test]
async fn since_under_publishing_converges_on_the_embedded_engine() {
    let bus = volley::broker::MemoryBus::new();
    let a = start_with_broker(boards(0), std::sync::Arc::new(bus.broker())).await;
    let b = start_with_broker(boards(0), std::sync::Arc::new(bus.broker())).await;
    since_under_publishing_converges(&a, &b, "quotes-since").await;
}

#[tokio::test]
async fn since_under_publishing_converges_on_redis() {
    let redis = RedisServer::start().await;
    let a = start_on_redis(&redis, "a", boards(0)).await;
    let b = start_on_redis(&redis, "b", boards(0)).await;
    since_under_publishing_converges(&a, &b, "quotes-since").await;
}

/// Entries not updated for the TTL leave, each announced as a removal with its offset,
/// even when nobody publishes.
async fn entries_past_their_ttl_leave(a: &volley::Server, b: &volley::Server) {
    let room = "quotes-ttl";
    let mut watcher = Client::connect(b.local_addr()).await;
    let mut board = Board::from_snapshot(&join_board(&mut watcher, room, None).await);
    let mut publisher = Client::connect(a.local_addr()).await;
    publisher
        .send_burst(&[set(room, "OLD", 1), set(room, "KEPT", 1)])
        .await;
    until_offset(&mut watcher, &mut board, 2).await;
    // KEPT is refreshed twice a second; OLD is not.
    let refresh = tokio::spawn(async move {
        for n in 2..8 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            publisher.send(set(room, "KEPT", n)).await;
        }
        publisher
    });
    let removal = loop {
        let m = next_board_message(&mut watcher, &mut board).await;
        if m["removed"] == true {
            break m;
        }
    };
    assert_eq!(removal["key"], "OLD", "{removal}");
    let _publisher = refresh.await.unwrap();
    let (_, api) = api_state(a.local_addr(), room).await;
    let now = Board::from_snapshot(&api);
    let keys: Vec<&str> = now.entries.keys().map(String::as_str).collect();
    assert_eq!(keys, [r#""KEPT""#]);
}

#[tokio::test]
async fn entries_past_their_ttl_leave_on_the_embedded_engine() {
    let bus = volley::broker::MemoryBus::new();
    let a = start_with_broker(boards(1), std::sync::Arc::new(bus.broker())).await;
    let b = start_with_broker(boards(1), std::sync::Arc::new(bus.broker())).await;
    entries_past_their_ttl_leave(&a, &b).await;
}

#[tokio::test]
async fn entries_past_their_ttl_leave_on_redis() {
    let redis = RedisServer::start().await;
    let a = start_on_redis(&redis, "a", boards(1)).await;
    let b = start_on_redis(&redis, "b", boards(1)).await;
    entries_past_their_ttl_leave(&a, &b).await;
}

/// 10 000 quotes of about 150 bytes: one snapshot frame of about 1.9 MB, under the
/// default outbox bound (4 MiB); the frame limit is for what clients send.
async fn a_full_board_reaches_a_joiner(node: &volley::Server) {
    let room = "quotes-full";
    let mut publisher = Client::connect(node.local_addr()).await;
    for chunk in (0..10_000u64).collect::<Vec<_>>().chunks(500) {
        let frames: Vec<Value> = chunk
            .iter()
            .map(|i| {
                json!({"type":"message","roomId":room,"content":{
                    "symbol":format!("SYM{i:05}"),"bid":101.25,"ask":101.27,"last":101.26,
                    "volume":1_234_567 + i,"time":"2026-12-05T12:00:00.000Z","exchange":"XNAS"}})
            })
            .collect();
        publisher.send_burst(&frames).await;
    }
    // Every publish taken first (the API reads the same board), then one joiner.
    tokio::time::timeout(WAIT, async {
        while api_state(node.local_addr(), room).await.1["offset"] != 10_000 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the board never filled");
    let mut joiner = Client::connect(node.local_addr()).await;
    let snapshot = join_board(&mut joiner, room, None).await;
    assert_eq!(snapshot["offset"], 10_000);
    let entries = snapshot["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 10_000);
    let bytes = snapshot.to_string().len();
    assert!(
        (1_500_000..4 * 1024 * 1024).contains(&bytes),
        "{bytes} bytes"
    );
    // The one past the limit is refused.
    publisher.send(set(room, "ONE-MORE", 1)).await;
    publisher.expect_error("state_full").await;
}

#[tokio::test]
async fn a_ten_thousand_entry_board_reaches_a_joiner_on_the_default_limits() {
    // Only the publish rate is lifted, for the feed that fills the board.
    let node = start(boards(0)).await;
    a_full_board_reaches_a_joiner(&node).await;
    let redis = RedisServer::start().await;
    let on_redis = start_on_redis(&redis, "r", boards(0)).await;
    a_full_board_reaches_a_joiner(&on_redis).await;
}

#[tokio::test]
async fn careless_board_frames_are_told_what_is_wrong() {
    let node = start(boards(0)).await;
    let addr = node.local_addr();
    let mut c = Client::connect(addr).await;
    // A state room's message must name its entry, with a string or a number.
    c.send(json!({"type":"message","roomId":"quotes","content":{"bid":1}}))
        .await;
    let e = c.expect_error("missing_field").await;
    assert!(
        e["message"].as_str().unwrap().contains("content.symbol"),
        "{e}"
    );
    for content in [json!({"symbol":null}), json!({"symbol":[1]}), json!("ACME")] {
        c.send(json!({"type":"message","roomId":"quotes","content":content}))
            .await;
        c.expect_error("invalid_field").await;
    }
    c.send(json!({"type":"message","roomId":"quotes","content":{"symbol":"A"},"remove":"yes"}))
        .await;
    c.expect_error("invalid_field").await;
    // remove and state are for state rooms.
    c.send(json!({"type":"message","roomId":"lobby","content":{"symbol":"A"},"remove":true}))
        .await;
    let e = c.expect_error("invalid_field").await;
    assert!(
        e["message"].as_str().unwrap().contains("keeps no board"),
        "{e}"
    );
    c.send(json!({"type":"join","roomId":"lobby","state":true}))
        .await;
    c.expect_error("invalid_field").await;
    c.expect_type("user_joined").await;
    c.send(json!({"type":"join","roomId":"quotes","state":true,"history":5}))
        .await;
    c.expect_error("invalid_field").await;
    let (status, body) = api_state(addr, "lobby").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_a_board")));
    let (status, body) = api_publish(addr, &json!({"roomId":"quotes","content":{"nope":1}})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("missing_field"))
    );
    // The removal of an entry the board does not have changes nothing.
    let (status, body) = api_publish(
        addr,
        &json!({"roomId":"quotes","content":{"symbol":"GHOST"},"remove":true}),
    )
    .await;
    assert_eq!((status, body["offset"].as_u64()), (200, Some(0)), "{body}");
    // After all that, the socket still works and the board is empty.
    let snapshot = join_board(&mut c, "quotes", None).await;
    assert_eq!(
        (snapshot["offset"].as_u64(), snapshot["entries"].clone()),
        (Some(0), json!([]))
    );
}

/// Redis `EVAL` calls so far (the boards' scripts: appends and reads).
async fn evals(redis: &RedisServer) -> u64 {
    let mut conn = redis.conn().await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_eval:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_storm_of_joiners_shares_a_few_board_reads() {
    let redis = RedisServer::start().await;
    let node = start_on_redis(&redis, "storm", boards(0)).await;
    let addr = node.local_addr();
    let room = "quotes-storm";
    let mut publisher = Client::connect(addr).await;
    let quotes: Vec<Value> = (0..1000).map(|i| set(room, &format!("S{i}"), i)).collect();
    publisher.send_burst(&quotes).await;
    let (_, api) = tokio::time::timeout(WAIT, async {
        loop {
            let (status, api) = api_state(addr, room).await;
            if api["offset"] == 1000 {
                return (status, api);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the board never filled");
    let board = Board::from_snapshot(&api);
    let mut joiners = Vec::new();
    for _ in 0..60 {
        joiners.push(Client::connect(addr).await);
    }
    // All at once: each read serves everyone who came while the one before it ran.
    let before = evals(&redis).await;
    let join = json!({"type":"join","roomId":room,"state":true});
    futures_util::future::join_all(joiners.iter_mut().map(|c| c.send(join.clone()))).await;
    for c in &mut joiners {
        let snapshot = c.expect_type("snapshot").await;
        assert_eq!(
            Board::from_snapshot(&snapshot),
            board,
            "every joiner has the whole board"
        );
    }
    let reads = evals(&redis).await - before;
    assert!(reads <= 20, "60 joiners cost {reads} board reads");
}

#[tokio::test]
async fn a_publish_to_a_board_during_a_7_s_redis_stall_is_queued_then_appended_once() {
    let redis = RedisServer::start().await;
    let node = start_on_redis(&redis, "stalled", boards(0)).await;
    let addr = node.local_addr();
    let room = "quotes-stall";
    let mut watcher = Client::connect(addr).await;
    let mut board = Board::from_snapshot(&join_board(&mut watcher, room, None).await);
    let body = json!({"roomId":room,"content":{"symbol":"A","last":1}});
    let (status, answer) = api_publish(addr, &body).await;
    assert_eq!(
        (status, answer["offset"].as_u64()),
        (200, Some(1)),
        "{answer}"
    );
    next_board_message(&mut watcher, &mut board).await;
    // Redis sleeps longer than the API waits for its answer: the API says queued, not
    // failed, and the message is appended (once) when Redis is back.
    let stall = redis.stall(7).await;
    let body = json!({"roomId":room,"content":{"symbol":"A","last":2}});
    let (status, answer) = api_publish(addr, &body).await;
    assert_eq!(
        (status, answer["queued"].as_bool()),
        (202, Some(true)),
        "{answer}"
    );
    assert!(!stall.is_finished(), "answered while Redis still slept");
    stall.await.unwrap();
    let m = next_board_message(&mut watcher, &mut board).await;
    assert_eq!(
        (m["offset"].as_u64(), m["content"]["last"].as_u64()),
        (Some(2), Some(2))
    );
    let (_, api) = api_state(addr, room).await;
    assert_eq!(Board::from_snapshot(&api), board);
    assert_eq!(api["offset"], 2, "appended once");
}
