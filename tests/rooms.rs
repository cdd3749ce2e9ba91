//! Rooms and broadcast: the article's core job, frame for frame.

mod common;

use common::*;
use serde_json::json;
use volley::broker::MemoryBus;

#[tokio::test]
async fn join_then_message_delivers_the_exact_frames() {
    let server = start(|_| {}).await;
    let mut alice = Client::connect(server.local_addr()).await;
    alice.send(json!({"type":"join","roomId":"lobby"})).await;
    let joined = alice.next_message().await;
    assert_eq!(
        without_timestamp(joined),
        json!({"type":"user_joined","roomId":"lobby"})
    );

    alice
        .send_text(r#"{"type":"message","roomId":"lobby","content":{"b":1,"a":[1.50,2e3]}}"#)
        .await;
    let raw = alice.next_frame().await;
    // The content is spliced in as sent: key order and number spelling survive.
    assert!(
        raw.starts_with(
            r#"{"type":"message","roomId":"lobby","content":{"b":1,"a":[1.50,2e3]},"timestamp":"#
        ),
        "{raw}"
    );
    let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(
        without_timestamp(m),
        json!({"type":"message","roomId":"lobby","content":{"b":1,"a":[1.5,2000.0]}})
    );
}

#[tokio::test]
async fn leave_stops_delivery_and_tells_the_room() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let mut alice = Client::connect(addr).await;
    let mut bob = Client::connect(addr).await;
    alice.join("r").await;
    bob.join("r").await;
    assert_eq!(alice.expect_type("user_joined").await["roomId"], "r");

    bob.send(json!({"type":"leave","roomId":"r"})).await;
    let left = alice.expect_type("user_left").await;
    assert_eq!(
        without_timestamp(left),
        json!({"type":"user_left","roomId":"r"})
    );

    alice
        .send(json!({"type":"message","roomId":"r","content":"after"}))
        .await;
    assert_eq!(alice.expect_type("message").await["content"], "after");
    // Bob's next message is from a room he joins now: nothing from `r` came in between.
    bob.join("other").await;
    bob.send(json!({"type":"message","roomId":"other","content":"mine"}))
        .await;
    assert_eq!(bob.expect_type("message").await["content"], "mine");
}

#[tokio::test]
async fn disconnect_leaves_every_room() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let mut alice = Client::connect(addr).await;
    alice.join("r").await;
    {
        let mut bob = Client::connect(addr).await;
        bob.join("r").await;
        alice.expect_type("user_joined").await;
    }
    assert_eq!(alice.expect_type("user_left").await["roomId"], "r");
}

#[tokio::test]
async fn broadcast_reaches_every_socket_with_the_payload_as_sent() {
    let server = start(|c| c.limits.client_broadcast = true).await;
    let addr = server.local_addr();
    let mut sender = Client::connect(addr).await;
    let mut in_room = Client::connect(addr).await;
    in_room.join("r").await;
    let mut idle = Client::connect(addr).await;
    // Every socket is registered once its upgrade completed; a join round trip proves it.
    idle.join("x").await;

    sender
        .send_text(r#"{"type":"broadcast","payload":{"alert":"goal","minute":90}}"#)
        .await;
    for client in [&mut sender, &mut in_room, &mut idle] {
        assert_eq!(client.next_frame().await, r#"{"alert":"goal","minute":90}"#);
    }
}

#[tokio::test]
async fn client_broadcasts_are_forbidden_by_default() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let mut forger = Client::connect(addr).await;
    let mut victim = Client::connect(addr).await;
    victim.join("scores").await;
    // A forged room message, sent to everyone as-is: refused.
    forger
        .send_text(r#"{"type":"broadcast","payload":{"type":"message","roomId":"scores","content":"fake","timestamp":1}}"#)
        .await;
    let err = forger.expect_error("forbidden").await;
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("limits.client_broadcast"),
        "{err}"
    );
    // The victim saw nothing of it: its next frame is the real one.
    let (status, _) = api_publish(addr, &json!({"roomId":"scores","content":"real"})).await;
    assert_eq!(status, 200);
    assert_eq!(victim.next_room_message().await["content"], "real");
    // The API broadcast, the trusted path, still works.
    let (status, _) = api_publish(addr, &json!({"broadcast":{"notice":"api"}})).await;
    assert_eq!(status, 200);
    assert_eq!(victim.next_frame().await, r#"{"notice":"api"}"#);
}

#[tokio::test]
async fn two_rooms_do_not_leak_into_each_other() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let mut a = Client::connect(addr).await;
    let mut b = Client::connect(addr).await;
    a.join("r1").await;
    b.join("r2").await;
    let mut publisher = Client::connect(addr).await;
    for (room, content) in [
        ("r2", "for r2"),
        ("r1", "for r1"),
        ("r1", "end r1"),
        ("r2", "end r2"),
    ] {
        publisher
            .send(json!({"type":"message","roomId":room,"content":content}))
            .await;
    }
    assert_eq!(a.expect_type("message").await["content"], "for r1");
    assert_eq!(a.expect_type("message").await["content"], "end r1");
    assert_eq!(b.expect_type("message").await["content"], "for r2");
    assert_eq!(b.expect_type("message").await["content"], "end r2");
}

#[tokio::test]
async fn numeric_and_string_room_ids_are_one_room() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let mut a = Client::connect(addr).await;
    a.send(json!({"type":"join","roomId":42})).await;
    assert_eq!(a.expect_type("user_joined").await["roomId"], "42");
    let mut b = Client::connect(addr).await;
    b.send(json!({"type":"message","roomId":"42","content":1}))
        .await;
    let m = a.expect_type("message").await;
    assert_eq!(m["roomId"], "42");
    assert_eq!(m["content"], 1);
}

#[tokio::test]
async fn any_path_upgrades_like_the_articles_clients_expect() {
    let server = start(|_| {}).await;
    let mut root = Client::connect_path(server.local_addr(), "/").await;
    root.join("r").await;
    let mut other = Client::connect_path(server.local_addr(), "/live/feed").await;
    other.join("r").await;
}

#[tokio::test]
async fn empty_rooms_are_removed() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let mut a = Client::connect(addr).await;
    for i in 0..50 {
        let room = format!("room-{i}");
        a.join(&room).await;
        a.send(json!({"type":"leave","roomId":room})).await;
    }
    a.join("last").await;
    let h = health(addr).await;
    assert_eq!(h["rooms"], 1, "{h}");
}

#[tokio::test]
async fn nodes_on_one_memory_bus_share_rooms_exactly_once() {
    let bus = MemoryBus::new();
    let one = start_with_broker(
        |c| c.server.node_id = "one".into(),
        std::sync::Arc::new(bus.broker()),
    )
    .await;
    let two = start_with_broker(
        |c| {
            c.server.node_id = "two".into();
            c.limits.client_broadcast = true;
        },
        std::sync::Arc::new(bus.broker()),
    )
    .await;
    let mut a = Client::connect(one.local_addr()).await;
    let mut b = Client::connect(two.local_addr()).await;
    a.join("match").await;
    b.join("match").await;
    b.send(json!({"type":"message","roomId":"match","content":"from two"}))
        .await;
    a.send(json!({"type":"message","roomId":"match","content":"from one"}))
        .await;
    b.send(json!({"type":"broadcast","payload":{"all":true}}))
        .await;
    for client in [&mut a, &mut b] {
        let mut contents = Vec::new();
        while contents.len() < 3 {
            let m = client.next_message().await;
            match m["type"].as_str() {
                Some("message") => contents.push(m["content"].clone()),
                Some("user_joined") => {}
                _ if m == json!({"all":true}) => contents.push(m.clone()),
                _ => panic!("unexpected {m}"),
            }
        }
        contents.sort_by_key(|v| v.to_string());
        assert_eq!(
            contents,
            vec![json!("from one"), json!("from two"), json!({"all":true})]
        );
    }
    // Nothing arrives twice: the next message on each side is a fresh marker.
    a.send(json!({"type":"message","roomId":"match","content":"end"}))
        .await;
    assert_eq!(a.expect_type("message").await["content"], "end");
    assert_eq!(b.expect_type("message").await["content"], "end");
}

/// Sends a join without waiting for a notice (there may be none).
async fn join_quietly(c: &mut Client, room: &str) {
    c.send(json!({"type":"join","roomId":room})).await;
}

#[tokio::test]
async fn notices_stop_in_rooms_over_notices_max_members() {
    let server = start(|c| c.limits.notices_max_members = 2).await;
    let addr = server.local_addr();
    let mut a = Client::connect(addr).await;
    let mut b = Client::connect(addr).await;
    let mut c = Client::connect(addr).await;
    a.join("crowd").await;
    b.join("crowd").await;
    a.expect_type("user_joined").await;
    // A third member: no notice to anyone, the joiner included.
    join_quietly(&mut c, "crowd").await;
    let marker = |n: u32| json!({"roomId":"crowd","content":n});
    // c's own message follows its join on the same socket: the join was handled first.
    c.send(json!({"type":"message","roomId":"crowd","content":0}))
        .await;
    for client in [&mut a, &mut b, &mut c] {
        let m = client.next_message().await;
        assert_eq!(
            m["type"], "message",
            "no notice in a room over the limit: {m}"
        );
        assert_eq!(m["content"], 0);
    }
    // Leaving a room of three: still over the limit, no notice.
    c.send(json!({"type":"leave","roomId":"crowd"})).await;
    api_publish(addr, &marker(1)).await;
    for client in [&mut a, &mut b] {
        assert_eq!(client.next_message().await["content"], 1);
    }
    // Leaving a room of two: the one left behind hears of it.
    b.send(json!({"type":"leave","roomId":"crowd"})).await;
    assert_eq!(a.next_message().await["type"], "user_left");
}

#[tokio::test]
async fn notices_can_be_turned_off() {
    let server = start(|c| c.limits.notices = false).await;
    let addr = server.local_addr();
    let mut a = Client::connect(addr).await;
    join_quietly(&mut a, "quiet").await;
    a.send(json!({"type":"message","roomId":"quiet","content":"first"}))
        .await;
    let m = a.next_message().await;
    assert_eq!(m["type"], "message", "no user_joined: {m}");
}
