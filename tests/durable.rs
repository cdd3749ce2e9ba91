//! Durable rooms on the embedded engine: offsets that count up by one in one order on
//! every node, the history on join before any live message, recovery from a position
//! with nothing missed and nothing twice, and `recovered:false` when it cannot be whole.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use volley::broker::MemoryBus;
use volley::config::RoomClass;
use volley::Config;

fn durable(pattern: &str, size: usize) -> impl Fn(&mut Config) {
    let pattern = pattern.to_string();
    move |c: &mut Config| {
        c.limits.publish_rate = 0;
        c.rooms = vec![RoomClass {
            pattern: pattern.clone(),
            history_size: size,
            history_ttl_s: 3600,
            ..Default::default()
        }];
    }
}

#[tokio::test]
async fn every_node_sees_one_order_with_offsets_counting_up_by_one() {
    let bus = MemoryBus::new();
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        let tweak = durable("scores:*", 1000);
        nodes.push(
            start_with_broker(
                |c| {
                    tweak(c);
                    c.server.node_id = id.into();
                },
                Arc::new(bus.broker()),
            )
            .await,
        );
    }
    let mut subscribers = Vec::new();
    for node in &nodes {
        let mut c = Client::connect(node.local_addr()).await;
        c.join("scores:final").await;
        subscribers.push(c);
    }
    let addrs: Vec<_> = nodes.iter().map(|n| n.local_addr()).collect();
    publish_and_expect_one_order(&addrs, &mut subscribers, "scores:final").await;
}

#[tokio::test]
async fn the_history_comes_first_then_live_messages() {
    let server = start(durable("scores:*", 100)).await;
    let addr = server.local_addr();
    for goal in 1..=5 {
        api_publish(
            addr,
            &json!({"roomId":"scores:m1","content":{"goals":goal}}),
        )
        .await;
    }
    let mut late = Client::connect(addr).await;
    let history = join_with(&mut late, "scores:m1", json!({"history":3})).await;
    assert_eq!(offsets(&history["messages"]), vec![3, 4, 5]);
    assert_eq!(history["messages"][2]["content"], json!({"goals":5}));
    let epoch = history["epoch"].as_str().unwrap().to_string();
    assert!(!epoch.is_empty());
    assert!(
        history.get("recovered").is_none(),
        "only a since join is told"
    );
    api_publish(addr, &json!({"roomId":"scores:m1","content":{"goals":6}})).await;
    let live = late.next_room_message().await;
    assert_eq!(
        (live["offset"].as_u64(), live["content"].clone()),
        (Some(6), json!({"goals":6}))
    );

    // history: 1 is the current value.
    let mut now = Client::connect(addr).await;
    let current = join_with(&mut now, "scores:m1", json!({"history":1})).await;
    assert_eq!(offsets(&current["messages"]), vec![6]);
    assert_eq!(current["epoch"], epoch.as_str());
}

#[tokio::test]
async fn since_replays_everything_missed_while_publishing_goes_on() {
    let server = start(durable("ticker:*", 10_000)).await;
    let addr = server.local_addr();
    let mut first = Client::connect(addr).await;
    let history = join_with(&mut first, "ticker:ACME", json!({"history":1})).await;
    // No history yet: no epoch either, and a read creates none.
    assert_eq!(history["epoch"], "");
    let mut epoch = String::new();
    // A feed publishes 300 prices, paced, while a client leaves and comes back.
    let feed = spawn_paced_feed(addr, "ticker:ACME", 300, Duration::from_millis(5));
    let mut last = 0;
    while last < 50 {
        last = first.next_durable_message(&mut epoch).await["offset"]
            .as_u64()
            .unwrap();
    }
    assert!(
        !epoch.is_empty(),
        "the first message came after an epoch_changed"
    );
    drop(first);
    let seen = come_back_until_end(addr, "ticker:ACME", last, &epoch).await;
    feed.await.unwrap();
    assert_eq!(
        seen,
        (last + 1..=301).collect::<Vec<_>>(),
        "every message after the position, once, in order"
    );
}

#[tokio::test]
async fn a_position_that_cannot_be_served_whole_says_recovered_false() {
    let server = start(durable("scores:*", 5)).await;
    let addr = server.local_addr();
    for n in 1..=20 {
        api_publish(addr, &json!({"roomId":"scores:x","content":n})).await;
    }
    let mut c = Client::connect(addr).await;
    let h = join_with(&mut c, "scores:x", json!({"history":1})).await;
    let epoch = h["epoch"].as_str().unwrap().to_string();
    // Trimmed past the position: the latest kept instead, and told so.
    let mut trimmed = Client::connect(addr).await;
    let h = join_with(
        &mut trimmed,
        "scores:x",
        json!({"since":{"offset":2,"epoch":epoch}}),
    )
    .await;
    assert_eq!(h["recovered"], false);
    assert_eq!(offsets(&h["messages"]), vec![16, 17, 18, 19, 20]);
    // Another epoch: the history the client knew is gone.
    let mut stale = Client::connect(addr).await;
    let h = join_with(
        &mut stale,
        "scores:x",
        json!({"since":{"offset":19,"epoch":"an-old-epoch"}}),
    )
    .await;
    assert_eq!(h["recovered"], false);
    assert_eq!(h["epoch"], epoch.as_str());
}

#[tokio::test]
async fn plain_rooms_keep_their_frames_and_say_they_keep_nothing() {
    let server = start(durable("scores:*", 100)).await;
    let addr = server.local_addr();
    let mut c = Client::connect(addr).await;
    c.join("lobby").await;
    c.send(json!({"type":"message","roomId":"lobby","content":"hi"}))
        .await;
    let m = without_timestamp(c.next_room_message().await);
    assert_eq!(m, json!({"type":"message","roomId":"lobby","content":"hi"}));
    let mut late = Client::connect(addr).await;
    let h = join_with(
        &mut late,
        "lobby",
        json!({"since":{"offset":1,"epoch":"e"}}),
    )
    .await;
    assert_eq!(
        h,
        json!({"type":"history","roomId":"lobby","epoch":"","messages":[],"recovered":false})
    );
}

#[tokio::test]
async fn a_bad_room_class_stops_the_node_naming_the_entry() {
    let mut config = config();
    config.rooms = vec![RoomClass {
        pattern: "scores:[".into(),
        history_size: 10,
        history_ttl_s: 60,
        ..Default::default()
    }];
    let err = volley::Server::bind(config).await.err().expect("refused");
    assert!(err.to_string().contains("[[rooms]] entry 0"), "{err}");
}

#[tokio::test]
async fn the_history_api_reads_what_a_join_would_get() {
    let server = start(durable("scores:*", 100)).await;
    let addr = server.local_addr();
    for n in 1..=5 {
        api_publish(addr, &json!({"roomId":"scores:m 1","content":n})).await;
    }
    let get = |path: &str| {
        let path = path.to_string();
        async move {
            let (status, body) = http(
                addr,
                "GET",
                &path,
                &[("Authorization", "apikey test-key")],
                b"",
            )
            .await;
            (
                status,
                serde_json::from_str::<Value>(&body).unwrap_or(Value::Null),
            )
        }
    };
    let (status, h) = get("/api/history/scores%3Am%201?limit=2").await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["roomId"], "scores:m 1");
    assert_eq!(offsets(&h["messages"]), vec![4, 5]);
    let (_, h) = get("/api/history/scores%3Am%201?since=3").await;
    assert_eq!(
        (offsets(&h["messages"]), h["recovered"].clone()),
        (vec![4, 5], json!(true))
    );
    let (status, h) = get("/api/history/lobby").await;
    assert_eq!((status, h["error"].clone()), (404, json!("not_durable")));
    let (status, _) = http(addr, "GET", "/api/history/scores%3Am%201", &[], b"").await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn an_expired_history_starts_a_new_epoch_that_subscribers_are_told_of() {
    let server = start(|c| {
        c.limits.publish_rate = 0;
        c.rooms = vec![RoomClass {
            pattern: "scores:*".into(),
            history_size: 100,
            history_ttl_s: 1,
            ..Default::default()
        }];
    })
    .await;
    let addr = server.local_addr();
    let mut sub = Client::connect(addr).await;
    let h = join_with(&mut sub, "scores:t", json!({"history": 1})).await;
    assert_eq!(h["epoch"], "");
    sub.expect_type("user_joined").await;
    api_publish(addr, &json!({"roomId":"scores:t","content":"old"})).await;
    let told = sub.expect_type("epoch_changed").await;
    let old = told["epoch"].as_str().unwrap().to_string();
    assert_eq!(sub.next_room_message().await["offset"], 1);
    // Nothing published for the class's TTL: the history expires (the API says so).
    let expired = tokio::time::timeout(WAIT, async {
        loop {
            let (_, body) = http(
                addr,
                "GET",
                "/api/history/scores:t",
                &[("Authorization", "apikey test-key")],
                b"",
            )
            .await;
            let h: Value = serde_json::from_str(&body).unwrap();
            if h["epoch"] == "" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(expired.is_ok(), "the history never expired");
    for n in 1..=3 {
        api_publish(addr, &json!({"roomId":"scores:t","content":n})).await;
    }
    let told = sub.expect_type("epoch_changed").await;
    assert_ne!(told["epoch"], old.as_str());
    for n in 1..=3u64 {
        let m = sub.expect_type("message").await;
        assert_eq!(
            (m["offset"].as_u64(), m["content"].as_u64()),
            (Some(n), Some(n))
        );
    }
}
