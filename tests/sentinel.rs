//! Redis behind Sentinel: a master, a replica and three sentinels on 127.0.0.1 ports of
//! their own. The nodes find the master through the sentinels and follow a failover:
//! delivery across nodes resumes on the new master, and a durable room loses nothing.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;
use volley::config::RoomClass;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One sentinel process, with its config file in a directory of its own.
struct Sentinel {
    port: u16,
    child: Child,
    dir: PathBuf,
}

impl Sentinel {
    fn start(master_port: u16) -> Sentinel {
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

    async fn ask(&self, args: &[&str]) -> redis::Value {
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

#[tokio::test]
async fn nodes_follow_a_sentinel_failover_and_durable_rooms_lose_nothing() {
    let master = RedisServer::start_with(free_port(), &["--repl-diskless-sync-delay", "0"]).await;
    let replica_port = free_port();
    let replica = RedisServer::start_with(
        replica_port,
        &["--replicaof", "127.0.0.1", &master.port.to_string()],
    )
    .await;
    // The replica has synced with the master.
    tokio::time::timeout(WAIT, async {
        let mut conn = replica.conn().await;
        loop {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
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
    let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(master.port)).collect();
    // The sentinels know the replica before a failover can promote it.
    tokio::time::timeout(WAIT, async {
        loop {
            let sentinel_connected = async {
                let client =
                    redis::Client::open(format!("redis://127.0.0.1:{}", sentinels[0].port)).ok()?;
                client.get_multiplexed_async_connection().await.ok()
            };
            if sentinel_connected.await.is_some() {
                if let redis::Value::Array(replicas) =
                    sentinels[0].ask(&["replicas", "volley"]).await
                {
                    if !replicas.is_empty() {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the sentinels never saw the replica");

    let addresses: Vec<String> = sentinels
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    let node = |id: &'static str| {
        let addresses = addresses.clone();
        move |c: &mut volley::Config| {
            c.server.node_id = id.into();
            c.redis.sentinels = addresses;
            c.redis.master_name = "volley".into();
            c.redis.probe_interval_ms = 100;
            c.limits.publish_rate = 0;
            c.rooms = vec![RoomClass {
                pattern: "scores:*".into(),
                history_size: 1000,
                history_ttl_s: 3600,
            }];
        }
    };
    let one = start(node("one")).await;
    let two = start(node("two")).await;
    wait_status(one.local_addr(), "/readyz", 200).await;
    wait_status(two.local_addr(), "/readyz", 200).await;
    let mut remote = Client::connect(two.local_addr()).await;
    remote.join("scores:final").await;
    master.wait_numsub("room:scores:final", 1).await;
    let mut publisher = Client::connect(one.local_addr()).await;
    publisher
        .send(json!({"type":"message","roomId":"scores:final","content":"before"}))
        .await;
    assert_eq!(remote.next_room_message().await["content"], "before");

    // Replication is asynchronous: fail over once the replica has the room's position
    // (what a real failover after a quiet moment sees).
    tokio::time::timeout(WAIT, async {
        let mut conn = replica.conn().await;
        loop {
            let offset: Option<u64> = redis::cmd("HGET")
                .arg("stream:scores:final:position")
                .arg("offset")
                .query_async(&mut conn)
                .await
                .unwrap();
            if offset == Some(1) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the replica never caught up");

    // Failover: the replica becomes the master; both nodes move to it.
    sentinels[0].ask(&["failover", "volley"]).await;
    tokio::time::timeout(WAIT, async {
        loop {
            let moved = health(one.local_addr()).await["redis_failovers"].as_u64() >= Some(1)
                && health(two.local_addr()).await["redis_failovers"].as_u64() >= Some(1);
            if moved {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the nodes never followed the failover");
    wait_status(one.local_addr(), "/readyz", 200).await;
    wait_status(two.local_addr(), "/readyz", 200).await;
    publisher
        .send(json!({"type":"message","roomId":"scores:final","content":"after"}))
        .await;
    // Every offset in order up to "after": nothing of the durable room was lost.
    let mut last = 1;
    loop {
        let m = remote.next_room_message().await;
        let offset = m["offset"].as_u64().unwrap();
        assert_eq!(offset, last + 1, "no gap: {m}");
        last = offset;
        if m["content"] == "after" {
            break;
        }
    }
}
