//! Redis misbehaving and nodes misconfigured, against a real redis-server: long outages,
//! stalls longer than the reply timeout, restarts, two nodes with one id, envelopes from
//! other programs that are too big, join/leave storms. What each promise is: nothing
//! accepted is lost while it can be kept, nothing arrives twice, per-publisher order
//! holds, and `/readyz` tells the truth.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Collects `content.seq` of room messages until the message whose content is "end".
async fn seqs_until_end(client: &mut Client) -> Vec<u64> {
    let mut seqs = Vec::new();
    loop {
        let m = client.next_room_message().await;
        if m["content"] == "end" {
            return seqs;
        }
        seqs.push(m["content"]["seq"].as_u64().expect("a seq"));
    }
}

fn strictly_increasing(seqs: &[u64]) -> bool {
    seqs.windows(2).all(|w| w[0] < w[1])
}

#[tokio::test]
async fn a_long_outage_holds_publishes_until_the_other_nodes_resubscribe() {
    let mut redis = RedisServer::start().await;
    let port = redis.port;
    let one = start_on_redis(&redis, "one", |c| c.limits.publish_rate = 0).await;
    let two = start_on_redis(&redis, "two", |_| {}).await;
    let mut remote = Client::connect(two.local_addr()).await;
    remote.join("fresh").await;
    redis.wait_numsub("room:fresh", 1).await;
    // Node one has seen node two alive: it will wait for it after the outage.
    tokio::time::timeout(WAIT, async {
        while health(one.local_addr()).await["redis_peers"] != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("node one never saw node two");
    let mut publisher = Client::connect(one.local_addr()).await;

    redis.kill();
    wait_status(one.local_addr(), "/readyz", 503).await;
    wait_status(two.local_addr(), "/readyz", 503).await;
    // Node one never published to this room: it cannot know its subscribers from a
    // PUBLISH reply, only from the other nodes coming back. Longer than the old 5 s.
    for seq in 0..24u64 {
        publisher
            .send(json!({"type":"message","roomId":"fresh","content":{"seq":seq}}))
            .await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let redis = RedisServer::start_on(port).await;
    wait_status(one.local_addr(), "/readyz", 200).await;
    publisher
        .send(json!({"type":"message","roomId":"fresh","content":"end"}))
        .await;
    let seqs = seqs_until_end(&mut remote).await;
    assert_eq!(
        seqs,
        (0..24).collect::<Vec<_>>(),
        "every held publish, once, in order"
    );
    let h = health(one.local_addr()).await;
    assert_eq!(h["redis_dropped_publishes"], 0, "{h}");
    drop(redis);
}

#[tokio::test]
async fn a_seven_second_redis_stall_neither_duplicates_nor_reorders() {
    let redis = RedisServer::start().await;
    let one = start_on_redis(&redis, "one", |c| c.limits.publish_rate = 0).await;
    let two = start_on_redis(&redis, "two", |_| {}).await;
    let mut remote = Client::connect(two.local_addr()).await;
    remote.join("r").await;
    redis.wait_numsub("room:r", 1).await;
    let mut publisher = Client::connect(one.local_addr()).await;

    let mut sent = 0u64;
    for _ in 0..10 {
        publisher
            .send(json!({"type":"message","roomId":"r","content":{"seq":sent}}))
            .await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Longer than the 5 s reply timeout of the publish connection.
    let stall = redis.stall(7).await;
    while !stall.is_finished() {
        publisher
            .send(json!({"type":"message","roomId":"r","content":{"seq":sent}}))
            .await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_status(one.local_addr(), "/readyz", 200).await;
    publisher
        .send(json!({"type":"message","roomId":"r","content":"end"}))
        .await;
    let seqs = seqs_until_end(&mut remote).await;
    assert!(
        strictly_increasing(&seqs),
        "duplicated or reordered: {seqs:?}"
    );
    let h = health(one.local_addr()).await;
    let unconfirmed = h["redis_unconfirmed_publishes"].as_u64().unwrap();
    assert!(sent > 100, "published through the whole stall: {sent}");
    assert!(
        seqs.len() as u64 + unconfirmed >= sent,
        "{} of {sent} arrived, {unconfirmed} counted unconfirmed: {h}",
        seqs.len()
    );
}

#[tokio::test]
async fn ready_means_subscribed_after_a_restart() {
    let mut redis = RedisServer::start().await;
    let port = redis.port;
    let node = start_on_redis(&redis, "one", |_| {}).await;
    let addr = node.local_addr();
    let mut c = Client::connect(addr).await;
    c.join("r").await;
    redis.wait_numsub("room:r", 1).await;
    wait_status(addr, "/readyz", 200).await;

    redis.kill();
    wait_status(addr, "/readyz", 503).await;
    let redis = RedisServer::start_on(port).await;
    // The first 200 after the restart: by then the node is subscribed again.
    tokio::time::timeout(WAIT, async {
        while http(addr, "GET", "/readyz", &[], b"").await.0 != 200 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("never ready again");
    assert_eq!(
        redis.numsub("room:r").await,
        1,
        "ready while deaf to room:r"
    );
    assert_eq!(redis.numsub("volley:probe:one").await, 1);
}

#[tokio::test]
async fn two_nodes_with_one_id_are_both_unready_and_say_so() {
    let redis = RedisServer::start().await;
    let a = start_on_redis(&redis, "same", |_| {}).await;
    let b = start_on_redis(&redis, "same", |_| {}).await;
    for node in [&a, &b] {
        let body = tokio::time::timeout(WAIT, async {
            loop {
                let (status, body) = http(node.local_addr(), "GET", "/readyz", &[], b"").await;
                let body: Value = serde_json::from_str(&body).unwrap();
                if body["broker_state"] == "duplicate_node_id" {
                    return (status, body);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the duplicate id was never noticed");
        assert_eq!(body.0, 503, "{}", body.1);
        assert_eq!(body.1["ready"], false);
    }
    // Nodes left to the default get ids of their own.
    let (x, y) = (volley::Config::default(), volley::Config::default());
    assert!(x.server.node_id.starts_with("volley-"));
    assert_ne!(x.server.node_id, y.server.node_id);
}

#[tokio::test]
async fn oversized_envelopes_from_other_programs_are_dropped_and_counted() {
    let redis = RedisServer::start().await;
    let node = start_on_redis(&redis, "one", |c| c.limits.max_frame_bytes = 4096).await;
    let addr = node.local_addr();
    let mut c = Client::connect(addr).await;
    c.join("r").await;
    redis.wait_numsub("room:r", 1).await;
    let mut conn = redis.conn().await;
    let publish = |message: String| redis::cmd("PUBLISH").arg("room:r").arg(message).to_owned();
    // One 10 MB message: would overflow every subscriber's outbox.
    let huge = format!(
        r#"{{"serverId":"other","payload":{{"pad":"{}"}}}}"#,
        "x".repeat(10 << 20)
    );
    let _: i64 = publish(huge).query_async(&mut conn).await.unwrap();
    // 500 000 tiny messages in one envelope.
    let many = format!(
        r#"{{"serverId":"other","batch":[{}1]}}"#,
        "1,".repeat(499_999)
    );
    let _: i64 = publish(many).query_async(&mut conn).await.unwrap();
    // A batch with one oversized message among good ones: the good ones arrive.
    let mixed = format!(
        r#"{{"serverId":"other","batch":[{{"n":1}},{{"pad":"{}"}},{{"n":2}}]}}"#,
        "y".repeat(8192)
    );
    let _: i64 = publish(mixed).query_async(&mut conn).await.unwrap();
    assert_eq!(c.next_message().await, json!({"n":1}));
    assert_eq!(c.next_message().await, json!({"n":2}));
    let h = health(addr).await;
    assert_eq!(h["redis_oversized_payloads"], 2, "{h}");
    assert_eq!(h["redis_bad_envelopes"], 1, "{h}");
    assert_eq!(h["slow_consumers_closed"], 0, "{h}");
}

#[tokio::test]
async fn a_member_gets_every_notice_and_message_from_the_moment_its_join_was_answered() {
    let redis = RedisServer::start().await;
    let a = start_on_redis(&redis, "a", |c| c.limits.join_rate = 0).await;
    let b = start_on_redis(&redis, "b", |c| c.limits.join_rate = 0).await;
    // Node a is alone in the room, and has published there (its member's join notice)
    // with nobody else listening.
    let mut a1 = Client::connect(a.local_addr()).await;
    a1.join("lobby").await;
    let published = |h: &Value| h["redis_published_messages"].as_u64().unwrap();
    tokio::time::timeout(WAIT, async {
        while published(&health(a.local_addr()).await) < 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    // A member on node b joins: from its answer (its own user_joined) on, it hears all.
    let mut b1 = Client::connect(b.local_addr()).await;
    b1.join("lobby").await;
    let mut a2 = Client::connect(a.local_addr()).await;
    a2.join("lobby").await;
    a2.send(json!({"type":"leave","roomId":"lobby"})).await;
    a1.send(json!({"type":"message","roomId":"lobby","content":"end"}))
        .await;
    let mut seen = Vec::new();
    loop {
        let m = b1.next_message().await;
        let kind = m["type"].as_str().unwrap().to_string();
        let content = m["content"].as_str().map(str::to_string);
        seen.push(content.clone().unwrap_or(kind));
        if content.as_deref() == Some("end") {
            break;
        }
    }
    assert_eq!(
        seen,
        ["user_joined", "user_left", "end"],
        "what node a sent after b1's answer"
    );
}

#[tokio::test]
async fn a_join_storm_never_costs_another_publisher_an_accepted_message() {
    let redis = RedisServer::start().await;
    let one = start_on_redis(&redis, "one", |c| {
        c.limits.join_rate = 0;
        c.limits.publish_rate = 0;
        c.limits.max_rooms_per_socket = 100_000;
        c.redis.outage_buffer = 500;
    })
    .await;
    let two = start_on_redis(&redis, "two", |_| {}).await;
    let mut remote = Client::connect(two.local_addr()).await;
    remote.join("r").await;
    redis.wait_numsub("room:r", 1).await;

    let mut storm = Client::connect(one.local_addr()).await;
    let frames: Vec<Value> = (0..5_000)
        .flat_map(|i| {
            let room = format!("storm-{i}");
            [
                json!({"type":"join","roomId":room}),
                json!({"type":"leave","roomId":room}),
            ]
        })
        .collect();
    let storming = tokio::spawn(async move {
        storm.send_burst(&frames).await;
        storm
    });
    let mut publisher = Client::connect(one.local_addr()).await;
    publisher.join("r").await;
    let mut accepted = Vec::new();
    for seq in 0..100u64 {
        publisher
            .send(json!({"type":"message","roomId":"r","content":{"seq":seq}}))
            .await;
        // The remote's join notice may reach this node once it subscribes to the room.
        let m = loop {
            let m = publisher.next_message().await;
            if m["type"] != "user_joined" {
                break m;
            }
        };
        match m["type"].as_str() {
            Some("message") => accepted.push(seq),
            Some("error") => assert_eq!(m["code"], "overloaded", "{m}"),
            _ => panic!("unexpected {m}"),
        }
    }
    let _storm = storming.await.unwrap();
    publisher
        .send(json!({"type":"message","roomId":"r","content":"end"}))
        .await;
    let seqs = seqs_until_end(&mut remote).await;
    assert_eq!(
        seqs, accepted,
        "every accepted publish arrived, once, in order"
    );
    let h = health(one.local_addr()).await;
    assert_eq!(h["redis_dropped_publishes"], 0, "{h}");
}

#[tokio::test]
async fn a_durable_join_waiting_for_an_absent_redis_holds_up_nothing_else_on_its_socket() {
    let mut redis = RedisServer::start().await;
    let node = start_on_redis(&redis, "one", |c| {
        // Every frame leaves at once, so the order frames arrive in is the order the
        // node answered them.
        c.batch.delivery_window_ms = 0;
        c.rooms = vec![volley::config::RoomClass {
            pattern: "scores:*".into(),
            history_size: 100,
            ..Default::default()
        }];
    })
    .await;
    let mut c = Client::connect(node.local_addr()).await;
    c.join("chat").await;
    redis.kill();
    // Two durable joins whose history cannot be read; one is left again at once.
    c.send(json!({"type":"join","roomId":"scores:gone","history":5}))
        .await;
    c.send(json!({"type":"leave","roomId":"scores:gone"})).await;
    c.send(json!({"type":"join","roomId":"scores:x","history":5}))
        .await;
    // Frames after them are answered while the history reads wait.
    c.send(json!({"type":"message","roomId":"chat","content":"still here"}))
        .await;
    c.send(json!({"type":"leave","roomId":"nowhere"})).await;
    let m = c.next_message().await;
    assert_eq!(m["content"], "still here", "first came {m}");
    c.expect_error("not_in_room").await;
    // Then the join that stands hears why it has no history, and is in the room.
    let e = c.expect_error("history_unavailable").await;
    assert!(e["message"].as_str().unwrap().contains("scores:x"), "{e}");
    let joined = c.next_message().await;
    assert_eq!(
        (joined["type"].as_str(), joined["roomId"].as_str()),
        (Some("user_joined"), Some("scores:x"))
    );
    // The join that was left again answered nothing at all.
    c.send(json!({"type":"message","roomId":"chat","content":"marker"}))
        .await;
    assert_eq!(c.next_message().await["content"], "marker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starved_of_cpu_keeps_its_subscriber() {
    // A connect storm on a crowded machine starves a node: its tasks run late, its own
    // probes wait unread in its socket. That says nothing of the connection: it must not
    // be replaced (a replacement under traffic can drop plain rooms' messages).
    let redis = RedisServer::start().await;
    let node = start_on_redis(&redis, "starved", |_| {}).await;
    let addr = node.local_addr();
    wait_status(addr, "/readyz", 200).await;
    let restarts = "volley_redis_subscriber_restarts_total";
    assert_eq!(metric(addr, restarts).await, 0);
    // Every worker blocked for most of each probe interval, again and again.
    for _ in 0..30 {
        let hogs: Vec<_> = (0..2)
            .map(|_| {
                tokio::spawn(async { std::thread::sleep(std::time::Duration::from_millis(180)) })
            })
            .collect();
        for hog in hogs {
            hog.await.unwrap();
        }
    }
    wait_status(addr, "/readyz", 200).await;
    assert_eq!(
        metric(addr, restarts).await,
        0,
        "the subscriber was replaced"
    );
}
