//! Several nodes behind Debian's nginx, configured as README shows: clients connected
//! through the balancer get every message whichever node they landed on, and clients of
//! a node that is taken out reconnect through the balancer to the other; SSE streams pass
//! unbuffered and resume on any node.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::sse::Curl;
use common::*;
use serde_json::{json, Value};

/// nginx on its own port, in front of the given nodes; stopped when dropped.
struct Nginx {
    port: u16,
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    async fn start(upstreams: &[std::net::SocketAddr]) -> Nginx {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("volley-nginx-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let servers: String = upstreams
            .iter()
            .map(|a| format!("    server {a} max_fails=1 fail_timeout=5s;\n"))
            .collect();
        let d = dir.display();
        let conf = format!(
            r#"daemon off;
user root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
{}
}}
"#,
            README_SITE
                .replace("VOLLEY_UPSTREAMS\n", &servers)
                .replace("listen 80;", &format!("listen 127.0.0.1:{port};"))
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let nginx = ["/usr/sbin/nginx", "nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("nginx");
        let child = Command::new(nginx)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx must be installed (bash tests/run.sh installs nginx-light)");
        let addr = format!("127.0.0.1:{port}");
        tokio::time::timeout(WAIT, async {
            while tokio::net::TcpStream::connect(&addr).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("nginx did not start");
        Nginx { port, child, dir }
    }

    fn addr(&self) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM, so the master stops its workers too (a SIGKILLed master leaves its
        // workers running); SIGKILL only if it does not exit.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The site block of README's "Behind a load balancer", with the upstream servers and the
/// listen line left to fill in.
const README_SITE: &str = include_str!("../deploy/nginx-volley.conf");

#[tokio::test]
async fn clients_behind_nginx_get_everything_and_move_when_a_node_leaves() {
    let redis = RedisServer::start().await;
    let a = start_on_redis(&redis, "a", |_| {}).await;
    let b = start_on_redis(&redis, "b", |_| {}).await;
    let nginx = Nginx::start(&[a.local_addr(), b.local_addr()]).await;
    let lb = nginx.addr();

    // Round robin: the two clients land on different nodes.
    let mut first = Client::connect(lb).await;
    first.join("match").await;
    let mut second = Client::connect(lb).await;
    second.join("match").await;
    redis.wait_numsub("room:match", 2).await;
    let (status, _) = api_publish(lb, &json!({"roomId":"match","content":"kick-off"})).await;
    assert_eq!(status, 200);
    for client in [&mut first, &mut second] {
        assert_eq!(client.next_room_message().await["content"], "kick-off");
    }

    // Node a is taken out: its client is told (1001) and comes back through nginx, to b.
    a.shutdown().await;
    let mut seen = Vec::new();
    for client in [&mut first, &mut second] {
        // Frames may come first (the other client's join notice crossing Redis after the
        // kick-off, a user_left); the client on b hears no close: bounded, not a failure.
        let until_close = async {
            let mut events = Vec::new();
            loop {
                let event = client.next_event().await;
                let end = !matches!(event, Event::Frame(_));
                events.push(event);
                if end {
                    return events;
                }
            }
        };
        let events = tokio::time::timeout(Duration::from_secs(2), until_close).await;
        seen.push(events.ok());
    }
    assert!(
        seen.iter()
            .flatten()
            .any(|events| matches!(events.last(), Some(Event::Close(1001, _)))),
        "one client was on the node that left: {seen:?}"
    );
    let mut again = Client::connect(lb).await;
    again.join("match").await;
    let (status, _) = api_publish(lb, &json!({"roomId":"match","content":"second half"})).await;
    assert_eq!(status, 200);
    assert_eq!(again.next_room_message().await["content"], "second half");
    assert_eq!(health(lb).await["node_id"], "b");
}

#[tokio::test]
async fn an_sse_stream_through_nginx_gets_each_event_at_once_and_resumes_on_another_node() {
    let redis = RedisServer::start().await;
    let durable = |c: &mut volley::Config| {
        c.rooms = vec![volley::config::RoomClass {
            pattern: "scores*".into(),
            history_size: 100,
            history_ttl_s: 3600,
            ..Default::default()
        }];
    };
    let a = start_on_redis(&redis, "a", durable).await;
    let b = start_on_redis(&redis, "b", durable).await;
    let nginx = Nginx::start(&[a.local_addr(), b.local_addr()]).await;
    let lb = nginx.addr();
    let url = format!("http://{lb}/sse?rooms=scores");
    let mut stream = Curl::open(&url, &[]).await;
    stream.next_of("user_joined").await;
    // One small event at a time: a buffering proxy would hold it (kilobytes) and this
    // wait would run out.
    for n in 1..=2 {
        let (status, _) = api_publish(lb, &json!({"roomId":"scores","content":n})).await;
        assert_eq!(status, 200);
        assert_eq!(stream.messages(1).await[0]["content"], json!(n));
    }
    // Back through nginx (on whichever node) from the last id: the missed one replayed.
    let last = stream.last_id.clone().expect("an id");
    drop(stream);
    let (status, _) = api_publish(lb, &json!({"roomId":"scores","content":3})).await;
    assert_eq!(status, 200);
    let mut again = Curl::open(&url, &[("Last-Event-ID", &last)]).await;
    let history = again.next_of("history").await;
    assert_eq!(history.data["recovered"], json!(true));
    // In the replay, or live after it if the publish was not appended yet: once.
    let mut got: Vec<Value> = history.messages();
    if got.is_empty() {
        got = again.messages(1).await;
    }
    let contents: Vec<Value> = got.iter().map(|m| m["content"].clone()).collect();
    assert_eq!(contents, [json!(3)]);
    assert_eq!(got[0]["offset"], json!(3));
}
