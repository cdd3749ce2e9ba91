//! Redis topologies for the tests: Sentinel (a master, replicas, three sentinels) and
//! Redis Cluster (three masters, optionally with replicas), each on 127.0.0.1 ports of
//! its own.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::Value;
use volley::broker::redis::Keys;
use volley::config::RoomClass;

use super::{RedisServer, WAIT};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One sentinel process, with its config file in a directory of its own.
pub struct Sentinel {
    pub port: u16,
    pub child: Child,
    pub dir: PathBuf,
}

impl Sentinel {
    pub fn start(master_port: u16) -> Sentinel {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("volley-sentinel-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor volley 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds volley 1000\nsentinel failover-timeout volley 3000\n",
                dir.display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        Sentinel { port, child, dir }
    }

    pub async fn ask(&self, args: &[&str]) -> redis::Value {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port)).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let mut cmd = redis::cmd("SENTINEL");
        for a in args {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await.unwrap()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A master, its replicas and three sentinels watching it. With `safe`, every server
/// refuses writes without a replica in sync (`min-replicas-to-write 1`), as README
/// advises for two replicas or more.
pub struct SentinelSetup {
    pub master: RedisServer,
    pub replicas: Vec<RedisServer>,
    pub sentinels: Vec<Sentinel>,
}

pub const SAFE_WRITES: [&str; 4] = [
    "--min-replicas-to-write",
    "1",
    "--min-replicas-max-lag",
    "2",
];

impl SentinelSetup {
    pub async fn start(replicas: usize, safe: bool) -> SentinelSetup {
        let mut args = vec!["--repl-diskless-sync-delay", "0"];
        if safe {
            args.extend(SAFE_WRITES);
        }
        let master = RedisServer::start_with(free_port(), &args).await;
        let master_port = master.port.to_string();
        let mut started = Vec::new();
        for _ in 0..replicas {
            let mut args = args.clone();
            args.extend(["--replicaof", "127.0.0.1", &master_port]);
            started.push(RedisServer::start_with(free_port(), &args).await);
        }
        // Every replica has synced with the master.
        for replica in &started {
            replica.wait_replica_synced().await;
        }
        let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(master.port)).collect();
        // The sentinels know every replica before a failover can promote one.
        tokio::time::timeout(WAIT, async {
            loop {
                let sentinel_connected = async {
                    let client =
                        redis::Client::open(format!("redis://127.0.0.1:{}", sentinels[0].port))
                            .ok()?;
                    client.get_multiplexed_async_connection().await.ok()
                };
                if sentinel_connected.await.is_some() {
                    if let redis::Value::Array(known) =
                        sentinels[0].ask(&["replicas", "volley"]).await
                    {
                        if known.len() == replicas {
                            return;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the sentinels never saw the replicas");
        SentinelSetup {
            master,
            replicas: started,
            sentinels,
        }
    }

    pub fn node(&self, id: &'static str) -> impl FnOnce(&mut volley::Config) {
        let addresses: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        move |c: &mut volley::Config| {
            c.server.node_id = id.into();
            c.redis.sentinels = addresses;
            c.redis.master_name = "volley".into();
            c.redis.probe_interval_ms = 100;
            c.limits.publish_rate = 0;
            c.rooms = vec![RoomClass {
                pattern: "scores:*".into(),
                history_size: 10_000,
                history_ttl_s: 3600,
                ..Default::default()
            }];
        }
    }

    /// Until the replica at index `i` has a durable room's offset `offset` (or later).
    pub async fn replicated(&self, i: usize, room: &str, offset: u64) {
        tokio::time::timeout(WAIT, async {
            let mut conn = self.replicas[i].conn().await;
            loop {
                let at: Option<u64> = redis::cmd("HGET")
                    .arg(format!("stream:{room}:position"))
                    .arg("offset")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                if at >= Some(offset) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the replica never caught up");
    }
}

/// What makes a redis-server a cluster node here: its own `nodes.conf` (in its own
/// directory), failures found within 2 s.
pub const CLUSTER_NODE: [&str; 6] = [
    "--cluster-enabled",
    "yes",
    "--cluster-config-file",
    "nodes.conf",
    "--cluster-node-timeout",
    "2000",
];

/// Until both nodes report a failover (`redis_failovers` in `/healthz`) and are ready.
pub async fn both_followed(nodes: [&volley::Server; 2]) {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let mut moved = true;
            for node in nodes {
                moved &=
                    super::health(node.local_addr()).await["redis_failovers"].as_u64() >= Some(1);
            }
            if moved {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the nodes never followed the failover");
    for node in nodes {
        super::wait_status(node.local_addr(), "/readyz", 200).await;
    }
}

/// Three cluster-enabled redis-servers joined into one cluster, slots split evenly (and
/// with `replicas`, that many replicas of each: `servers[3..]`).
pub struct RedisCluster {
    pub servers: Vec<RedisServer>,
    pub ids: Vec<String>,
}

/// A free port for a cluster node: its cluster bus (the port + 10 000) must be a port
/// too, and free. Both stay below the ephemeral range (from 32 768), where the tests' own
/// client connections could take them, and come from one counter so that tests running at
/// once never pick the same.
pub fn cluster_port() -> u16 {
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

impl RedisCluster {
    /// The index of `master`'s replica, once the master knows it and it has synced.
    pub async fn replica_of(&self, master: usize) -> usize {
        let replica = tokio::time::timeout(WAIT, async {
            loop {
                let replicas: Vec<String> = redis::cmd("CLUSTER")
                    .arg("REPLICAS")
                    .arg(&self.ids[master])
                    .query_async(&mut self.servers[master].conn().await)
                    .await
                    .unwrap();
                let port: Option<u16> = replicas.first().and_then(|line| {
                    line.split_whitespace()
                        .nth(1)
                        .and_then(|addr| addr.split(['@', ':']).nth(1))
                        .and_then(|port| port.parse().ok())
                });
                if let Some(i) = port.and_then(|p| self.servers.iter().position(|s| s.port == p)) {
                    return i;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the master never knew its replica");
        self.servers[replica].wait_replica_synced().await;
        replica
    }

    pub async fn start() -> RedisCluster {
        Self::start_with(0).await
    }

    pub async fn start_with(replicas: usize) -> RedisCluster {
        let ports: Vec<u16> = (0..3 * (1 + replicas)).map(|_| cluster_port()).collect();
        Self::start_on(&ports, replicas).await
    }

    /// On these ports (3 masters, then the replicas).
    pub async fn start_on(ports: &[u16], replicas: usize) -> RedisCluster {
        let mut masters = Vec::new();
        for &port in ports {
            masters.push(RedisServer::start_with(port, &CLUSTER_NODE).await);
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
        let cluster = RedisCluster {
            servers: masters,
            ids,
        };
        cluster.wait_ok().await;
        cluster
    }

    /// Until every master says `cluster_state:ok` and knows the whole slot map.
    pub async fn wait_ok(&self) {
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

    pub fn urls(&self) -> Vec<String> {
        vec![self.servers[0].url()]
    }

    /// Which master (index) serves `slot`, as the first master sees the map.
    pub async fn owner(&self, slot: u16) -> usize {
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
    pub async fn one_room_per_master(&self, stem: &str) -> Vec<(String, u16)> {
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
    pub async fn shard_channels(&self, master: usize, pattern: &str) -> Vec<String> {
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
    pub async fn wait_shardnumsub(&self, i: usize, channel: &str, n: i64) {
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
    pub async fn calls(&self, master: usize, command: &str) -> u64 {
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
    pub async fn move_slot(&self, slot: u16, from: usize, to: usize) {
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
