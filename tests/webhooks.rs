//! Webhooks against a real HTTP receiver that checks every signature: rooms occupied and
//! vacated, users online and offline, once for the whole deployment (two nodes on one
//! Redis), a reload that does not flap, a SIGKILLed node's rooms still vacating, and a
//! receiver that is down for a while getting every event after, once.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::process::NodeProcess;
use common::*;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use volley::Config;

const SECRET: &str = "hook-secret";

/// A receiver on its own port: every POST's body, after its signature was checked (a
/// POST with a wrong one fails the test); answers 500 to the first `fail_first` POSTs.
struct Receiver {
    addr: SocketAddr,
    posts: mpsc::UnboundedReceiver<Value>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Receiver {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), fail_first)
    }

    fn start_on(listener: TcpListener, fail_first: usize) -> Receiver {
        let addr = listener.local_addr().unwrap();
        let (tx, posts) = mpsc::unbounded_channel();
        let failing = Arc::new(AtomicUsize::new(fail_first));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (tx, failing) = (tx.clone(), failing.clone());
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (tx, failing) = (tx.clone(), failing.clone());
                    async move {
                        let status = receive(req, &tx, &failing).await;
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(bytes::Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Receiver { addr, posts, task }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/volley", self.addr)
    }

    /// Events from the POSTs until `n` have come.
    async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut events = Vec::new();
        while events.len() < n {
            let post = tokio::time::timeout(WAIT, self.posts.recv())
                .await
                .expect("no webhook POST in time")
                .expect("receiver stopped");
            assert!(
                post["time_ms"].as_u64().unwrap() > 1_600_000_000_000,
                "{post}"
            );
            events.extend(post["events"].as_array().unwrap().iter().cloned());
        }
        events
    }

    /// Nothing more comes within `quiet`.
    async fn nothing_more(&mut self, quiet: Duration) {
        if let Ok(Some(post)) = tokio::time::timeout(quiet, self.posts.recv()).await {
            panic!("an unexpected webhook POST: {post}");
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks one POST as a receiver must: the signature over the exact body.
async fn receive(
    req: Request<Incoming>,
    tx: &mpsc::UnboundedSender<Value>,
    failing: &AtomicUsize,
) -> u16 {
    assert_eq!(req.uri().path(), "/hooks/volley");
    assert_eq!(req.headers()["content-type"], "application/json");
    let signature = req.headers()["x-volley-signature"]
        .to_str()
        .unwrap()
        .to_string();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(&body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(signature, format!("sha256={hex}"), "a POST signed wrongly");
    if failing
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return 500;
    }
    let _ = tx.send(serde_json::from_slice(&body).unwrap());
    200
}

fn hooks(url: String) -> impl Fn(&mut Config) + Clone {
    move |c: &mut Config| {
        c.webhooks.url = url.clone();
        c.webhooks.secret = SECRET.into();
        c.webhooks.vacate_delay_ms = 300;
        c.webhooks.batch_ms = 20;
        c.webhooks.retry_max_ms = 400;
        c.webhooks.node_timeout_ms = 2000;
    }
}

/// `(name, roomId or userId)` of each event, sorted, and every id distinct.
fn named(events: &[Value]) -> Vec<(String, String)> {
    let mut ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "an id twice: {events:?}");
    let mut named: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            let subject = e.get("roomId").or(e.get("userId")).unwrap();
            (
                e["name"].as_str().unwrap().into(),
                subject.as_str().unwrap().into(),
            )
        })
        .collect();
    named.sort();
    named
}

fn pair(name: &str, subject: &str) -> (String, String) {
    (name.into(), subject.into())
}

async fn as_user(addr: SocketAddr, user: &str, room: &str) -> Client {
    let mut client = Client::connect(addr).await;
    client.send(json!({"type":"auth","userId":user})).await;
    client.expect_type("authenticated").await;
    client.join(room).await;
    client
}

#[tokio::test]
async fn rooms_and_users_are_announced_once_for_the_whole_deployment() {
    let mut receiver = Receiver::start(0).await;
    let redis = RedisServer::start().await;
    let a = start_on_redis(&redis, "a", hooks(receiver.url())).await;
    let b = start_on_redis(&redis, "b", hooks(receiver.url())).await;
    // Ann on both nodes, in the same room: one occupied, one online.
    let on_a = as_user(a.local_addr(), "ann", "match:1").await;
    let on_b = as_user(b.local_addr(), "ann", "match:1").await;
    let events = receiver.events(2).await;
    assert_eq!(
        named(&events),
        [pair("room_occupied", "match:1"), pair("user_online", "ann")]
    );
    // One of them leaves: another node still holds both.
    drop(on_a);
    receiver.nothing_more(Duration::from_millis(800)).await;
    // A reload on b: gone and back within the vacate delay, nothing said.
    drop(on_b);
    let back = as_user(b.local_addr(), "ann", "match:1").await;
    receiver.nothing_more(Duration::from_millis(800)).await;
    // The last one goes: vacated and offline, once each, after the delay.
    drop(back);
    let events = receiver.events(2).await;
    assert_eq!(
        named(&events),
        [pair("room_vacated", "match:1"), pair("user_offline", "ann")]
    );
    receiver.nothing_more(Duration::from_millis(800)).await;
    // Anonymous sockets hold rooms too; the events a config leaves out are not sent.
    let mut lurker = Client::connect(a.local_addr()).await;
    lurker.join("lobby").await;
    assert_eq!(
        named(&receiver.events(1).await),
        [pair("room_occupied", "lobby")]
    );
    assert_eq!(
        metric(a.local_addr(), "volley_webhook_sent_total").await
            + metric(b.local_addr(), "volley_webhook_sent_total").await,
        5
    );
}

#[tokio::test]
async fn a_killed_nodes_rooms_still_vacate_and_its_users_go_offline() {
    let mut receiver = Receiver::start(0).await;
    let redis = RedisServer::start().await;
    let survivor = start_on_redis(&redis, "survivor", hooks(receiver.url())).await;
    let toml = format!(
        "[webhooks]\nurl = \"{}\"\nsecret = \"{SECRET}\"\nvacate_delay_ms = 300\nbatch_ms = 20\nnode_timeout_ms = 2000\n",
        receiver.url()
    );
    let mut doomed = NodeProcess::alone("doomed", &redis.url(), &toml, &[]).await;
    let _fan = as_user(doomed.addr, "bob", "final").await;
    let mut watcher = as_user(survivor.local_addr(), "cat", "other").await;
    let events = receiver.events(4).await;
    assert_eq!(
        named(&events),
        [
            pair("room_occupied", "final"),
            pair("room_occupied", "other"),
            pair("user_online", "bob"),
            pair("user_online", "cat"),
        ]
    );
    // No goodbye: the survivor sees its liveness end and speaks for it, once.
    doomed.kill();
    let events = receiver.events(2).await;
    assert_eq!(
        named(&events),
        [pair("room_vacated", "final"), pair("user_offline", "bob")]
    );
    receiver.nothing_more(Duration::from_millis(1500)).await;
    watcher.join("final").await;
    assert_eq!(
        named(&receiver.events(1).await),
        [pair("room_occupied", "final")]
    );
}

#[tokio::test]
async fn events_wait_for_a_receiver_that_is_down_and_arrive_once_each() {
    // A port with nothing listening yet: every POST fails until the receiver starts.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let url = format!("http://127.0.0.1:{port}/hooks/volley");
    let node = start(hooks(url)).await;
    let addr = node.local_addr();
    let mut clients = Vec::new();
    for n in 0..5 {
        let mut c = Client::connect(addr).await;
        c.join(&format!("room-{n}")).await;
        clients.push(c);
    }
    wait_metric(addr, "volley_webhook_failed_posts_total", |n| n >= 2).await;
    assert_eq!(metric(addr, "volley_webhook_queued").await, 5);
    // Up, but answering 500 twice more: still retried, the same events.
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let mut receiver = Receiver::start_on(listener, 2);
    let events = receiver.events(5).await;
    let expected: Vec<_> = (0..5)
        .map(|n| pair("room_occupied", &format!("room-{n}")))
        .collect();
    assert_eq!(named(&events), expected);
    receiver.nothing_more(Duration::from_millis(800)).await;
    assert_eq!(metric(addr, "volley_webhook_queued").await, 0);
    assert_eq!(metric(addr, "volley_webhook_sent_total").await, 5);
    let by_id: HashMap<&str, usize> = events.iter().fold(HashMap::new(), |mut m, e| {
        *m.entry(e["id"].as_str().unwrap()).or_default() += 1;
        m
    });
    assert!(by_id.values().all(|n| *n == 1));
}

#[tokio::test]
async fn a_redis_restart_or_stall_announces_nothing_false_and_loses_nothing() {
    let mut receiver = Receiver::start(0).await;
    let mut redis = RedisServer::start().await;
    // The production liveness (15 s): a 7 s stall must not make nodes look dead.
    let node = start_on_redis(&redis, "a", |c| {
        hooks(receiver.url())(c);
        c.webhooks.node_timeout_ms = 15_000;
    })
    .await;
    let addr = node.local_addr();
    let held = as_user(addr, "dan", "derby").await;
    assert_eq!(
        named(&receiver.events(2).await),
        [pair("room_occupied", "derby"), pair("user_online", "dan")]
    );
    // Redis restarts empty: the node holds its room and user again, silently.
    redis.restart().await;
    wait_status(addr, "/readyz", 200).await;
    receiver.nothing_more(Duration::from_millis(2500)).await;
    // Redis sleeps 7 s; a room joined meanwhile is announced once Redis is back.
    let stall = redis.stall(7).await;
    let mut late = Client::connect(addr).await;
    late.send(json!({"type":"join","roomId":"replay"})).await;
    let events = receiver.events(1).await;
    assert!(stall.is_finished(), "announced while Redis slept");
    assert_eq!(named(&events), [pair("room_occupied", "replay")]);
    receiver.nothing_more(Duration::from_millis(2000)).await;
    // The first room still vacates, once, when its last socket goes.
    drop(held);
    assert_eq!(
        named(&receiver.events(2).await),
        [pair("room_vacated", "derby"), pair("user_offline", "dan")]
    );
    drop(late);
}

/// README's receiver, as README.md has it: the js block under "### A receiver".
fn readme_receiver() -> String {
    let readme = include_str!("../README.md");
    let section = readme
        .split("### A receiver")
        .nth(1)
        .expect("README has a receiver section");
    let block = section
        .split("```js\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a js block in the receiver section");
    block.to_string()
}

#[tokio::test]
async fn the_readme_receiver_checks_the_signature_and_hears_each_event_once() {
    use tokio::io::AsyncBufReadExt;
    let dir = std::env::temp_dir().join(format!("volley-receiver-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("receiver.mjs");
    std::fs::write(&script, readme_receiver()).unwrap();
    let port = common::process::free_port();
    let mut receiver = tokio::process::Command::new("node")
        .arg(&script)
        .env("SECRET", SECRET)
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node must be installed (bash tests/run.sh installs it)");
    let mut lines = tokio::io::BufReader::new(receiver.stdout.take().unwrap()).lines();
    let receiver_addr: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_for_listener(receiver_addr).await;
    // A POST signed with another secret is refused, and not logged.
    let forged = br#"{"time_ms":1,"events":[{"name":"room_occupied","id":"x","roomId":"forged"}]}"#;
    let (status, _) = http(
        receiver_addr,
        "POST",
        "/hooks/volley",
        &[("X-Volley-Signature", "sha256=00")],
        forged,
    )
    .await;
    assert_eq!(status, 401);
    let node = start(hooks(format!("http://{receiver_addr}/hooks/volley"))).await;
    let mut fan = Client::connect(node.local_addr()).await;
    fan.join("final").await;
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the receiver printed the event")
        .unwrap()
        .unwrap();
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (event["name"].as_str(), event["roomId"].as_str()),
        (Some("room_occupied"), Some("final"))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

async fn wait_for_listener(addr: SocketAddr) {
    let waited = tokio::time::timeout(WAIT, async {
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "nothing listens on {addr}");
}
