//! Who is online, across nodes on a real redis-server: presence events per user (not per
//! socket), listing, a killed node's users expiring, direct messages to every tab of a
//! user on any node, and the HTTP presence endpoints.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Identifies a socket the reference servers' way (no key configured: the client's word).
async fn as_user(client: &mut Client, user: &str) {
    client.send(json!({"type":"auth","userId":user})).await;
    assert_eq!(
        client.next_message().await,
        json!({"type":"authenticated","userId":user})
    );
}

async fn online(client: &mut Client) -> Value {
    client.send(json!({"type":"get_online_users"})).await;
    client.expect_type("online_users").await
}

fn ids(online: &Value) -> Vec<String> {
    online["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["userId"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn presence_counts_users_not_sockets_and_is_seen_from_every_node() {
    let redis = RedisServer::start().await;
    let one = start_on_redis(&redis, "one", |_| {}).await;
    let two = start_on_redis(&redis, "two", |_| {}).await;
    redis.wait_numsub("presence:updates", 2).await;
    let mut watcher = Client::connect(two.local_addr()).await;
    watcher.send(json!({"type":"subscribe_presence"})).await;
    // A round trip, so the subscription is in place before anything happens.
    assert!(ids(&online(&mut watcher).await).is_empty());

    let mut tab1 = Client::connect(one.local_addr()).await;
    as_user(&mut tab1, "alice").await;
    let connected = watcher.expect_type("presence").await;
    assert_eq!(connected["event"], "connected");
    assert_eq!(connected["userId"], "alice");
    assert_eq!(connected["serverId"], "one");
    let mut tab2 = Client::connect(two.local_addr()).await;
    as_user(&mut tab2, "alice").await;
    let listed = online(&mut watcher).await;
    assert_eq!(
        ids(&listed),
        vec!["alice"],
        "one user, two sockets: {listed}"
    );
    assert_eq!(listed["truncated"], false);

    drop(tab1);
    drop(tab2);
    // One disconnected, when the last socket anywhere went (no presence event between).
    let gone = watcher.expect_type("presence").await;
    assert_eq!(
        (gone["event"].clone(), gone["userId"].clone()),
        (json!("disconnected"), json!("alice"))
    );
    assert!(ids(&online(&mut watcher).await).is_empty());
}

#[tokio::test]
async fn direct_messages_reach_every_tab_on_any_node_and_offline_is_said() {
    let redis = RedisServer::start().await;
    let one = start_on_redis(&redis, "one", |_| {}).await;
    let two = start_on_redis(&redis, "two", |_| {}).await;
    let mut bob_here = Client::connect(one.local_addr()).await;
    as_user(&mut bob_here, "bob").await;
    let mut bob_there = Client::connect(two.local_addr()).await;
    as_user(&mut bob_there, "bob").await;
    redis.wait_numsub("user:bob", 2).await;
    let mut alice = Client::connect(one.local_addr()).await;
    as_user(&mut alice, "alice").await;
    // A forged fromUserId is not taken: the sender is who the socket is.
    alice
        .send(json!({"type":"direct_message","toUserId":"bob","fromUserId":"admin","content":{"hi":1}}))
        .await;
    for tab in [&mut bob_here, &mut bob_there] {
        assert_eq!(
            tab.next_message().await,
            json!({"type":"direct_message","fromUserId":"alice","content":{"hi":1}})
        );
    }
    alice
        .send(json!({"type":"direct_message","toUserId":"carol","content":"anyone?"}))
        .await;
    alice.expect_error("user_offline").await;
    // An anonymous socket has no one to send as.
    let mut nobody = Client::connect(two.local_addr()).await;
    nobody
        .send(json!({"type":"direct_message","toUserId":"bob","content":"?"}))
        .await;
    nobody.expect_error("unauthenticated").await;
    // A backend's direct message, through the API.
    let (status, _) = api_publish(
        two.local_addr(),
        &json!({"userId":"bob","content":"from the shop"}),
    )
    .await;
    assert_eq!(status, 200);
    for tab in [&mut bob_here, &mut bob_there] {
        assert_eq!(
            tab.next_message().await,
            json!({"type":"direct_message","content":"from the shop"})
        );
    }
    let (status, body) =
        api_publish(one.local_addr(), &json!({"userId":"carol","content":"x"})).await;
    assert_eq!(
        (status, body["error"].clone()),
        (404, json!("user_offline"))
    );
}

#[tokio::test]
async fn the_presence_api_answers_with_the_key_only() {
    let redis = RedisServer::start().await;
    let node = start_on_redis(&redis, "one", |_| {}).await;
    let addr = node.local_addr();
    let mut dana = Client::connect(addr).await;
    as_user(&mut dana, "dana").await;
    let key = [("Authorization", "apikey test-key")];
    let get = |path: &'static str, with_key: bool| async move {
        let headers: &[(&str, &str)] = if with_key { &key } else { &[] };
        let (status, body) = http(addr, "GET", path, headers, b"").await;
        (
            status,
            serde_json::from_str::<Value>(&body).unwrap_or(Value::Null),
        )
    };
    let (status, all) = get("/api/presence", true).await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(ids(&all), vec!["dana"]);
    let (status, one) = get("/api/presence/dana", true).await;
    assert_eq!((status, one["serverId"].clone()), (200, json!("one")));
    assert_eq!(get("/api/presence/erin", true).await.0, 404);
    assert_eq!(get("/api/presence", false).await.0, 401);
}

#[tokio::test]
async fn a_killed_node_leaves_no_user_online_past_the_ttl() {
    let redis = RedisServer::start().await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_volley"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log",
            "info",
            "--node-id",
            "doomed",
        ])
        .args(["--set", "presence.ttl_s=2", "--set", "presence.refresh_s=1"])
        .env("REDIS_URL", redis.url())
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line
                .split("addr=")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
            {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr.to_string());
                }
            }
        }
    });
    let addr: std::net::SocketAddr = tokio::time::timeout(WAIT, rx)
        .await
        .unwrap()
        .unwrap()
        .parse()
        .unwrap();
    let mut ghost = Client::connect(addr).await;
    as_user(&mut ghost, "ghost").await;
    let observer = start_on_redis(&redis, "observer", |_| {}).await;
    let mut asker = Client::connect(observer.local_addr()).await;
    tokio::time::timeout(WAIT, async {
        while ids(&online(&mut asker).await) != vec!["ghost"] {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the ghost was never online");
    // SIGKILL: no goodbye, no disconnect; only the TTL can clear it.
    child.kill().unwrap();
    child.wait().unwrap();
    tokio::time::timeout(WAIT, async {
        while !ids(&online(&mut asker).await).is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("a killed node's user stayed online past the TTL");
}

#[tokio::test]
async fn the_embedded_engine_keeps_presence_and_direct_messages_too() {
    let bus = volley::broker::MemoryBus::new();
    let one = start_with_broker(
        |c| {
            c.server.node_id = "one".into();
            c.presence.max_users = 2;
        },
        std::sync::Arc::new(bus.broker()),
    )
    .await;
    let two = start_with_broker(
        |c| {
            c.server.node_id = "two".into();
            c.presence.max_users = 2;
        },
        std::sync::Arc::new(bus.broker()),
    )
    .await;
    let mut watcher = Client::connect(one.local_addr()).await;
    watcher.send(json!({"type":"subscribe_presence"})).await;
    assert!(ids(&online(&mut watcher).await).is_empty());
    let mut users = Vec::new();
    for (i, name) in ["u1", "u2", "u3"].into_iter().enumerate() {
        let addr = if i % 2 == 0 {
            one.local_addr()
        } else {
            two.local_addr()
        };
        let mut c = Client::connect(addr).await;
        as_user(&mut c, name).await;
        let event = watcher.expect_type("presence").await;
        assert_eq!(
            (event["event"].clone(), event["userId"].clone()),
            (json!("connected"), json!(name))
        );
        users.push(c);
    }
    let listed = online(&mut watcher).await;
    assert_eq!(
        (ids(&listed), listed["truncated"].clone()),
        (vec!["u1".to_string(), "u2".to_string()], json!(true))
    );
    users[0]
        .send(json!({"type":"direct_message","toUserId":"u2","content":"psst"}))
        .await;
    assert_eq!(
        users[1].next_message().await,
        json!({"type":"direct_message","fromUserId":"u1","content":"psst"})
    );
    users.pop();
    let event = watcher.expect_type("presence").await;
    assert_eq!(
        (event["event"].clone(), event["userId"].clone()),
        (json!("disconnected"), json!("u3"))
    );
}

/// Calls of one command so far, from Redis' own statistics.
async fn calls(redis: &RedisServer, command: &str) -> u64 {
    let mut conn = redis.conn().await;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn listing_5000_users_reads_an_index_never_the_keyspace() {
    let redis = RedisServer::start().await;
    let node = start_on_redis(&redis, "one", |c| c.presence.max_users = 10_000).await;
    // 5 000 users online on some other node, written as the presence task writes them.
    let mut conn = redis.conn().await;
    let expires = now_ms() + 60_000;
    let mut pipe = redis::pipe();
    for i in 0..5000 {
        let user = format!("user-{i:04}");
        pipe.zadd("presence:online", &user, expires).ignore();
        pipe.hset_multiple(
            format!("presence:{user}"),
            &[
                ("serverId", "elsewhere"),
                ("connectedAt", "1"),
                ("lastSeen", "2"),
            ],
        )
        .ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    let mut asker = Client::connect(node.local_addr()).await;
    let (zrange, hmget) = (calls(&redis, "zrange").await, calls(&redis, "hmget").await);
    let listed = online(&mut asker).await;
    assert_eq!(listed["users"].as_array().unwrap().len(), 5000);
    assert_eq!(listed["users"][0]["serverId"], "elsewhere");
    assert_eq!(
        calls(&redis, "zrange").await - zrange,
        1,
        "one read of the index"
    );
    assert_eq!(
        calls(&redis, "hmget").await - hmget,
        5000,
        "one pipeline of hashes"
    );
    assert_eq!(calls(&redis, "keys").await + calls(&redis, "scan").await, 0);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
