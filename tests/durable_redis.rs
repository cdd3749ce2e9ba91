//! Durable rooms on Redis streams, beyond the contract every engine keeps
//! (`tests/engines.rs`): the stream under the reference servers' key with three nodes,
//! `recovered:false` after trimming and after the stream is lost, and no message lost or
//! doubled when pub/sub connections are killed, pipelines cut, answers lost, or Redis
//! restarted in the middle of a stream.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use volley::config::RoomClass;
use volley::Config;

#[tokio::test]
async fn three_nodes_see_one_order_with_offsets_counting_up_by_one() {
    let redis = RedisServer::start().await;
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        nodes.push(start_on_redis(&redis, id, durable(1000)).await);
    }
    let mut subscribers = Vec::new();
    for node in &nodes {
        let mut c = Client::connect(node.local_addr()).await;
        c.join("scores:final").await;
        subscribers.push(c);
    }
    redis.wait_numsub("room:scores:final", 3).await;
    let addrs: Vec<_> = nodes.iter().map(|n| n.local_addr()).collect();
    publish_and_expect_one_order(&addrs, &mut subscribers, "scores:final").await;
    // The stream holds the same frames, under the reference servers' key and field.
    let mut conn = redis.conn().await;
    let len: u64 = redis::cmd("XLEN")
        .arg("stream:scores:final")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 90);
}

#[tokio::test]
async fn trimmed_or_lost_history_says_recovered_false() {
    let redis = RedisServer::start().await;
    let node = start_on_redis(&redis, "one", durable(5)).await;
    let addr = node.local_addr();
    let mut c = Client::connect(addr).await;
    join_with(&mut c, "scores:x", json!({"history":1})).await;
    let mut epoch = String::new();
    for n in 1..=20 {
        api_publish(addr, &json!({"roomId":"scores:x","content":n})).await;
    }
    while c.next_durable_message(&mut epoch).await["offset"] != 20 {}
    let mut trimmed = Client::connect(addr).await;
    let h = join_with(
        &mut trimmed,
        "scores:x",
        json!({"since":{"offset":2,"epoch":epoch}}),
    )
    .await;
    assert_eq!(h["recovered"], false);
    assert_eq!(offsets(&h["messages"]), vec![16, 17, 18, 19, 20]);

    // The room's history is lost (a flushed Redis, an expired TTL): a new epoch.
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("DEL")
        .arg("stream:scores:x")
        .arg("stream:scores:x:position")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut after = Client::connect(addr).await;
    let h = join_with(
        &mut after,
        "scores:x",
        json!({"since":{"offset":20,"epoch":epoch}}),
    )
    .await;
    assert_eq!(h["recovered"], false);
    assert_ne!(h["epoch"], epoch.as_str(), "a new epoch");
    assert_eq!(offsets(&h["messages"]), Vec::<u64>::new());
    // The read created nothing in place of what was lost.
    let exists: u64 = redis::cmd("EXISTS")
        .arg("stream:scores:x")
        .arg("stream:scores:x:position")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0);
}

#[tokio::test]
async fn killed_pubsub_connections_lose_nothing_of_a_durable_room() {
    let redis = RedisServer::start().await;
    let one = start_on_redis(&redis, "one", durable(10_000)).await;
    let two = start_on_redis(&redis, "two", durable(10_000)).await;
    let mut subscriber = Client::connect(two.local_addr()).await;
    subscriber.join("scores:live").await;
    redis.wait_numsub("room:scores:live", 1).await;
    let addr = one.local_addr();
    let feed = tokio::spawn(async move {
        let mut publisher = Client::connect(addr).await;
        for seq in 0..300u64 {
            publisher
                .send(json!({"type":"message","roomId":"scores:live","content":{"seq":seq}}))
                .await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let mut seen = Vec::new();
    let mut killed = false;
    while seen.len() < 300 {
        let m = subscriber.next_room_message().await;
        seen.push(m["offset"].as_u64().unwrap());
        if seen.len() == 50 && !killed {
            killed = true;
            let n = redis.kill_pubsub_clients().await;
            assert!(n >= 2, "killed {n} pub/sub connections");
        }
    }
    feed.await.unwrap();
    assert_eq!(
        seen,
        (1..=300).collect::<Vec<_>>(),
        "every message once, in order"
    );
}

/// Appends messages to a durable room's stream the way the publish script does, but
/// without publishing them: what a node that missed them on pub/sub sees.
async fn append_unpublished(
    redis: &RedisServer,
    room: &str,
    offsets: std::ops::RangeInclusive<u64>,
) {
    let mut conn = redis.conn().await;
    let last = *offsets.end();
    for offset in offsets {
        let frame = format!(
            r#"{{"type":"message","roomId":"{room}","content":{offset},"timestamp":1,"offset":{offset}}}"#
        );
        let _: String = redis::cmd("XADD")
            .arg(format!("stream:{room}"))
            .arg(format!("{offset}-1"))
            .arg("data")
            .arg(frame)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("HSET")
        .arg(format!("stream:{room}:position"))
        .arg("offset")
        .arg(last)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn missed_messages_are_read_back_from_the_stream_in_order() {
    let redis = RedisServer::start().await;
    let one = start_on_redis(&redis, "one", durable(10_000)).await;
    let two = start_on_redis(&redis, "two", durable(10_000)).await;
    let mut subscriber = Client::connect(two.local_addr()).await;
    subscriber.join("scores:gap").await;
    redis.wait_numsub("room:scores:gap", 1).await;
    for n in 1..=3 {
        api_publish(
            one.local_addr(),
            &json!({"roomId":"scores:gap","content":n}),
        )
        .await;
    }
    for n in 1..=3u64 {
        assert_eq!(subscriber.next_room_message().await["offset"], n);
    }
    // Lost on pub/sub with nothing after them: the periodic position check finds them.
    append_unpublished(&redis, "scores:gap", 4..=7).await;
    for n in 4..=7u64 {
        assert_eq!(subscriber.next_room_message().await["offset"], n);
    }
    // Lost, then a message that shows the gap: the gap is filled before it.
    append_unpublished(&redis, "scores:gap", 8..=9).await;
    api_publish(
        one.local_addr(),
        &json!({"roomId":"scores:gap","content":10}),
    )
    .await;
    for n in 8..=10u64 {
        assert_eq!(subscriber.next_room_message().await["offset"], n);
    }
    let h = health(two.local_addr()).await;
    assert!(h["redis_repairs"].as_u64() >= Some(2), "{h}");
}

#[tokio::test]
async fn a_pipeline_cut_off_before_redis_ran_it_is_sent_again_and_nothing_doubles() {
    let redis = RedisServer::start().await;
    // The append leaves at once (no publish window), and no probe is judged in the
    // moment Redis holds it: a probe lost to the pause would make the node hold its
    // publishes instead of sending them.
    let quick = |c: &mut Config| {
        durable(1000)(c);
        c.batch.publish_window_ms = 0;
        c.redis.probe_interval_ms = 1000;
    };
    let one = start_on_redis(&redis, "one", quick).await;
    let two = start_on_redis(&redis, "two", quick).await;
    wait_status(one.local_addr(), "/readyz", 200).await;
    wait_status(two.local_addr(), "/readyz", 200).await;
    let mut remote = Client::connect(two.local_addr()).await;
    let history = join_with(&mut remote, "scores:cut", json!({"history": 1})).await;
    assert_eq!(history["messages"], json!([]));
    redis.wait_numsub("room:scores:cut", 1).await;
    let mut publisher = Client::connect(one.local_addr()).await;
    let say = |content: &str| json!({"type":"message","roomId":"scores:cut","content":content});
    publisher.send(say("a")).await;
    assert_eq!(remote.next_room_message().await["content"], "a");

    // Redis takes the next pipeline but holds it unrun (CLIENT PAUSE WRITE); then the
    // connection is cut: the node never learns whether it ran. It did not.
    let mut admin = redis.conn().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(10_000)
        .arg("WRITE")
        .query_async(&mut admin)
        .await
        .unwrap();
    publisher.send(say("b")).await;
    publisher.send(say("c")).await;
    let held = tokio::time::timeout(WAIT, async {
        loop {
            let clients: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query_async(&mut admin)
                .await
                .unwrap();
            if clients
                .lines()
                .any(|c| c.contains("flags=b ") && c.contains("cmd=eval"))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(held.is_ok(), "the durable append never reached Redis");
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut admin)
        .await
        .unwrap();

    // Sent again with the stream check once Redis answers: b and c arrive, once each,
    // and the room's offsets go on without a gap.
    publisher.send(say("d")).await;
    let mut seen = Vec::new();
    while seen.last().map(|(c, _): &(String, u64)| c.as_str()) != Some("d") {
        let m = remote.next_room_message().await;
        seen.push((
            m["content"].as_str().unwrap().to_string(),
            m["offset"].as_u64().unwrap(),
        ));
    }
    let want: Vec<(String, u64)> = [("b", 2), ("c", 3), ("d", 4)]
        .iter()
        .map(|(c, o)| (c.to_string(), *o))
        .collect();
    assert_eq!(seen, want);
}

#[tokio::test]
async fn a_durable_append_whose_answer_was_lost_is_checked_not_doubled() {
    let redis = RedisServer::start().await;
    let one = start_on_redis(&redis, "one", durable(1000)).await;
    let two = start_on_redis(&redis, "two", durable(1000)).await;
    wait_status(one.local_addr(), "/readyz", 200).await;
    wait_status(two.local_addr(), "/readyz", 200).await;
    let mut remote = Client::connect(two.local_addr()).await;
    let history = join_with(&mut remote, "scores:slow", json!({"history": 1})).await;
    assert_eq!(history["messages"], json!([]));
    redis.wait_numsub("room:scores:slow", 1).await;
    let mut publisher = Client::connect(one.local_addr()).await;
    let say = |content: &str| json!({"type":"message","roomId":"scores:slow","content":content});
    publisher.send(say("a")).await;
    assert_eq!(remote.next_room_message().await["content"], "a");

    // Redis sleeps past the node's 5 s reply timeout: the node loses the answer to the
    // append of "b", which Redis runs when it wakes. Sent again with the stream check, it
    // is skipped.
    let stall = redis.stall(6).await;
    publisher.send(say("b")).await;
    stall.await.unwrap();
    publisher.send(say("c")).await;
    let mut seen = Vec::new();
    while seen.last().map(|(c, _): &(String, u64)| c.as_str()) != Some("c") {
        let m = remote.next_room_message().await;
        seen.push((
            m["content"].as_str().unwrap().to_string(),
            m["offset"].as_u64().unwrap(),
        ));
    }
    assert_eq!(seen, vec![("b".to_string(), 2), ("c".to_string(), 3)]);
    let metrics = http(one.local_addr(), "GET", "/metrics", &[], b"").await.1;
    assert!(
        metrics.contains("volley_redis_publish_failures_total 1"),
        "the answer was lost once: {metrics}"
    );
}

/// The keys Redis holds for durable rooms (streams and their positions).
async fn stream_keys(redis: &RedisServer) -> Vec<String> {
    let mut conn = redis.conn().await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("stream:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    keys.sort();
    keys
}

#[tokio::test]
async fn reads_create_nothing_and_history_ids_are_checked_as_joins_are() {
    let redis = RedisServer::start().await;
    let node = start_on_redis(&redis, "one", |c| {
        durable(1000)(c);
        c.limits.join_rate = 0;
        c.limits.max_rooms_per_socket = 1000;
        c.limits.notices = false;
        c.batch.delivery_window_ms = 0;
    })
    .await;
    let addr = node.local_addr();
    // 150 anonymous joins with history (and since) on made-up durable room ids.
    let mut c = Client::connect(addr).await;
    for i in 0..150 {
        let replay = if i % 2 == 0 {
            json!({"history": 10})
        } else {
            json!({"since": {"offset": 3, "epoch": "made-up"}})
        };
        let h = join_with(&mut c, &format!("scores:nobody-{i}"), replay).await;
        assert_eq!(h["epoch"], "", "{h}");
        assert_eq!(h["messages"], json!([]), "{h}");
        if i % 2 == 1 {
            assert_eq!(
                h["recovered"], false,
                "a position in an epoch that is not there"
            );
        }
    }
    // A since from epoch "" (the room had no history then, and still has none) missed
    // nothing.
    let h = join_with(
        &mut c,
        "scores:still-nobody",
        json!({"since": {"offset": 0, "epoch": ""}}),
    )
    .await;
    assert_eq!(h["recovered"], true, "{h}");
    let key = ("Authorization", "apikey test-key");
    let (status, body) = http(addr, "GET", "/api/history/scores%3Aghost", &[key], b"").await;
    assert_eq!(status, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (h["epoch"].clone(), h["messages"].clone()),
        (json!(""), json!([]))
    );
    let (status, _) = http(
        addr,
        "GET",
        "/api/history/scores%3Aghost?since=4",
        &[key],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        stream_keys(&redis).await,
        Vec::<String>::new(),
        "a read wrote"
    );

    // Ids no join would take are refused before anything is read.
    let long = format!("/api/history/scores%3A{}", "x".repeat(300));
    for path in [long.as_str(), "/api/history/scores%3A%ff", "/api/history/"] {
        let (status, body) = http(addr, "GET", path, &[key], b"").await;
        assert_eq!(status, 400, "{path}: {body}");
        let e: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(e["error"], "invalid_field", "{path}: {body}");
    }
    assert_eq!(stream_keys(&redis).await, Vec::<String>::new());
    // A publish is what makes a history.
    api_publish(addr, &json!({"roomId":"scores:real","content":1})).await;
    redis.wait_answer(&["XLEN", "stream:scores:real"], 1).await;
    assert_eq!(
        stream_keys(&redis).await,
        ["stream:scores:real", "stream:scores:real:position"]
    );
}

/// How a durable room's history is lost under its live subscribers.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// redis-server SIGKILLed and started again, empty.
    Restart,
    /// Nothing published for the class's `history_ttl_s`: Redis expires the room.
    Expiry,
}

/// A subscriber on node one that has seen `seen` messages of a durable room published on
/// node two; the room's history is lost (`loss`); three more are published. The
/// subscriber gets `epoch_changed` with the new epoch, then all three, offsets 1, 2, 3,
/// and the stream holds the three.
async fn epoch_change_loses_nothing(loss: Loss, seen: u64) {
    let mut redis = RedisServer::start().await;
    let ttl = match loss {
        Loss::Restart => 3600,
        Loss::Expiry => 1,
    };
    let class = move |c: &mut Config| {
        c.limits.publish_rate = 0;
        c.rooms = vec![RoomClass {
            pattern: "scores:*".into(),
            history_size: 100,
            history_ttl_s: ttl,
            ..Default::default()
        }];
    };
    let one = start_on_redis(&redis, "one", class).await;
    let two = start_on_redis(&redis, "two", class).await;
    let two_addr = two.local_addr();
    let publish = move |content: serde_json::Value| async move {
        let (status, body) =
            api_publish(two_addr, &json!({"roomId":"scores:e","content":content})).await;
        assert_eq!(status, 200, "{body}");
    };
    let mut epoch = String::new();
    let mut sub = Client::connect(one.local_addr()).await;
    if seen == 0 {
        // The room has a history the subscriber knows the epoch of, but no message of
        // it reached the subscriber live.
        publish(json!("before")).await;
        redis.wait_answer(&["XLEN", "stream:scores:e"], 1).await;
        let h = join_with(&mut sub, "scores:e", json!({"history": 0})).await;
        epoch = h["epoch"].as_str().unwrap().to_string();
        assert!(!epoch.is_empty());
    } else {
        let h = join_with(&mut sub, "scores:e", json!({"history": 1})).await;
        assert_eq!(h["epoch"], "");
    }
    redis.wait_numsub("room:scores:e", 1).await;
    for n in 1..=seen {
        publish(json!({"old": n})).await;
        let m = sub.next_durable_message(&mut epoch).await;
        assert_eq!(
            (m["offset"].as_u64(), m["content"].clone()),
            (Some(n), json!({"old": n}))
        );
    }
    let old = epoch.clone();
    match loss {
        Loss::Restart => {
            redis.restart().await;
            for node in [&one, &two] {
                wait_status(node.local_addr(), "/readyz", 200).await;
            }
        }
        Loss::Expiry => {
            redis
                .wait_answer(&["EXISTS", "stream:scores:e:position"], 0)
                .await;
        }
    }
    for n in 1..=3 {
        publish(json!({"new": n})).await;
    }
    // Told first, then every message of the new epoch.
    let told = sub.next_message().await;
    let told = match told["type"].as_str() {
        Some("user_joined") => sub.next_message().await,
        _ => told,
    };
    assert_eq!(
        told["type"], "epoch_changed",
        "{loss:?}, {seen} seen: {told}"
    );
    assert_eq!(told["roomId"], "scores:e");
    let new = told["epoch"].as_str().unwrap().to_string();
    assert!(!new.is_empty() && new != old, "{old} -> {new}");
    for n in 1..=3u64 {
        let m = sub.next_message().await;
        assert_eq!(
            (
                m["type"].as_str(),
                m["offset"].as_u64(),
                m["content"].clone()
            ),
            (Some("message"), Some(n), json!({"new": n})),
            "{loss:?}, {seen} seen"
        );
    }
    let mut conn = redis.conn().await;
    let len: u64 = redis::cmd("XLEN")
        .arg("stream:scores:e")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 3);
    // A client that comes back from there recovers.
    let mut back = Client::connect(one.local_addr()).await;
    let h = join_with(
        &mut back,
        "scores:e",
        json!({"since": {"offset": 1, "epoch": new}}),
    )
    .await;
    assert_eq!(
        (h["recovered"].clone(), offsets(&h["messages"])),
        (json!(true), vec![2, 3])
    );
}

#[tokio::test]
async fn a_restarted_redis_loses_no_accepted_message_whatever_was_seen_before() {
    for seen in [0, 1, 5] {
        epoch_change_loses_nothing(Loss::Restart, seen).await;
    }
}

#[tokio::test]
async fn an_expired_history_loses_no_accepted_message_whatever_was_seen_before() {
    for seen in [0, 1, 5] {
        epoch_change_loses_nothing(Loss::Expiry, seen).await;
    }
}

/// What a replaced engine hands over may be all there is: the last publishes before a
/// failover, with nothing published after. The engine taking over sends them at once,
/// without waiting for another publish to wake it.
#[tokio::test]
async fn durable_messages_handed_over_alone_are_appended_at_once() {
    use std::sync::Arc;
    use volley::broker::redis::EngineOptions;
    use volley::broker::{Envelope, Kind, RedisBroker, Target};
    use volley::config::Durability;
    use volley::protocol::Encoded;

    let redis = RedisServer::start().await;
    let config = common::config();
    let options = EngineOptions {
        gated: true,
        ..EngineOptions::standalone(&config, &redis.url()).unwrap()
    };
    let engine: Arc<RedisBroker> = RedisBroker::start_with(&config, options).unwrap();
    let durable = Kind::Durable(Durability {
        history_size: 100,
        ttl: Duration::from_secs(3600),
        board: None,
    });
    let handed_over: Vec<Envelope> = (1..=3)
        .map(|n| {
            Envelope::new(
                Arc::from(config.server.node_id.as_str()),
                Target::Room(Arc::from("scores:alone")),
                Encoded::from_json(
                    format!(r#"{{"type":"message","roomId":"scores:alone","content":{n}}}"#)
                        .as_bytes(),
                ),
                durable,
            )
        })
        .collect();
    engine.publish_doubtful(&handed_over);
    engine.open_gate();
    redis.wait_answer(&["XLEN", "stream:scores:alone"], 3).await;
}
