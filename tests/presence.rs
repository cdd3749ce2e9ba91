//! Who is online, across nodes on a real redis-server: presence events per user (not per
//! socket), listing, a killed node's users expiring, direct messages to every tab of a
//! user on any node, and the HTTP presence endpoints.

mod common;

use std::time::Duration;

use common::process::NodeProcess;
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

/// Asks who is online until `done` holds for the listed ids: at most four times a second
/// (a node's listing is up to a second old, and a socket may ask 5 times a second).
async fn online_until(client: &mut Client, done: impl Fn(&[String]) -> bool) -> Value {
    let answer = tokio::time::timeout(WAIT, async {
        loop {
            let listed = online(client).await;
            if done(&ids(&listed)) {
                return listed;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    answer.expect("the listing never showed what was expected")
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
    let listed = online_until(&mut watcher, |ids| !ids.is_empty()).await;
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
    online_until(&mut watcher, |ids| ids.is_empty()).await;
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
    // The node's listing is up to a second old, and dana's presence is written a moment
    // after her auth is answered.
    let all = tokio::time::timeout(WAIT, async {
        loop {
            let (status, all) = get("/api/presence", true).await;
            assert_eq!(status, 200, "{all}");
            if ids(&all) == ["dana"] {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("dana was never listed");
    // The same frame a socket gets.
    assert_eq!(all["type"], "online_users", "{all}");
    assert_eq!(all["truncated"], false, "{all}");
    let (status, one) = get("/api/presence/dana", true).await;
    assert_eq!((status, one["serverId"].clone()), (200, json!("one")));
    assert_eq!(get("/api/presence/erin", true).await.0, 404);
    assert_eq!(get("/api/presence", false).await.0, 401);
}

/// Presence with a short TTL, so a dead node's users are announced within seconds.
const QUICK_PRESENCE: [&str; 4] = ["--set", "presence.ttl_s=2", "--set", "presence.refresh_s=1"];

fn quick_presence(c: &mut volley::Config) {
    c.presence.ttl_s = 2;
    c.presence.refresh_s = 1;
}

/// A watcher: presence events on, and in `rooms`.
async fn watcher(addr: std::net::SocketAddr, rooms: &[&str]) -> Client {
    let mut w = Client::connect(addr).await;
    w.send(json!({"type":"subscribe_presence"})).await;
    for room in rooms {
        w.join(room).await;
    }
    w
}

/// One thing a watcher heard: `(type, roomId or userId, event)`.
type Heard = (String, String, String);

/// What a watcher hears until `done` says it is enough.
async fn heard_until(w: &mut Client, done: impl Fn(&[Heard]) -> bool) -> Vec<Heard> {
    let mut heard = Vec::new();
    while !done(&heard) {
        let m = w.next_message().await;
        let kind = m["type"].as_str().unwrap_or_default().to_string();
        let about = m["roomId"]
            .as_str()
            .or(m["userId"].as_str())
            .unwrap_or_default()
            .to_string();
        let event = m["event"].as_str().unwrap_or_default().to_string();
        heard.push((kind, about, event));
    }
    heard
}

/// How many of `heard` are `user_left` in `room`.
fn left(heard: &[Heard], room: &str) -> usize {
    heard
        .iter()
        .filter(|h| h.0 == "user_left" && h.1 == room)
        .count()
}

/// Whether `heard` holds the presence event that `user` disconnected.
fn went_offline(heard: &[Heard], user: &str) -> bool {
    heard
        .iter()
        .any(|h| h.0 == "presence" && h.1 == user && h.2 == "disconnected")
}

#[tokio::test]
async fn a_killed_nodes_users_are_announced_gone_once_by_one_survivor() {
    let redis = RedisServer::start().await;
    let a = start_on_redis(&redis, "a", quick_presence).await;
    let b = start_on_redis(&redis, "b", quick_presence).await;
    let mut victim = NodeProcess::alone("victim", &redis.url(), "", &QUICK_PRESENCE).await;
    let mut wa = watcher(a.local_addr(), &["match"]).await;
    let mut wb = watcher(b.local_addr(), &["match", "other"]).await;
    // On the victim: ghost in two rooms; both also has a socket on a.
    let mut ghost = Client::connect(victim.addr).await;
    as_user(&mut ghost, "ghost").await;
    ghost.join("match").await;
    ghost.join("other").await;
    let mut both_here = Client::connect(victim.addr).await;
    as_user(&mut both_here, "both").await;
    both_here.join("match").await;
    let mut both_there = Client::connect(a.local_addr()).await;
    as_user(&mut both_there, "both").await;
    let mut asker = Client::connect(a.local_addr()).await;
    online_until(&mut asker, |ids| ids == ["both", "ghost"]).await;
    // Whatever the watchers heard so far (joins, connects) is behind them.
    for w in [&mut wa, &mut wb] {
        w.send(json!({"type":"leave","roomId":"nowhere"})).await;
        loop {
            let m = w.next_message().await;
            if m["code"] == "not_in_room" {
                break;
            }
        }
    }

    victim.kill();
    // Each watcher hears ghost go offline, and ghost and both leave match (b also hears
    // ghost leave other); both stays online (its socket on a).
    let heard_a = heard_until(&mut wa, |h| {
        went_offline(h, "ghost") && left(h, "match") == 2
    })
    .await;
    let heard_b = heard_until(&mut wb, |h| {
        went_offline(h, "ghost") && left(h, "match") == 2 && left(h, "other") == 1
    })
    .await;
    for heard in [&heard_a, &heard_b] {
        assert!(
            !heard.iter().any(|h| h.0 == "presence" && h.1 == "both"),
            "both is still online on a: {heard:?}"
        );
    }
    online_until(&mut asker, |ids| ids == ["both"]).await;
    // A direct message to the dead node's user is refused, not lost.
    let (status, body) = http(
        a.local_addr(),
        "POST",
        "/api/publish",
        &[("Authorization", "apikey test-key")],
        json!({"userId":"ghost","content":"still there?"})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("user_offline"), "{body}");
    // Exactly one survivor did it, once: a marker event after it shows no second time.
    let mut marker = Client::connect(b.local_addr()).await;
    as_user(&mut marker, "marker").await;
    drop(marker);
    for w in [&mut wa, &mut wb] {
        let heard = heard_until(w, |h| went_offline(h, "marker")).await;
        assert!(
            !heard.iter().any(|h| h.1 == "ghost" || h.0 == "user_left"),
            "announced twice: {heard:?}"
        );
    }
    let reaped = |h: &Value| h["redis_nodes_reaped"].as_u64().unwrap();
    assert_eq!(
        reaped(&health(a.local_addr()).await) + reaped(&health(b.local_addr()).await),
        1
    );
}

#[tokio::test]
async fn a_node_shutting_down_says_its_users_went_offline() {
    let redis = RedisServer::start().await;
    let a = start_on_redis(&redis, "a", quick_presence).await;
    let mut leaving = NodeProcess::alone("leaving", &redis.url(), "", &QUICK_PRESENCE).await;
    let mut wa = watcher(a.local_addr(), &["match"]).await;
    let mut user = Client::connect(leaving.addr).await;
    as_user(&mut user, "leaver").await;
    user.join("match").await;
    let mut asker = Client::connect(a.local_addr()).await;
    online_until(&mut asker, |ids| ids == ["leaver"]).await;
    assert_eq!(leaving.terminate().await, Some(0));
    heard_until(&mut wa, |h| {
        went_offline(h, "leaver") && left(h, "match") == 1
    })
    .await;
    online_until(&mut asker, |ids| ids.is_empty()).await;
    // The node said goodbye itself: nobody had to announce it dead.
    assert_eq!(health(a.local_addr()).await["redis_nodes_reaped"], 0);
}

#[tokio::test]
async fn the_embedded_engine_keeps_presence_and_direct_messages_too() {
    let bus = volley::broker::MemoryBus::new();
    let one = start_with_broker(
        |c| {
            c.server.node_id = "one".into();
            c.presence.max_list = 2;
        },
        std::sync::Arc::new(bus.broker()),
    )
    .await;
    let two = start_with_broker(
        |c| {
            c.server.node_id = "two".into();
            c.presence.max_list = 2;
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
    let listed = online_until(&mut watcher, |ids| !ids.is_empty()).await;
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

/// A user's listing entry, as a node on "elsewhere" writes it.
fn listing_entry(pipe: &mut redis::Pipeline, user: &str) {
    pipe.hset(
        "volley:presence:info",
        user,
        r#"{"serverId":"elsewhere","connectedAt":1}"#,
    )
    .ignore();
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
    let node = start_on_redis(&redis, "one", |c| c.presence.max_list = 10_000).await;
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
        listing_entry(&mut pipe, &user);
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
        1,
        "one read of the listing entries"
    );
    assert_eq!(calls(&redis, "keys").await + calls(&redis, "scan").await, 0);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn two_hundred_listing_requests_cost_a_handful_of_redis_commands() {
    let redis = RedisServer::start().await;
    let node = start_on_redis(&redis, "one", |_| {}).await;
    // 1 001 users online on another node, written as its presence task writes them.
    let mut conn = redis.conn().await;
    let expires = now_ms() + 60_000;
    let mut pipe = redis::pipe();
    for i in 0..1001 {
        let user = format!("user-{i:04}");
        pipe.zadd("presence:online", &user, expires).ignore();
        listing_entry(&mut pipe, &user);
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    let mut askers = Vec::new();
    for _ in 0..20 {
        askers.push(Client::connect(node.local_addr()).await);
    }
    let before: u64 = calls(&redis, "zrange").await + calls(&redis, "hmget").await;
    // Each socket asks its burst (limits.presence_burst, 10) at once, and one more.
    let ask: Vec<Value> = (0..11)
        .map(|_| json!({"type":"get_online_users"}))
        .collect();
    for asker in &mut askers {
        asker.send_burst(&ask).await;
    }
    for asker in &mut askers {
        // The refusal is said at once; the answers come when the listing is read.
        let mut refused = 0;
        for _ in 0..11 {
            let m = asker.next_message().await;
            if m["type"] == "error" {
                assert_eq!(m["code"], "rate_limited", "{m}");
                refused += 1;
                continue;
            }
            assert_eq!(m["type"], "online_users", "{m}");
            assert_eq!(m["users"].as_array().unwrap().len(), 1000);
            assert_eq!(m["truncated"], true, "presence.max_list is 1000");
            assert_eq!(m["users"][0]["serverId"], "elsewhere");
        }
        assert_eq!(refused, 1);
    }
    let spent = calls(&redis, "zrange").await + calls(&redis, "hmget").await - before;
    // One listing (two commands) a second at most, shared by all 200 requests.
    assert!(spent <= 6, "200 requests cost {spent} Redis commands");
}

#[tokio::test]
async fn with_redis_away_presence_questions_say_presence_unavailable() {
    let mut redis = RedisServer::start().await;
    let node = start_on_redis(&redis, "one", |_| {}).await;
    let mut c = Client::connect(node.local_addr()).await;
    as_user(&mut c, "ann").await;
    redis.kill();
    c.send(json!({"type":"get_online_users"})).await;
    let e = c.expect_error("presence_unavailable").await;
    assert!(e["message"].as_str().unwrap().contains("presence"), "{e}");
    // A direct message to a user not on this node needs a presence read too.
    c.send(json!({"type":"direct_message","toUserId":"bob","content":1}))
        .await;
    c.expect_error("presence_unavailable").await;
    let (status, body) = http(
        node.local_addr(),
        "GET",
        "/api/presence",
        &[("Authorization", "apikey test-key")],
        b"",
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("presence_unavailable"), "{body}");
}

#[tokio::test]
async fn a_node_restarted_under_its_own_id_announces_what_its_previous_life_left() {
    let redis = RedisServer::start().await;
    let a = start_on_redis(&redis, "a", quick_presence).await;
    let dir = std::env::temp_dir().join(format!("volley-phoenix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A long TTL: only the restarted node itself can announce its first life's users.
    let mut phoenix = common::process::NodeProcess::new(
        &dir,
        "phoenix",
        &redis.url(),
        "",
        &[
            "--set",
            "presence.ttl_s=600",
            "--set",
            "presence.refresh_s=1",
        ],
    );
    phoenix.start().await;
    let mut wa = watcher(a.local_addr(), &["match"]).await;
    let mut old = Client::connect(phoenix.addr).await;
    as_user(&mut old, "old").await;
    old.join("match").await;
    let mut asker = Client::connect(a.local_addr()).await;
    online_until(&mut asker, |ids| ids == ["old"]).await;
    phoenix.kill();
    phoenix.start().await;
    heard_until(&mut wa, |h| went_offline(h, "old") && left(h, "match") == 1).await;
    online_until(&mut asker, |ids| ids.is_empty()).await;
}
