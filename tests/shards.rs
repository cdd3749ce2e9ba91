//! Independent Redis shards (`redis.shards`): rooms spread over three standalone Redis
//! servers by rendezvous hashing, every node agreeing; each room's traffic stays on its
//! shard; killing one shard affects only its rooms, which recover when it returns.

mod common;

use common::*;
use serde_json::json;
use volley::broker::routed::pick;

#[tokio::test]
async fn rooms_live_on_their_shard_and_one_shard_down_stops_only_its_rooms() {
    let mut shards = [
        RedisServer::start().await,
        RedisServer::start().await,
        RedisServer::start().await,
    ];
    let urls: Vec<String> = shards.iter().map(|s| s.url()).collect();
    // One room per shard.
    let mut rooms = vec![String::new(); 3];
    for n in 0.. {
        let room = format!("match-{n}");
        let shard = pick(&urls, &room);
        if rooms[shard].is_empty() {
            rooms[shard] = room;
        }
        if rooms.iter().all(|r| !r.is_empty()) {
            break;
        }
    }
    let sharded = |id: &'static str| {
        let urls = urls.clone();
        move |c: &mut volley::Config| {
            c.redis.shards = urls;
            c.server.node_id = id.into();
            c.redis.probe_interval_ms = 100;
            c.redis.recovery_wait_ms = 2_000;
            c.limits.publish_rate = 0;
        }
    };
    let one = start(sharded("one")).await;
    let two = start(sharded("two")).await;
    let mut publisher = Client::connect(one.local_addr()).await;
    let mut remote = Client::connect(two.local_addr()).await;
    for room in &rooms {
        remote.join(room).await;
    }
    for (i, room) in rooms.iter().enumerate() {
        shards[i].wait_numsub(&format!("room:{room}"), 1).await;
        for (j, other) in shards.iter().enumerate() {
            if j != i {
                assert_eq!(
                    other.numsub(&format!("room:{room}")).await,
                    0,
                    "{room} only on its shard"
                );
            }
        }
    }
    wait_status(one.local_addr(), "/readyz", 200).await;
    for room in &rooms {
        publisher
            .send(json!({"type":"message","roomId":room,"content":"first"}))
            .await;
        let m = remote.next_room_message().await;
        assert_eq!(
            (
                m["roomId"].as_str().unwrap(),
                m["content"].as_str().unwrap()
            ),
            (room.as_str(), "first")
        );
    }

    // Shard 0 goes away: its room stops crossing nodes, the other two carry on.
    let port = shards[0].port;
    shards[0].kill();
    wait_status(one.local_addr(), "/readyz", 503).await;
    for room in &rooms[1..] {
        publisher
            .send(json!({"type":"message","roomId":room,"content":"during"}))
            .await;
        let m = remote.next_room_message().await;
        assert_eq!(
            (
                m["roomId"].as_str().unwrap(),
                m["content"].as_str().unwrap()
            ),
            (room.as_str(), "during")
        );
    }
    // Back: its room is subscribed again and delivers.
    shards[0] = RedisServer::start_on(port).await;
    shards[0]
        .wait_numsub(&format!("room:{}", rooms[0]), 1)
        .await;
    wait_status(one.local_addr(), "/readyz", 200).await;
    wait_status(two.local_addr(), "/readyz", 200).await;
    publisher
        .send(json!({"type":"message","roomId":rooms[0],"content":"after"}))
        .await;
    let m = remote.next_room_message().await;
    assert_eq!(
        (
            m["roomId"].as_str().unwrap(),
            m["content"].as_str().unwrap()
        ),
        (rooms[0].as_str(), "after")
    );
}

#[tokio::test]
async fn the_cluster_view_shows_every_node_from_the_first_shard() {
    let shards = [RedisServer::start().await, RedisServer::start().await];
    let urls: Vec<String> = shards.iter().map(|s| s.url()).collect();
    let sharded = |id: &'static str| {
        let urls = urls.clone();
        move |c: &mut volley::Config| {
            c.redis.shards = urls;
            c.server.node_id = id.into();
            c.metrics.report_s = 1;
        }
    };
    let one = start(sharded("one")).await;
    let two = start(sharded("two")).await;
    for node in [&one, &two] {
        wait_status(node.local_addr(), "/readyz", 200).await;
        cluster_view(node.local_addr(), &["one", "two"]).await;
    }
    // The reports live on the first shard (the home of what is not a room).
    let mut conn = shards[0].conn().await;
    let ids: Vec<String> = redis::cmd("SMEMBERS")
        .arg("volley:nodes")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ids.len(), 2, "{ids:?}");
    let mut conn = shards[1].conn().await;
    let elsewhere: i64 = redis::cmd("EXISTS")
        .arg("volley:nodes")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(elsewhere, 0);
}
