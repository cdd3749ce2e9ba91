//! Redis Cluster (`redis.cluster_nodes`): a real 3-master cluster (`redis-server
//! --cluster-enabled yes` x3 + `redis-cli --cluster create`). Rooms on all three shards
//! cross volley nodes through sharded pub/sub on their own master only; durable rooms
//! keep their stream on their slot's master; a resharding of a room's slot during
//! traffic keeps delivering.

mod common;

use std::time::Duration;

use common::topologies::*;
use common::*;
use serde_json::{json, Value as Value2};
use volley::broker::redis::Keys;
use volley::config::RoomClass;
use volley::{Config, Server};

/// What a subscriber saw of a plain and a durable room: seqs in arrival order, and the
/// durable room's offsets (its `"end"` included).
struct Seen {
    plain: Vec<u64>,
    durable: Vec<u64>,
    offsets: Vec<u64>,
}

/// Feeds `count` messages (then `"end"`) into each of the (plain, durable) rooms from
/// `addr`, paced, reads both on `remote` until both ends, and runs `disrupt` once the
/// durable room has delivered 60. Delivery must finish within 30 s.
async fn feed_and_disrupt(
    addr: std::net::SocketAddr,
    remote: &mut Client,
    (plain, durable): (&str, &str),
    count: u64,
    disrupt: impl std::future::Future<Output = ()>,
) -> Seen {
    let pause = Duration::from_millis(30);
    let feeds = [plain, durable].map(|room| {
        let room: &'static str = Box::leak(room.to_string().into_boxed_str());
        spawn_paced_feed(addr, room, count, pause)
    });
    let mut seen = Seen {
        plain: Vec::new(),
        durable: Vec::new(),
        offsets: Vec::new(),
    };
    let mut disrupt = Some(disrupt);
    let mut ends = 0;
    let received = tokio::time::timeout(Duration::from_secs(30), async {
        while ends < 2 {
            let m = remote.next_room_message().await;
            let is_durable = m["roomId"] == json!(durable);
            if is_durable {
                seen.offsets.push(m["offset"].as_u64().expect("an offset"));
            }
            if m["content"] == "end" {
                ends += 1;
                continue;
            }
            let seq = m["content"]["seq"].as_u64().expect("a seq");
            if is_durable {
                seen.durable.push(seq);
            } else {
                seen.plain.push(seq);
            }
            if seen.durable.len() >= 60 {
                if let Some(disrupt) = disrupt.take() {
                    disrupt.await;
                }
            }
        }
    })
    .await;
    assert!(
        received.is_ok(),
        "delivery stopped after the disruption: plain {} durable {} of {count}",
        seen.plain.len(),
        seen.durable.len()
    );
    assert!(disrupt.is_none(), "the disruption never ran");
    for feed in feeds {
        feed.await.unwrap();
    }
    seen
}

/// A node's `volley_redis_cluster_changes_total`: slot maps it followed after the first.
async fn cluster_changes(addr: std::net::SocketAddr) -> u64 {
    metric(addr, "volley_redis_cluster_changes_total").await
}

/// A plain room through a disruption: no message twice, and its last ones arrived
/// (at most once: some in between may be missing).
fn assert_kept_delivering(seen: &[u64], count: u64) {
    let mut unique = seen.to_vec();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "no duplicates in the plain room");
    assert!(
        seen.iter().any(|seq| *seq > count - 20),
        "the plain room's last messages arrived: {seen:?}"
    );
}

fn on_cluster(cluster: &RedisCluster, id: &'static str) -> impl FnOnce(&mut Config) {
    let urls = cluster.urls();
    move |c: &mut Config| {
        c.redis.cluster_nodes = urls;
        c.server.node_id = id.into();
        c.redis.probe_interval_ms = 100;
        c.limits.publish_rate = 0;
        c.rooms = vec![RoomClass {
            pattern: "ledger-*".into(),
            history_size: 10_000,
            history_ttl_s: 3600,
            ..Default::default()
        }];
    }
}

async fn two_nodes(cluster: &RedisCluster) -> (Server, Server) {
    let one = start(on_cluster(cluster, "one")).await;
    let two = start(on_cluster(cluster, "two")).await;
    wait_status(one.local_addr(), "/readyz", 200).await;
    wait_status(two.local_addr(), "/readyz", 200).await;
    (one, two)
}

#[tokio::test]
async fn rooms_on_all_three_shards_cross_nodes_through_their_own_master_only() {
    let cluster = RedisCluster::start().await;
    let (one, two) = two_nodes(&cluster).await;
    let plain = cluster.one_room_per_master("match").await;
    let durable = cluster.one_room_per_master("ledger").await;
    let mut remote = Client::connect(two.local_addr()).await;
    for (room, _) in &plain {
        remote.join(room).await;
    }
    for (room, _) in &durable {
        let history = join_with(&mut remote, room, json!({"history": 10})).await;
        assert_eq!(history["messages"], json!([]), "{history}");
        remote.expect_type("user_joined").await;
    }
    // Each master has exactly its own rooms' channels subscribed.
    for master in 0..3 {
        let expected: Vec<String> = {
            let mut v = vec![
                format!("room:{{{}}}", durable[master].0),
                format!("room:{{{}}}", plain[master].0),
            ];
            v.sort();
            v
        };
        let waited = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if cluster.shard_channels(master, "room:*").await == expected {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "master {master}: {:?}, want {expected:?}",
            cluster.shard_channels(master, "room:*").await
        );
    }
    let publishes_before: Vec<u64> = {
        let mut v = Vec::new();
        for master in 0..3 {
            v.push(cluster.calls(master, "publish").await);
        }
        v
    };

    let mut publisher = Client::connect(one.local_addr()).await;
    for (room, _) in plain.iter().chain(&durable) {
        for seq in 0..3 {
            publisher
                .send(json!({"type":"message","roomId":room,"content":{"seq":seq}}))
                .await;
        }
    }
    // Order holds per room (rooms on different masters interleave).
    let mut by_room: std::collections::BTreeMap<String, Vec<(Value2, Value2)>> = Default::default();
    for _ in 0..18 {
        let m = remote.next_room_message().await;
        let room = m["roomId"].as_str().expect("a room").to_string();
        by_room
            .entry(room)
            .or_default()
            .push((m["content"].clone(), m["offset"].clone()));
    }
    for (room, _) in plain.iter().chain(&durable) {
        let want: Vec<(Value2, Value2)> = (0..3u64)
            .map(|seq| {
                let offset = if room.starts_with("ledger") {
                    json!(seq + 1)
                } else {
                    Value2::Null
                };
                (json!({"seq":seq}), offset)
            })
            .collect();
        assert_eq!(by_room.get(room), Some(&want), "{room}");
    }
    // A durable room's stream lives on its slot's master, whole.
    for (master, (room, _)) in durable.iter().enumerate() {
        let len: u64 = redis::cmd("XLEN")
            .arg(format!("stream:{{{room}}}"))
            .query_async(&mut cluster.servers[master].conn().await)
            .await
            .unwrap();
        assert_eq!(len, 3, "{room} on master {master}");
    }
    // No plain PUBLISH (which a cluster copies to every node) carried any of it.
    for (master, before) in publishes_before.iter().enumerate() {
        assert_eq!(
            cluster.calls(master, "publish").await,
            *before,
            "master {master}"
        );
        assert!(
            cluster.calls(master, "spublish").await > 0,
            "master {master}"
        );
    }

    // Broadcasts and presence have their home master, and reach the other node.
    let (status, _) = api_publish(one.local_addr(), &json!({"broadcast":{"notice":"all"}})).await;
    assert_eq!(status, 200);
    assert_eq!(remote.next_frame().await, r#"{"notice":"all"}"#);
    assert_eq!(cluster_changes(two.local_addr()).await, 0);
}

#[tokio::test]
async fn a_resharding_during_traffic_keeps_delivering() {
    let cluster = RedisCluster::start().await;
    let (one, two) = two_nodes(&cluster).await;
    // A plain and a durable room on master 0, both moved to master 1 mid-feed.
    let plain = cluster.one_room_per_master("ticker").await.remove(0);
    let durable = cluster.one_room_per_master("ledger").await.remove(0);
    let mut remote = Client::connect(two.local_addr()).await;
    remote.join(&plain.0).await;
    let history = join_with(&mut remote, &durable.0, json!({"history": 10})).await;
    assert_eq!(history["messages"], json!([]));
    for (room, _) in [&plain, &durable] {
        let channel = format!("room:{{{room}}}");
        let waited = tokio::time::timeout(Duration::from_secs(5), async {
            while cluster.shard_channels(0, &channel).await.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "{channel} never subscribed on master 0");
    }

    let count = 300u64;
    let moving = async {
        cluster.move_slot(plain.1, 0, 1).await;
        cluster.move_slot(durable.1, 0, 1).await;
    };
    let seen = feed_and_disrupt(
        one.local_addr(),
        &mut remote,
        (&plain.0, &durable.0),
        count,
        moving,
    )
    .await;
    let (plain_seen, durable_seen) = (seen.plain, seen.durable);
    // The durable room lost nothing and repeated nothing.
    let mut sorted = durable_seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, (0..count).collect::<Vec<_>>(), "durable room");
    assert_eq!(durable_seen.len() as u64, count, "no duplicates");
    // The plain room kept delivering after the move, without duplicates.
    assert_kept_delivering(&plain_seen, count);
    // The rooms now live on master 1, and both nodes followed the new map.
    for (room, _) in [&plain, &durable] {
        let channel = format!("room:{{{room}}}");
        assert_eq!(
            cluster.shard_channels(1, &channel).await,
            vec![channel.clone()]
        );
        assert!(cluster.shard_channels(0, &channel).await.is_empty());
    }
    for node in [&one, &two] {
        assert!(cluster_changes(node.local_addr()).await >= 1);
    }
}

#[tokio::test]
async fn presence_and_direct_messages_live_on_the_home_master() {
    let cluster = RedisCluster::start().await;
    let (one, two) = two_nodes(&cluster).await;
    let home = cluster.owner(volley::broker::redis::slot(b"volley")).await;
    let mut watcher = Client::connect(two.local_addr()).await;
    watcher.send(json!({"type":"subscribe_presence"})).await;
    // The presence channel is subscribed on the home master, by both nodes.
    cluster
        .wait_shardnumsub(home, "{volley}:presence:updates", 2)
        .await;

    let mut alice = Client::connect(one.local_addr()).await;
    alice.send(json!({"type":"auth","userId":"alice"})).await;
    assert_eq!(
        alice.next_message().await,
        json!({"type":"authenticated","userId":"alice"})
    );
    let connected = watcher.expect_type("presence").await;
    assert_eq!(
        (connected["event"].clone(), connected["userId"].clone()),
        (json!("connected"), json!("alice"))
    );
    watcher.send(json!({"type":"get_online_users"})).await;
    let listed = watcher.expect_type("online_users").await;
    assert_eq!(listed["users"][0]["userId"], "alice", "{listed}");
    assert_eq!(listed["users"][0]["serverId"], "one", "{listed}");
    let exists: i64 = redis::cmd("EXISTS")
        .arg("{volley}:presence:alice")
        .query_async(&mut cluster.servers[home].conn().await)
        .await
        .unwrap();
    assert_eq!(exists, 1, "alice's presence hash on the home master");

    // A direct message from the other node reaches her.
    watcher.send(json!({"type":"auth","userId":"bob"})).await;
    watcher.expect_type("authenticated").await;
    watcher
        .send(json!({"type":"direct_message","toUserId":"alice","content":"hi"}))
        .await;
    assert_eq!(
        alice.next_message().await,
        json!({"type":"direct_message","fromUserId":"bob","content":"hi"})
    );
}

#[tokio::test]
async fn a_masters_failover_during_traffic_loses_nothing_of_a_durable_room() {
    let cluster = RedisCluster::start_with(1).await;
    let (one, two) = two_nodes(&cluster).await;
    let keys = Keys::cluster("", "test", "");
    // A durable and a plain room on the same master, and that master's replica.
    let durable = "ledger-f".to_string();
    let master = cluster.owner(keys.room_slot(&durable)).await;
    let mut plain = String::new();
    for n in 0.. {
        let room = format!("ticker-f{n}");
        if cluster.owner(keys.room_slot(&room)).await == master {
            plain = room;
            break;
        }
    }
    let replica = cluster.replica_of(master).await;

    let mut remote = Client::connect(two.local_addr()).await;
    remote.join(&plain).await;
    let history = join_with(&mut remote, &durable, json!({"history": 10})).await;
    assert_eq!(history["messages"], json!([]));
    remote.expect_type("user_joined").await;
    let count = 300u64;
    // The replica takes over, coordinated with its master (CLUSTER FAILOVER).
    let failover = async {
        let _: () = redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .query_async(&mut cluster.servers[replica].conn().await)
            .await
            .unwrap();
    };
    let seen = feed_and_disrupt(
        one.local_addr(),
        &mut remote,
        (&plain, &durable),
        count,
        failover,
    )
    .await;
    let (plain_seen, durable_seen, offsets) = (seen.plain, seen.durable, seen.offsets);
    assert_eq!(
        durable_seen,
        (0..count).collect::<Vec<_>>(),
        "durable room, in order"
    );
    assert_eq!(
        offsets,
        (1..=count + 1).collect::<Vec<_>>(),
        "offsets without a gap"
    );
    assert_kept_delivering(&plain_seen, count);
    // The replica is the room's master now, with the whole history.
    assert_eq!(cluster.owner(keys.room_slot(&durable)).await, replica);
    let len: u64 = redis::cmd("XLEN")
        .arg(format!("stream:{{{durable}}}"))
        .query_async(&mut cluster.servers[replica].conn().await)
        .await
        .unwrap();
    assert_eq!(len, count + 1);
    assert!(cluster_changes(one.local_addr()).await >= 1);
}

#[tokio::test]
async fn a_node_started_before_its_cluster_serves_locally_then_joins_it() {
    let ports: Vec<u16> = (0..3).map(|_| cluster_port()).collect();
    let urls = vec![format!("redis://127.0.0.1:{}", ports[0])];
    let node = |id: &'static str| {
        let urls = urls.clone();
        move |c: &mut Config| {
            c.redis.cluster_nodes = urls;
            c.server.node_id = id.into();
            c.redis.probe_interval_ms = 100;
        }
    };
    let one = start(node("one")).await;
    let two = start(node("two")).await;
    // No cluster yet: not ready, and local sockets are served all the same.
    assert_eq!(
        http(one.local_addr(), "GET", "/readyz", &[], b"").await.0,
        503
    );
    let mut here = Client::connect(one.local_addr()).await;
    here.join("lobby").await;
    let mut also_here = Client::connect(one.local_addr()).await;
    also_here.join("lobby").await;
    also_here
        .send(json!({"type":"message","roomId":"lobby","content":"local"}))
        .await;
    assert_eq!(here.next_room_message().await["content"], "local");

    // The cluster comes up: both nodes read its map and carry the room across.
    let cluster = RedisCluster::start_on(&ports, 0).await;
    wait_status(one.local_addr(), "/readyz", 200).await;
    wait_status(two.local_addr(), "/readyz", 200).await;
    let mut there = Client::connect(two.local_addr()).await;
    there.join("lobby").await;
    let owner = cluster
        .owner(Keys::cluster("", "test", "").room_slot("lobby"))
        .await;
    cluster.wait_shardnumsub(owner, "room:{lobby}", 2).await;
    also_here
        .send(json!({"type":"message","roomId":"lobby","content":"across"}))
        .await;
    assert_eq!(there.next_room_message().await["content"], "across");
}

#[tokio::test]
async fn a_killed_master_stops_the_cluster_and_what_was_published_meanwhile_arrives_after() {
    let mut cluster = RedisCluster::start().await;
    let (one, two) = two_nodes(&cluster).await;
    // A durable room on the master that dies, a plain room on one that lives.
    let durable = cluster.one_room_per_master("ledger").await[0].0.clone();
    let plain = cluster.one_room_per_master("match").await[1].0.clone();
    let mut remote = Client::connect(two.local_addr()).await;
    remote.join(&plain).await;
    let history = join_with(&mut remote, &durable, json!({"history": 10})).await;
    assert_eq!(history["messages"], json!([]));
    remote.expect_type("user_joined").await;
    for room in [&plain, &durable] {
        let owner = cluster
            .owner(Keys::cluster("", "t", "").room_slot(room))
            .await;
        let channel = format!("room:{{{room}}}");
        tokio::time::timeout(WAIT, async {
            while cluster.shard_channels(owner, &channel).await.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("subscribed");
    }
    let mut publisher = Client::connect(one.local_addr()).await;
    let say = |room: &str, content: &str| json!({"type":"message","roomId":room,"content":content});

    // Master 0 dies (SIGKILL, no replica): after the node timeout the cluster is down and
    // every master refuses (CLUSTERDOWN); the nodes stop being ready and hold publishes.
    cluster.servers[0].kill();
    wait_status(one.local_addr(), "/readyz", 503).await;
    for i in 0..5 {
        publisher.send(say(&plain, &format!("p{i}"))).await;
        publisher.send(say(&durable, &format!("d{i}"))).await;
    }
    // It comes back (its slots kept in nodes.conf, its data gone): all of it arrives, once.
    cluster.servers[0].restart().await;
    cluster.wait_ok().await;
    let mut plain_seen = Vec::new();
    let mut durable_seen = Vec::new();
    let arrived = tokio::time::timeout(Duration::from_secs(20), async {
        while plain_seen.len() < 5 || durable_seen.len() < 5 {
            let m = remote.next_room_message().await;
            let content = m["content"].as_str().unwrap().to_string();
            if m["roomId"] == json!(plain) {
                plain_seen.push(content);
            } else {
                durable_seen.push((content, m["offset"].as_u64().unwrap()));
            }
        }
    })
    .await;
    assert!(
        arrived.is_ok(),
        "after the outage: plain {plain_seen:?}, durable {durable_seen:?}"
    );
    let want = |prefix: &str| (0..5).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>();
    assert_eq!(plain_seen, want("p"));
    // The room's stream died with its master: the held messages start a new epoch there.
    let durable_contents: Vec<String> = durable_seen.iter().map(|(c, _)| c.clone()).collect();
    assert_eq!(durable_contents, want("d"));
    let offsets: Vec<u64> = durable_seen.iter().map(|(_, o)| *o).collect();
    assert_eq!(offsets, vec![1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn the_cluster_view_shows_every_node_from_the_home_master() {
    let cluster = RedisCluster::start().await;
    let reporting = |id: &'static str| {
        let node = on_cluster(&cluster, id);
        move |c: &mut Config| {
            node(c);
            c.metrics.report_s = 1;
        }
    };
    let one = start(reporting("one")).await;
    let two = start(reporting("two")).await;
    for node in [&one, &two] {
        wait_status(node.local_addr(), "/readyz", 200).await;
        cluster_view(node.local_addr(), &["one", "two"]).await;
    }
    // Kept under the home tag, on the master of its slot.
    let home = cluster.owner(volley::broker::redis::slot(b"volley")).await;
    let mut conn = cluster.servers[home].conn().await;
    let ids: Vec<String> = redis::cmd("SMEMBERS")
        .arg("{volley}:volley:nodes")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ids.len(), 2, "{ids:?}");
}
