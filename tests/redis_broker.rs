//! Many nodes through a real redis-server: exactly-once delivery across nodes, the
//! article's wire format both ways, batched pipelines, and recovery from Redis outages.

mod common;

use std::collections::HashMap;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

/// Subscribes to channels the raw way, as another program on the same Redis would.
async fn raw_subscriber(redis: &RedisServer, channel: &str) -> redis::aio::PubSub {
    let mut pubsub = redis.client().get_async_pubsub().await.unwrap();
    pubsub.subscribe(channel).await.unwrap();
    pubsub
}

async fn next_raw(pubsub: &mut redis::aio::PubSub) -> Value {
    let msg = tokio::time::timeout(WAIT, pubsub.on_message().next())
        .await
        .expect("no message on the raw subscriber")
        .unwrap();
    serde_json::from_slice(msg.get_payload_bytes()).unwrap()
}

#[tokio::test]
async fn three_nodes_deliver_each_message_exactly_once_in_publish_order() {
    let redis = RedisServer::start().await;
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        nodes.push(start_on_redis(&redis, id, |c| c.limits.publish_rate = 0).await);
    }
    let mut subscribers = Vec::new();
    for node in &nodes {
        for _ in 0..2 {
            let mut c = Client::connect(node.local_addr()).await;
            c.join("match").await;
            subscribers.push(c);
        }
    }
    redis.wait_numsub("room:match", 3).await;

    const PER_PUBLISHER: u64 = 30;
    let mut publishers = Vec::new();
    for node in &nodes {
        publishers.push(Client::connect(node.local_addr()).await);
    }
    for (p, publisher) in publishers.iter_mut().enumerate() {
        let frames: Vec<Value> = (0..PER_PUBLISHER)
            .map(|seq| json!({"type":"message","roomId":"match","content":{"p":p,"seq":seq}}))
            .collect();
        publisher.send_burst(&frames).await;
    }
    for sub in &mut subscribers {
        let mut next: HashMap<u64, u64> = HashMap::new();
        let mut total = 0;
        while total < 3 * PER_PUBLISHER {
            let m = sub.next_message().await;
            if m["type"] != "message" {
                continue;
            }
            let p = m["content"]["p"].as_u64().unwrap();
            let seq = m["content"]["seq"].as_u64().unwrap();
            let expected = next.entry(p).or_insert(0);
            assert_eq!(seq, *expected, "publisher {p}: out of order or duplicated");
            *expected += 1;
            total += 1;
        }
    }
    // Nothing arrives twice: after a marker, the next message everyone sees is the marker.
    publishers[0]
        .send(json!({"type":"message","roomId":"match","content":"end"}))
        .await;
    for sub in &mut subscribers {
        let m = sub.expect_type("message").await;
        assert_eq!(m["content"], "end", "a duplicate arrived: {m}");
    }
}

#[tokio::test]
async fn broadcast_crosses_nodes() {
    let redis = RedisServer::start().await;
    let a = start_on_redis(&redis, "a", |c| c.limits.client_broadcast = true).await;
    let b = start_on_redis(&redis, "b", |_| {}).await;
    redis.wait_numsub("websocket:broadcast", 2).await;
    let mut on_a = Client::connect(a.local_addr()).await;
    let mut on_b = Client::connect(b.local_addr()).await;
    on_b.join("anything").await;
    on_a.send_text(r#"{"type":"broadcast","payload":{"alert":"kick-off"}}"#)
        .await;
    assert_eq!(on_a.next_frame().await, r#"{"alert":"kick-off"}"#);
    assert_eq!(on_b.next_frame().await, r#"{"alert":"kick-off"}"#);
}

#[tokio::test]
async fn every_broadcast_shape_arrives_exactly_once_on_both_nodes() {
    let redis = RedisServer::start().await;
    // Durable rooms are on, as they would be in production: their messages come back to
    // the node that published them, and only they may.
    let with_rooms = |c: &mut volley::Config| {
        c.limits.client_broadcast = true;
        c.limits.publish_rate = 0;
        c.rooms = vec![volley::config::RoomClass {
            pattern: "scores:*".into(),
            history_size: 100,
            ..Default::default()
        }];
    };
    let a = start_on_redis(&redis, "a", with_rooms).await;
    let b = start_on_redis(&redis, "b", with_rooms).await;
    redis.wait_numsub("websocket:broadcast", 2).await;
    let mut on_a = Client::connect(a.local_addr()).await;
    let mut on_b = Client::connect(b.local_addr()).await;
    // Payloads that look like a durable room's message (they end in "offset":N}), and
    // others.
    let shapes = [
        json!({"offset": 7}),
        json!({"a": 1, "offset": 0}),
        json!({"type": "message", "roomId": "scores:x", "content": 1, "timestamp": 5, "offset": 1}),
        json!([1, {"offset": 2}]),
        json!({"epoch": "x", "offset": 3}),
        json!("offset"),
        json!(42),
        // null is a payload too (it used to be read as no payload, and dropped).
        json!(null),
        json!({}),
    ];
    // Each broadcast in an envelope of its own (node b has it before the next is sent),
    // from a socket and through the API of node a.
    let mut sent = Vec::new();
    for (i, shape) in shapes.iter().enumerate() {
        on_a.send(json!({"type":"broadcast","payload":shape})).await;
        assert_eq!(&on_b.next_message().await, shape, "{i}");
        let (status, _) = api_publish(a.local_addr(), &json!({"broadcast": shape})).await;
        assert_eq!(status, 200, "{i}");
        assert_eq!(&on_b.next_message().await, shape, "{i}");
        sent.push(shape.clone());
        sent.push(shape.clone());
    }
    // Last, a marker: node a's echo of anything it sent would have come back before it.
    on_a.send(json!({"type":"broadcast","payload":{"end": true}}))
        .await;
    assert_eq!(
        on_b.next_message().await,
        json!({"end": true}),
        "b: nothing twice"
    );
    let mut got = Vec::new();
    loop {
        let m = on_a.next_message().await;
        if m == json!({"end": true}) {
            break;
        }
        got.push(m);
    }
    assert_eq!(got, sent, "node a: every broadcast exactly once, in order");
}

#[tokio::test]
async fn the_articles_envelopes_are_delivered_as_sent() {
    let redis = RedisServer::start().await;
    let node = start_on_redis(&redis, "volley-1", |_| {}).await;
    let mut c = Client::connect(node.local_addr()).await;
    c.join("7").await;
    redis.wait_numsub("room:7", 1).await;
    let payload = r#"{"type":"message","roomId":"7","content":{"text":"hi from node"},"timestamp":1700000000000}"#;
    let mut conn = redis.conn().await;
    let _: i64 = redis::cmd("PUBLISH")
        .arg("room:7")
        .arg(format!(
            r#"{{"serverId":"server-4242","payload":{payload}}}"#
        ))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(c.next_frame().await, payload);

    // A broken message from another program is dropped and counted; the node carries on.
    let _: i64 = redis::cmd("PUBLISH")
        .arg("room:7")
        .arg("this is not an envelope")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg("room:7")
        .arg(r#"{"serverId":"server-4242","batch":[{"n":1},{"n":2}]}"#)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(c.next_message().await, json!({"n":1}));
    assert_eq!(c.next_message().await, json!({"n":2}));
    assert_eq!(health(node.local_addr()).await["redis_bad_envelopes"], 1);
}

#[tokio::test]
async fn single_envelopes_have_exactly_the_articles_shape() {
    let redis = RedisServer::start().await;
    let node = start_on_redis(&redis, "server-77", |c| {
        c.redis.envelope = volley::config::EnvelopeMode::Single
    })
    .await;
    let mut raw = raw_subscriber(&redis, "room:r").await;
    let mut c = Client::connect(node.local_addr()).await;
    c.join("r").await;
    let joined = next_raw(&mut raw).await;
    assert_eq!(joined["serverId"], "server-77");
    assert_eq!(joined["payload"]["type"], "user_joined");

    c.send(json!({"type":"message","roomId":"r","content":{"goal":"home"}}))
        .await;
    c.send(json!({"type":"message","roomId":"r","content":{"goal":"away"}}))
        .await;
    for side in ["home", "away"] {
        let envelope = next_raw(&mut raw).await;
        let keys: Vec<_> = envelope.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, vec!["payload", "serverId"], "{envelope}");
        let payload = without_timestamp(envelope["payload"].clone());
        assert_eq!(
            payload,
            json!({"type":"message","roomId":"r","content":{"goal":side}})
        );
    }
}

#[tokio::test]
async fn batch_envelopes_carry_a_whole_window_in_one_publish() {
    let redis = RedisServer::start().await;
    let node = start_on_redis(&redis, "b1", |c| {
        c.batch.publish_window_ms = 200;
        c.limits.publish_rate = 0;
    })
    .await;
    let mut raw = raw_subscriber(&redis, "room:r").await;
    let mut c = Client::connect(node.local_addr()).await;
    c.join("r").await;
    assert_eq!(next_raw(&mut raw).await["payload"]["type"], "user_joined");

    let pipelines_before = health(node.local_addr()).await["redis_pipelines"]
        .as_u64()
        .unwrap();
    let frames: Vec<Value> = (0..10)
        .map(|i| json!({"type":"message","roomId":"r","content":i}))
        .collect();
    c.send_burst(&frames).await;
    let envelope = next_raw(&mut raw).await;
    assert_eq!(envelope["serverId"], "b1");
    let contents: Vec<_> = envelope["batch"]
        .as_array()
        .expect("a batch envelope")
        .iter()
        .map(|p| p["content"].clone())
        .collect();
    assert_eq!(
        contents,
        (0..10).map(|i| json!(i)).collect::<Vec<_>>(),
        "one PUBLISH, in order"
    );
    let h = health(node.local_addr()).await;
    assert_eq!(
        h["redis_pipelines"].as_u64().unwrap() - pipelines_before,
        1,
        "{h}"
    );
}

#[tokio::test]
async fn the_last_leave_unsubscribes_the_room() {
    let redis = RedisServer::start().await;
    let node = start_on_redis(&redis, "u1", |_| {}).await;
    let mut a = Client::connect(node.local_addr()).await;
    let mut b = Client::connect(node.local_addr()).await;
    a.join("temp").await;
    b.join("temp").await;
    redis.wait_numsub("room:temp", 1).await;
    a.send(json!({"type":"leave","roomId":"temp"})).await;
    b.expect_type("user_left").await;
    assert_eq!(
        redis.numsub("room:temp").await,
        1,
        "one local socket is still in the room"
    );
    b.send(json!({"type":"leave","roomId":"temp"})).await;
    redis.wait_numsub("room:temp", 0).await;
    let mut conn = redis.conn().await;
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !channels.iter().any(|c| c.starts_with("room:")),
        "{channels:?}"
    );
}

/// Two nodes sharing room `r`: a publisher on node one that is in the room too, and a
/// subscriber on node two; a round trip is done, so nothing of the set-up is still on
/// its way to Redis.
async fn two_nodes_sharing_a_room(
    redis: &RedisServer,
    tweak_one: impl FnOnce(&mut volley::Config),
) -> (volley::Server, volley::Server, Client, Client) {
    let one = start_on_redis(redis, "one", |c| {
        c.limits.publish_rate = 0;
        tweak_one(c);
    })
    .await;
    let two = start_on_redis(redis, "two", |_| {}).await;
    let mut publisher = Client::connect(one.local_addr()).await;
    let mut remote = Client::connect(two.local_addr()).await;
    remote.join("r").await;
    publisher.join("r").await;
    redis.wait_numsub("room:r", 2).await;
    publisher
        .send(json!({"type":"message","roomId":"r","content":"before"}))
        .await;
    assert_eq!(remote.next_room_message().await["content"], "before");
    assert_eq!(publisher.next_room_message().await["content"], "before");
    (one, two, publisher, remote)
}

#[tokio::test]
async fn a_redis_restart_loses_nothing_buffered_and_local_delivery_never_stops() {
    let mut redis = RedisServer::start().await;
    let port = redis.port;
    let (one, two, mut publisher, mut remote) = two_nodes_sharing_a_room(&redis, |_| {}).await;

    redis.kill();
    wait_status(one.local_addr(), "/readyz", 503).await;
    let h = health(one.local_addr()).await;
    assert_eq!(h["broker_state"], "reconnecting", "{h}");
    for i in 0..5 {
        publisher
            .send(json!({"type":"message","roomId":"r","content":format!("during-{i}")}))
            .await;
    }
    // Local sockets are served at once, Redis or not.
    for i in 0..5 {
        assert_eq!(
            publisher.next_room_message().await["content"],
            format!("during-{i}")
        );
    }

    let redis = RedisServer::start_on(port).await;
    wait_status(one.local_addr(), "/readyz", 200).await;
    wait_status(two.local_addr(), "/readyz", 200).await;
    // Both nodes subscribed the room again on the new server.
    redis.wait_numsub("room:r", 2).await;
    // The buffered publishes reach the other node once it has resubscribed.
    for i in 0..5 {
        assert_eq!(
            remote.next_room_message().await["content"],
            format!("during-{i}")
        );
    }
    publisher
        .send(json!({"type":"message","roomId":"r","content":"after"}))
        .await;
    assert_eq!(remote.next_room_message().await["content"], "after");
    assert_eq!(health(one.local_addr()).await["redis_dropped_publishes"], 0);
}

#[tokio::test]
async fn a_killed_pubsub_connection_is_recovered() {
    let redis = RedisServer::start().await;
    let one = start_on_redis(&redis, "one", |_| {}).await;
    let two = start_on_redis(&redis, "two", |_| {}).await;
    let mut a = Client::connect(one.local_addr()).await;
    let mut b = Client::connect(two.local_addr()).await;
    a.join("r").await;
    b.join("r").await;
    redis.wait_numsub("room:r", 2).await;

    let killed = redis.kill_pubsub_clients().await;
    assert!(killed >= 2, "killed {killed} pub/sub connections");
    redis.wait_numsub("room:r", 2).await;
    a.send(json!({"type":"message","roomId":"r","content":"still connected"}))
        .await;
    assert_eq!(b.next_room_message().await["content"], "still connected");
    // The loss is counted where operators look.
    for node in [&one, &two] {
        let lost = metric(
            node.local_addr(),
            "volley_redis_subscriber_disconnects_total",
        )
        .await;
        assert_eq!(lost, 1, "one lost pub/sub connection per node");
    }
}

#[tokio::test]
async fn a_node_without_redis_serves_locally_and_is_not_ready() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    drop(redis);
    let node = start(move |c| {
        c.redis.url = url;
        c.redis.probe_interval_ms = 100;
    })
    .await;
    let addr = node.local_addr();
    wait_status(addr, "/readyz", 503).await;
    let mut c = Client::connect(addr).await;
    c.join("r").await;
    c.send(json!({"type":"message","roomId":"r","content":"local"}))
        .await;
    assert_eq!(c.next_room_message().await["content"], "local");
    assert_eq!(health(addr).await["broker"], "redis");
}

#[tokio::test]
async fn publishes_past_the_outage_buffer_are_refused_and_nothing_taken_is_dropped() {
    let mut redis = RedisServer::start().await;
    let port = redis.port;
    let (one, _two, mut publisher, mut remote) = two_nodes_sharing_a_room(&redis, |c| {
        c.redis.outage_buffer = 3;
        c.redis.max_pipeline = 1;
    })
    .await;

    redis.kill();
    wait_status(one.local_addr(), "/readyz", 503).await;
    for i in 0..10 {
        publisher
            .send(json!({"type":"message","roomId":"r","content":i}))
            .await;
    }
    // Each publish is either taken (served locally, queued for Redis) or refused with an error.
    let mut taken = Vec::new();
    let mut refused = 0;
    while taken.len() + refused < 10 {
        let m = publisher.next_message().await;
        match m["type"].as_str() {
            Some("message") => taken.push(m["content"].clone()),
            Some("error") => {
                assert_eq!(m["code"], "overloaded", "{m}");
                refused += 1;
            }
            _ => {}
        }
    }
    assert_eq!(
        taken.len(),
        3,
        "the bound is redis.outage_buffer: {taken:?}"
    );

    let redis = RedisServer::start_on(port).await;
    redis.wait_numsub("room:r", 2).await;
    // The outage buffer held three: the first three taken arrive, in order...
    for expected in &taken[..3] {
        assert_eq!(remote.next_room_message().await["content"], *expected);
    }
    // ...and nothing else from the outage: the next message is a fresh one.
    publisher
        .send(json!({"type":"message","roomId":"r","content":"after"}))
        .await;
    assert_eq!(remote.next_room_message().await["content"], "after");
    // Nothing accepted was thrown away to make room.
    let h = health(one.local_addr()).await;
    assert_eq!(h["redis_dropped_publishes"], 0, "{h}");
}

#[tokio::test]
async fn a_class_publish_window_holds_its_rooms_while_others_go_at_once() {
    // Chat publishes as soon as it can; `scores:*` gathers for 1 s before its pipeline.
    let windows = |c: &mut volley::Config| {
        c.batch.publish_window_ms = 0;
        c.batch.delivery_window_ms = 0;
        c.rooms = vec![volley::config::RoomClass {
            pattern: "scores:*".into(),
            publish_window_ms: Some(1000),
            ..Default::default()
        }];
    };
    let redis = RedisServer::start().await;
    let one = start_on_redis(&redis, "one", windows).await;
    let two = start_on_redis(&redis, "two", windows).await;
    let mut remote = Client::connect(two.local_addr()).await;
    remote.join("scores:1").await;
    remote.join("lobby").await;
    redis.wait_numsub("room:scores:1", 1).await;
    redis.wait_numsub("room:lobby", 1).await;
    let mut publisher = Client::connect(one.local_addr()).await;
    publisher
        .send_burst(&[
            json!({"type":"message","roomId":"scores:1","content":"goal"}),
            json!({"type":"message","roomId":"lobby","content":"hi"}),
        ])
        .await;
    // Published second, the chat line crosses first: the score waits for its window.
    assert_eq!(remote.next_room_message().await["content"], "hi");
    assert_eq!(remote.next_room_message().await["content"], "goal");
}
