//! Redis Cluster (`redis.cluster_nodes`): a real 3-master cluster (`redis-server
//! --cluster-enabled yes` x3 + `redis-cli --cluster create`). Rooms on all three shards
//! cross volley nodes through sharded pub/sub on their own master only; durable rooms
//! keep their stream on their slot's master; a resharding of a room's slot during
//! traffic keeps delivering.

mod common;

use std::time::Duration;

use common::*;
use redis::Value;
use serde_json::{json, Value as Value2};
use volley::broker::redis::Keys;
use volley::config::RoomClass;
use volley::{Config, Server};

/// Three cluster-enabled redis-servers joined into one cluster, slots split evenly (and
/// with `replicas`, that many replicas of each: `servers[3..]`).
struct Cluster {
    servers: Vec<RedisServer>,
    ids: Vec<String>,
}

/// A free port for a cluster node: its cluster bus (the port + 10 000) must be a port
/// too, and free. Both stay below the ephemeral range (from 32 768), where the tests' own
/// client connections could take them, and come from one counter so that tests running at
/// once never pick the same.
fn cluster_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        fastrand::u16(20_000..22_000),
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + port.wrapping_sub(20_000) % 2_700;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

impl Cluster {
    async fn start() -> Cluster {
        Self::start_with(0).await
    }

    async fn start_with(replicas: usize) -> Cluster {
        let ports: Vec<u16> = (0..3 * (1 + replicas)).map(|_| cluster_port()).collect();
        Self::start_on(&ports, replicas).await
    }

    /// On these ports (3 masters, then the replicas).
    async fn start_on(ports: &[u16], replicas: usize) -> Cluster {
        let mut masters = Vec::new();
        for &port in ports {
            masters.push(
                RedisServer::start_with(
                    port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                    ],
                )
                .await,
            );
        }
        let addrs: Vec<String> = masters
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.port))
            .collect();
        let created = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed (bash tests/run.sh installs it)");
        assert!(
            created.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let mut ids = Vec::new();
        for master in &masters {
            ids.push(
                redis::cmd("CLUSTER")
                    .arg("MYID")
                    .query_async::<String>(&mut master.conn().await)
                    .await
                    .unwrap(),
            );
        }
        let cluster = Cluster {
            servers: masters,
            ids,
        };
        cluster.wait_ok().await;
        cluster
    }

    /// Until every master says `cluster_state:ok` and knows the whole slot map.
    async fn wait_ok(&self) {
        let waited = tokio::time::timeout(Duration::from_secs(20), async {
            'again: loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                for master in &self.servers {
                    let info: String = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut master.conn().await)
                        .await
                        .unwrap();
                    let known = format!("cluster_known_nodes:{}", self.servers.len());
                    if !info.contains("cluster_state:ok") || !info.contains(&known) {
                        continue 'again;
                    }
                }
                return;
            }
        })
        .await;
        assert!(waited.is_ok(), "the cluster never became ok");
    }

    fn urls(&self) -> Vec<String> {
        vec![self.servers[0].url()]
    }

    /// Which master (index) serves `slot`, as the first master sees the map.
    async fn owner(&self, slot: u16) -> usize {
        let map: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut self.servers[0].conn().await)
            .await
            .unwrap();
        let Value::Array(ranges) = map else {
            panic!("CLUSTER SLOTS: {map:?}")
        };
        for range in ranges {
            let Value::Array(parts) = range else { continue };
            let (Value::Int(first), Value::Int(last), Value::Array(node)) =
                (&parts[0], &parts[1], &parts[2])
            else {
                continue;
            };
            if (*first..=*last).contains(&i64::from(slot)) {
                let Value::Int(port) = node[1] else {
                    panic!("port")
                };
                return self
                    .servers
                    .iter()
                    .position(|m| i64::from(m.port) == port)
                    .expect("a master of ours");
            }
        }
        panic!("slot {slot} unserved")
    }

    /// One room name per master, `<stem>-<n>`, and the slot of each.
    async fn one_room_per_master(&self, stem: &str) -> Vec<(String, u16)> {
        let keys = Keys::cluster("", "test", "");
        let mut rooms: Vec<Option<(String, u16)>> = vec![None; 3];
        for n in 0.. {
            let room = format!("{stem}-{n}");
            let slot = keys.room_slot(&room);
            let owner = self.owner(slot).await;
            if rooms[owner].is_none() {
                rooms[owner] = Some((room, slot));
            }
            if rooms.iter().all(Option::is_some) {
                break;
            }
        }
        rooms.into_iter().flatten().collect()
    }

    /// `PUBSUB SHARDCHANNELS` on one master: the sharded channels it has subscribers for.
    async fn shard_channels(&self, master: usize, pattern: &str) -> Vec<String> {
        let mut channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("SHARDCHANNELS")
            .arg(pattern)
            .query_async(&mut self.servers[master].conn().await)
            .await
            .unwrap();
        channels.sort();
        channels
    }

    /// Waits until `channel` has `n` sharded subscribers on server `i`.
    async fn wait_shardnumsub(&self, i: usize, channel: &str, n: i64) {
        let waited = tokio::time::timeout(WAIT, async {
            loop {
                let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
                    .arg("SHARDNUMSUB")
                    .arg(channel)
                    .query_async(&mut self.servers[i].conn().await)
                    .await
                    .unwrap();
                if counts[0].1 == n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "{channel} never had {n} subscribers on server {i}"
        );
    }

    /// Calls of one command on one master (`INFO commandstats`).
    async fn calls(&self, master: usize, command: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.servers[master].conn().await)
            .await
            .unwrap();
        info.lines()
            .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Moves one slot (and its keys) from one master to another, the way
    /// `redis-cli --cluster reshard` does it.
    async fn move_slot(&self, slot: u16, from: usize, to: usize) {
        let setslot = |state: &str, id: &str| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
            cmd
        };
        let mut src = self.servers[from].conn().await;
        let mut dst = self.servers[to].conn().await;
        let _: () = setslot("IMPORTING", &self.ids[from])
            .query_async(&mut dst)
            .await
            .unwrap();
        let _: () = setslot("MIGRATING", &self.ids[to])
            .query_async(&mut src)
            .await
            .unwrap();
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query_async(&mut src)
                .await
                .unwrap();
            if keys.is_empty() {
                break;
            }
            let _: () = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(self.servers[to].port)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query_async(&mut src)
                .await
                .unwrap();
        }
        for master in [to, from] {
            let _: () = setslot("NODE", &self.ids[to])
                .query_async(&mut self.servers[master].conn().await)
                .await
                .unwrap();
        }
        let third = 3 - from - to;
        let _: () = setslot("NODE", &self.ids[to])
            .query_async(&mut self.servers[third].conn().await)
            .await
            .unwrap();
    }
}

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

fn on_cluster(cluster: &Cluster, id: &'static str) -> impl FnOnce(&mut Config) {
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

async fn two_nodes(cluster: &Cluster) -> (Server, Server) {
    let one = start(on_cluster(cluster, "one")).await;
    let two = start(on_cluster(cluster, "two")).await;
    wait_status(one.local_addr(), "/readyz", 200).await;
    wait_status(two.local_addr(), "/readyz", 200).await;
    (one, two)
}

#[tokio::test]
async fn rooms_on_all_three_shards_cross_nodes_through_their_own_master_only() {
    let cluster = Cluster::start().await;
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
    let cluster = Cluster::start().await;
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
    let cluster = Cluster::start().await;
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
    let cluster = Cluster::start_with(1).await;
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
    let replicas: Vec<String> = tokio::time::timeout(WAIT, async {
        loop {
            let replicas: Vec<String> = redis::cmd("CLUSTER")
                .arg("REPLICAS")
                .arg(&cluster.ids[master])
                .query_async(&mut cluster.servers[master].conn().await)
                .await
                .unwrap();
            if !replicas.is_empty() {
                return replicas;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the master never knew its replica");
    let replica_port: u16 = replicas[0]
        .split_whitespace()
        .nth(1)
        .and_then(|addr| addr.split(['@', ':']).nth(1))
        .and_then(|port| port.parse().ok())
        .expect("the replica's address");
    let replica = cluster
        .servers
        .iter()
        .position(|s| s.port == replica_port)
        .expect("a server of ours");
    tokio::time::timeout(WAIT, async {
        loop {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut cluster.servers[replica].conn().await)
                .await
                .unwrap();
            if info.contains("master_link_status:up") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the replica never synced");

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
    let cluster = Cluster::start_on(&ports, 0).await;
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
    let mut cluster = Cluster::start().await;
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
    let cluster = Cluster::start().await;
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
