//! One contract, every engine: the embedded bus, one redis-server, two shards, Sentinel
//! and a Redis Cluster each carry two nodes through the same steps, asserting the same
//! frames:
//!
//! 1. plain messages cross nodes once each, in publish order; a broadcast too;
//! 2. a durable room has one order on every node, offsets counting up by one;
//! 3. its history comes first on join, and `since` recovers what was missed;
//! 4. a user online on one node is listed and reachable from the other, and gone after;
//! 5. a state room's board: snapshot on join, removals, `state_full`, `since` recovered
//!    or a fresh snapshot when trimmed, the same board on both nodes and in the API;
//! 6. the engine's hand-over (a restarted Redis or shard, a Sentinel failover, a cluster
//!    master failed over) loses and doubles nothing of a durable room under traffic.
//!
//! Behaviour only one engine has (stream key names, pipelines, probes) is tested in its
//! own file.

mod common;

use std::time::Duration;

use common::boards::{api_state, join_board, next_board_message, Board};
use common::engines::{Deployment, Engine};
use common::*;
use serde_json::{json, Value};
use volley::config::RoomClass;
use volley::{Config, Server};

fn rooms(c: &mut Config) {
    c.rooms = vec![
        RoomClass {
            pattern: "ledger-*".into(),
            history_size: 10_000,
            history_ttl_s: 3600,
            ..Default::default()
        },
        RoomClass {
            pattern: "board-*".into(),
            state_key: Some("symbol".into()),
            state_max_keys: 3,
            history_size: 4,
            history_ttl_s: 3600,
            ..Default::default()
        },
    ];
}

async fn keeps_the_contract(engine: Engine) {
    let mut deployment = Deployment::start(engine).await;
    let a = deployment.node("a", rooms).await;
    let b = deployment.node("b", rooms).await;
    plain_messages_cross_once_in_order(&a, &b).await;
    durable_rooms_have_one_order(&a, &b).await;
    history_comes_first_and_since_recovers(&a, &b).await;
    presence_is_seen_from_the_other_node(&a, &b).await;
    boards_are_one_state_everywhere(&a, &b).await;
    hand_over_loses_and_doubles_nothing(&mut deployment, &a, &b).await;
}

async fn plain_messages_cross_once_in_order(a: &Server, b: &Server) {
    let mut remote = Client::connect(b.local_addr()).await;
    remote.join("lobby").await;
    let mut publisher = Client::connect(a.local_addr()).await;
    let frames: Vec<Value> = (0..50)
        .map(|n| json!({"type":"message","roomId":"lobby","content":n}))
        .chain([json!({"type":"message","roomId":"lobby","content":"end"})])
        .collect();
    publisher.send_burst(&frames).await;
    let mut seen = Vec::new();
    loop {
        let m = remote.next_room_message().await;
        if m["content"] == "end" {
            break;
        }
        seen.push(m["content"].as_u64().expect("a number"));
    }
    assert_eq!(seen, (0..50).collect::<Vec<_>>(), "once each, in order");
    // A broadcast is sent as given, to every socket on every node.
    let (status, _) = api_publish(a.local_addr(), &json!({"broadcast":{"to":"all"}})).await;
    assert_eq!(status, 200);
    assert_eq!(remote.next_frame().await, r#"{"to":"all"}"#);
}

async fn durable_rooms_have_one_order(a: &Server, b: &Server) {
    let mut subscribers = Vec::new();
    for node in [a, b] {
        let mut c = Client::connect(node.local_addr()).await;
        c.join("ledger-order").await;
        subscribers.push(c);
    }
    publish_and_expect_one_order(
        &[a.local_addr(), b.local_addr()],
        &mut subscribers,
        "ledger-order",
    )
    .await;
}

async fn history_comes_first_and_since_recovers(a: &Server, b: &Server) {
    let mut watcher = Client::connect(b.local_addr()).await;
    let h = join_with(&mut watcher, "ledger-history", json!({"history":5})).await;
    assert_eq!(h["epoch"], "", "no history yet, and the read made none");
    let mut epoch = String::new();
    for n in 1..=5 {
        let (status, _) = api_publish(
            a.local_addr(),
            &json!({"roomId":"ledger-history","content":{"n":n}}),
        )
        .await;
        assert_eq!(status, 200);
    }
    for n in 1..=5u64 {
        assert_eq!(watcher.next_durable_message(&mut epoch).await["offset"], n);
    }
    let mut late = Client::connect(a.local_addr()).await;
    let h = join_with(&mut late, "ledger-history", json!({"history":3})).await;
    assert_eq!(offsets(&h["messages"]), vec![3, 4, 5]);
    assert_eq!(h["messages"][2]["content"], json!({"n":5}));
    assert_eq!(h["epoch"], epoch.as_str());
    assert!(h.get("recovered").is_none(), "only a since join is told");
    // history: 1 is the current value.
    let mut now = Client::connect(b.local_addr()).await;
    let current = join_with(&mut now, "ledger-history", json!({"history":1})).await;
    assert_eq!(offsets(&current["messages"]), vec![5]);
    drop((late, now));
    // A client of b leaves while a feed on a publishes, and comes back from its position.
    let feed = spawn_paced_feed(
        a.local_addr(),
        "ledger-history",
        200,
        Duration::from_millis(10),
    );
    let mut last = 0;
    while last < 30 {
        last = watcher.next_durable_message(&mut epoch).await["offset"]
            .as_u64()
            .unwrap();
    }
    drop(watcher);
    let seen = come_back_until_end(b.local_addr(), "ledger-history", last, &epoch).await;
    feed.await.unwrap();
    assert_eq!(
        seen,
        (last + 1..=206).collect::<Vec<_>>(),
        "everything after the position, once, in order"
    );
}

async fn boards_are_one_state_everywhere(a: &Server, b: &Server) {
    let room = "board-quotes";
    let quote = |symbol: &str, last: u64| json!({"symbol":symbol,"last":last});
    let publish = |symbol: &str, last: u64| json!({"type":"message","roomId":room,"content":quote(symbol, last)});
    let mut watcher = Client::connect(b.local_addr()).await;
    let first = join_board(&mut watcher, room, None).await;
    assert_eq!(first["entries"], json!([]), "an empty board: {first}");
    assert_eq!(first["offset"], 0);
    let mut board = Board::from_snapshot(&first);
    let mut publisher = Client::connect(a.local_addr()).await;
    publisher
        .send_burst(&[publish("A", 1), publish("B", 1), publish("A", 2)])
        .await;
    for _ in 0..3 {
        next_board_message(&mut watcher, &mut board).await;
    }
    assert_eq!(watcher_copy(&board, "\"A\""), quote("A", 2));
    // A late joiner on either node gets the whole board at once.
    let mut late = Client::connect(a.local_addr()).await;
    let snapshot = join_board(&mut late, room, None).await;
    assert_eq!(snapshot["offset"], 3);
    assert_eq!(snapshot["epoch"], board.epoch.as_str());
    assert_eq!(Board::from_snapshot(&snapshot).contents(), board.contents());
    // Removal through the API: answered with its offset, announced to the room.
    let (status, answer) = api_publish(
        a.local_addr(),
        &json!({"roomId":room,"content":{"symbol":"B"},"remove":true}),
    )
    .await;
    assert_eq!(
        (status, answer["offset"].as_u64()),
        (200, Some(4)),
        "{answer}"
    );
    let removal = next_board_message(&mut watcher, &mut board).await;
    assert_eq!(
        removal,
        json!({"type":"message","roomId":room,"key":"B","removed":true,"offset":4})
    );
    // Three keys fill the board: a fourth is refused, and nothing else changes.
    publisher
        .send_burst(&[publish("C", 1), publish("D", 1)])
        .await;
    for _ in 0..2 {
        next_board_message(&mut watcher, &mut board).await;
    }
    publisher.send(publish("E", 1)).await;
    let refused = publisher.expect_error("state_full").await;
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("state_max_keys = 3"),
        "{refused}"
    );
    let (status, answer) = api_publish(
        a.local_addr(),
        &json!({"roomId":room,"content":quote("E", 2)}),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (409, Some("state_full")),
        "{answer}"
    );
    publisher.send(publish("A", 3)).await;
    let m = next_board_message(&mut watcher, &mut board).await;
    assert_eq!(
        (m["key"].as_str(), m["offset"].as_u64()),
        (Some("A"), Some(7)),
        "the refusals took no offset: {m}"
    );
    // The API's snapshot is the board the watcher built.
    let (status, api) = api_state(b.local_addr(), room).await;
    assert_eq!(status, 200, "{api}");
    assert_eq!(Board::from_snapshot(&api), board);
    // Back from a position the history holds: only the changes.
    let mut back = Client::connect(a.local_addr()).await;
    let answer = join_board(&mut back, room, Some((5, &board.epoch))).await;
    assert_eq!(
        (answer["type"].as_str(), offsets(&answer["messages"])),
        (Some("history"), vec![6, 7]),
        "{answer}"
    );
    // Back from a position trimmed away (4 kept): a fresh snapshot, whole anyway.
    let mut trimmed = Client::connect(b.local_addr()).await;
    let answer = join_board(&mut trimmed, room, Some((1, &board.epoch))).await;
    assert_eq!(
        (answer["type"].as_str(), &answer["recovered"]),
        (Some("snapshot"), &json!(false)),
        "{answer}"
    );
    assert_eq!(Board::from_snapshot(&answer), board);
}

/// The content of `key` on a client's board.
fn watcher_copy(board: &Board, key: &str) -> Value {
    board
        .entries
        .get(key)
        .map(|(v, _)| v.clone())
        .unwrap_or(Value::Null)
}

async fn presence_is_seen_from_the_other_node(a: &Server, b: &Server) {
    let mut alice = Client::connect(a.local_addr()).await;
    alice.send(json!({"type":"auth","userId":"alice"})).await;
    assert_eq!(
        alice.next_message().await,
        json!({"type":"authenticated","userId":"alice"})
    );
    let mut watcher = Client::connect(b.local_addr()).await;
    let listed = |online: &Value| {
        online["users"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["userId"] == "alice" && u["serverId"] == "a")
    };
    online_until(&mut watcher, |online| listed(online)).await;
    let (status, _) = api_publish(
        b.local_addr(),
        &json!({"userId":"alice","content":"from b"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        alice.next_message().await,
        json!({"type":"direct_message","content":"from b"})
    );
    drop(alice);
    online_until(&mut watcher, |online| !listed(online)).await;
}

/// Asks who is online (at most four times a second) until `done` holds.
async fn online_until(client: &mut Client, done: impl Fn(&Value) -> bool) {
    let answer = tokio::time::timeout(WAIT, async {
        loop {
            client.send(json!({"type":"get_online_users"})).await;
            if done(&client.expect_type("online_users").await) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    answer.expect("the listing never showed what was expected");
}

async fn hand_over_loses_and_doubles_nothing(deployment: &mut Deployment, a: &Server, b: &Server) {
    let room = "ledger-hand-over";
    let mut remote = Client::connect(b.local_addr()).await;
    join_with(&mut remote, room, json!({"history":1})).await;
    let count = 300;
    let feed = spawn_paced_feed(a.local_addr(), room, count, Duration::from_millis(20));
    let mut epoch = String::new();
    let mut seen = Vec::new();
    while seen.len() < 60 {
        let m = remote.next_durable_message(&mut epoch).await;
        seen.push(m["content"]["seq"].as_u64().expect("a seq"));
    }
    if !deployment.hand_over(room, &[a, b]).await {
        feed.abort();
        return;
    }
    loop {
        let m = remote.next_durable_message(&mut epoch).await;
        if m["content"] == "end" {
            break;
        }
        seen.push(m["content"]["seq"].as_u64().expect("a seq"));
    }
    feed.await.unwrap();
    assert_eq!(
        seen,
        (0..count).collect::<Vec<_>>(),
        "every message once, in order, across the hand-over"
    );
}

#[tokio::test]
async fn the_memory_engine_keeps_the_contract() {
    keeps_the_contract(Engine::Memory).await;
}

#[tokio::test]
async fn the_redis_engine_keeps_the_contract() {
    keeps_the_contract(Engine::Redis).await;
}

#[tokio::test]
async fn shards_keep_the_contract() {
    keeps_the_contract(Engine::Shards).await;
}

#[tokio::test]
async fn sentinel_keeps_the_contract() {
    keeps_the_contract(Engine::Sentinel).await;
}

#[tokio::test]
async fn a_redis_cluster_keeps_the_contract() {
    keeps_the_contract(Engine::Cluster).await;
}
