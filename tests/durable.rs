//! Durable rooms on the embedded engine, beyond the contract every engine keeps
//! (`tests/engines.rs`: one order, history first, recovery from a position):
//! `recovered:false` when a position cannot be served whole, plain rooms keeping
//! nothing, bad classes, the history API, and an expired history's new epoch.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
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
