//! Redis over TLS: `rediss://` URLs with `redis.tls_ca_file` (and a client certificate
//! for servers that ask for one), against Debian's redis-server listening on a TLS port
//! only, with certificates from a test CA: one server, a Redis Cluster (`tls-cluster
//! yes`), a master and replica behind a sentinel (`tls-replication yes`). A server whose certificate the configured CA
//! did not sign is an error that names the key, logged at once, and the node stays
//! unready; bad TLS files stop the node at start naming the key.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::process::{free_port, NodeProcess};
use common::topologies::{both_followed, cluster_port, CLUSTER_NODE};
use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::json;

/// A test CA, a server certificate for 127.0.0.1 and a client certificate it signed, and
/// another CA that signed neither; PEM files in a directory of their own.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir =
            std::env::temp_dir().join(format!("volley-redis-tls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("pki dir");
        let write =
            |file: &str, pem: String| std::fs::write(dir.join(file), pem).expect("write pem");
        let ca = |cn: &str| {
            let key = KeyPair::generate().expect("CA key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, cn);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let cert = params.self_signed(&key).expect("CA certificate");
            (params, key, cert)
        };
        let (ca_params, ca_key, ca_cert) = ca("volley test CA");
        let (_, _, other_cert) = ca("another CA");
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        for (file, names) in [
            ("server", vec!["127.0.0.1".to_string(), "localhost".into()]),
            ("client", vec!["volley-node".to_string()]),
        ] {
            let key = KeyPair::generate().expect("key");
            let cert = CertificateParams::new(names)
                .expect("params")
                .signed_by(&key, &issuer)
                .expect("signed");
            write(&format!("{file}.pem"), cert.pem());
            write(&format!("{file}.key"), key.serialize_pem());
        }
        write("ca.pem", ca_cert.pem());
        write("other-ca.pem", other_cert.pem());
        Pki { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// redis-server on a TLS port only (`--port 0`): every connection to it is TLS, so
/// anything that works through it went over TLS. In a directory of its own (a cluster
/// node's `nodes.conf`, a replica's snapshot).
struct TlsRedis {
    port: u16,
    child: Child,
    dir: PathBuf,
}

impl TlsRedis {
    async fn start(pki: &Pki, client_certificates: bool) -> TlsRedis {
        let auth = [
            "--tls-auth-clients",
            if client_certificates { "yes" } else { "no" },
        ];
        TlsRedis::spawn(pki, free_port(), None, &auth).await
    }

    /// A sentinel on a TLS port only, watching the master on `master_port` as `volley`
    /// (alone: a quorum of one) and reaching it and its replicas over TLS.
    async fn sentinel(pki: &Pki, master_port: u16) -> TlsRedis {
        let monitor = format!(
            "sentinel monitor volley 127.0.0.1 {master_port} 1\n\
             sentinel down-after-milliseconds volley 1000\n\
             sentinel failover-timeout volley 3000\n"
        );
        TlsRedis::spawn(
            pki,
            free_port(),
            Some(&monitor),
            &["--tls-replication", "yes"],
        )
        .await
    }

    /// A server on `port` (a sentinel with `sentinel`, its config file's lines), clients'
    /// certificates not asked for unless `extra` says so.
    async fn spawn(pki: &Pki, port: u16, sentinel: Option<&str>, extra: &[&str]) -> TlsRedis {
        let dir = pki.dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut command = Command::new("redis-server");
        if let Some(lines) = sentinel {
            let conf = dir.join("sentinel.conf");
            std::fs::write(&conf, lines).expect("sentinel.conf");
            command.arg(&conf).arg("--sentinel");
        } else {
            command.args(["--save", "", "--appendonly", "no"]);
        }
        command
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--tls-auth-clients", "no"])
            .args(["--tls-cert-file", &pki.path("server.pem")])
            .args(["--tls-key-file", &pki.path("server.key")])
            .args(["--tls-ca-cert-file", &pki.path("ca.pem")])
            .arg("--dir")
            .arg(&dir);
        let child = command
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian's is built with TLS)");
        tokio::time::timeout(WAIT, async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("redis-server never listened on its TLS port");
        TlsRedis { port, child, dir }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    /// `redis-cli` over TLS (trusting the test CA) against this server: its output.
    async fn cli(&self, pki: &Pki, args: &[&str]) -> String {
        let out = tokio::process::Command::new("redis-cli")
            .args(["--tls", "--cacert", &pki.path("ca.pem")])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .await
            .expect("redis-cli (Debian's is built with TLS)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Until `redis-cli args` prints something that satisfies `done`.
    async fn until(&self, pki: &Pki, args: &[&str], done: impl Fn(&str) -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(20), async {
            while !done(&self.cli(pki, args).await) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "{args:?} never answered as expected: {}",
            self.cli(pki, args).await
        );
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Two nodes, each ready: connected to Redis as `tweak` says, over TLS.
async fn two_nodes(tweak: impl Fn(&mut volley::Config)) -> [volley::Server; 2] {
    let mut nodes = Vec::new();
    for id in ["tls-1", "tls-2"] {
        let node = start(|c| {
            c.server.node_id = id.into();
            c.redis.probe_interval_ms = 100;
            tweak(c);
        })
        .await;
        wait_status(node.local_addr(), "/readyz", 200).await;
        nodes.push(node);
    }
    nodes.try_into().ok().expect("two nodes")
}

/// Five messages published on `one` reach a socket joined to `room` on `two`, in order:
/// the way between the nodes is Redis's.
async fn carry(one: &volley::Server, two: &volley::Server, room: &str) {
    let mut viewer = Client::connect(two.local_addr()).await;
    viewer.join(room).await;
    let mut publisher = Client::connect(one.local_addr()).await;
    for n in 0..5 {
        publisher
            .send(json!({"type": "message", "roomId": room, "content": {"n": n}}))
            .await;
    }
    let mut got = Vec::new();
    while got.len() < 5 {
        for m in frame_messages(&viewer.next_frame().await) {
            if m["type"] == "message" && m["roomId"] == room {
                got.push(m["content"]["n"].as_u64().expect("n"));
            }
        }
    }
    assert_eq!(got, vec![0, 1, 2, 3, 4], "{room}");
}

/// Two nodes on the TLS Redis carry a message from one to the other (publish and
/// pub/sub both over TLS).
async fn two_nodes_carry_a_message(redis: &TlsRedis, tweak: impl Fn(&mut volley::Config)) {
    let url = redis.url();
    let [one, two] = two_nodes(|c| {
        c.redis.url = url.clone();
        tweak(c);
    })
    .await;
    carry(&one, &two, "scores").await;
}

#[tokio::test]
async fn nodes_talk_through_a_tls_redis_trusting_the_configured_ca() {
    let pki = Pki::new("ca");
    let redis = TlsRedis::start(&pki, false).await;
    let ca = pki.path("ca.pem");
    two_nodes_carry_a_message(&redis, |c| c.redis.tls_ca_file = ca.clone()).await;
}

/// A managed Redis's maintenance: the TLS server goes away and comes back on its port.
/// The nodes reconnect over TLS by themselves, and a durable room loses nothing of what
/// was published before, during and after.
#[tokio::test]
async fn a_restarted_tls_redis_is_reconnected_and_a_durable_room_loses_nothing() {
    let pki = Pki::new("restart");
    let auth = ["--tls-auth-clients", "no"];
    let mut redis = TlsRedis::spawn(&pki, free_port(), None, &auth).await;
    let (url, ca, port) = (redis.url(), pki.path("ca.pem"), redis.port);
    let [one, two] = two_nodes(|c| {
        c.redis.url = url.clone();
        c.redis.tls_ca_file = ca.clone();
        c.limits.publish_rate = 0;
        c.rooms = vec![volley::config::RoomClass {
            pattern: "scores:*".into(),
            history_size: 100,
            history_ttl_s: 3600,
            ..Default::default()
        }];
    })
    .await;
    let mut viewer = Client::connect(two.local_addr()).await;
    viewer.join("scores:final").await;
    let mut publisher = Client::connect(one.local_addr()).await;
    let publish =
        |n: u64| json!({"type": "message", "roomId": "scores:final", "content": {"n": n}});
    for n in 0..5 {
        publisher.send(publish(n)).await;
    }
    drop(redis);
    wait_status(one.local_addr(), "/readyz", 503).await;
    for n in 5..10 {
        publisher.send(publish(n)).await;
    }
    redis = TlsRedis::spawn(&pki, port, None, &auth).await;
    wait_status(one.local_addr(), "/readyz", 200).await;
    wait_status(two.local_addr(), "/readyz", 200).await;
    for n in 10..15 {
        publisher.send(publish(n)).await;
    }
    let mut got = Vec::new();
    while got.len() < 15 {
        let m = viewer.next_room_message().await;
        got.push(m["content"]["n"].as_u64().expect("n"));
    }
    assert_eq!(got, (0..15).collect::<Vec<u64>>());
    drop(redis);
}

#[tokio::test]
async fn a_client_certificate_gets_in_where_the_server_asks_for_one() {
    let pki = Pki::new("mtls");
    let redis = TlsRedis::start(&pki, true).await;
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    two_nodes_carry_a_message(&redis, |c| {
        c.redis.tls_ca_file = ca.clone();
        c.redis.tls_cert_file = cert.clone();
        c.redis.tls_key_file = key.clone();
    })
    .await;
}

#[tokio::test]
async fn nodes_talk_through_a_tls_redis_cluster_on_every_master() {
    let pki = Pki::new("cluster");
    // The cluster bus over TLS too, and the slot map names the TLS ports.
    let mut cluster_args = CLUSTER_NODE.to_vec();
    cluster_args.extend(["--tls-cluster", "yes"]);
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(TlsRedis::spawn(&pki, cluster_port(), None, &cluster_args).await);
    }
    let addrs: Vec<String> = servers
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    let mut create = vec!["--cluster", "create"];
    create.extend(addrs.iter().map(String::as_str));
    create.push("--cluster-yes");
    servers[0].cli(&pki, &create).await;
    for server in &servers {
        server
            .until(&pki, &["cluster", "info"], |info| {
                info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3")
            })
            .await;
    }
    let (first, ca) = (servers[0].url(), pki.path("ca.pem"));
    let [one, two] = two_nodes(|c| {
        c.redis.cluster_nodes = vec![first.clone()];
        c.redis.tls_ca_file = ca.clone();
        c.limits.publish_rate = 0;
    })
    .await;
    // A room in each third of the slots: `--cluster create` gives each master one.
    let keys = volley::broker::redis::Keys::cluster("", "tls-1", "");
    for third in [0..5461, 5461..10923, 10923..16384] {
        let room = (0..)
            .map(|n| format!("match-{n}"))
            .find(|room| third.contains(&keys.room_slot(room)))
            .expect("a room in every third");
        carry(&one, &two, &room).await;
    }
}

#[tokio::test]
async fn nodes_follow_a_failover_through_tls_sentinels() {
    let pki = Pki::new("sentinel");
    let replication = ["--tls-replication", "yes"];
    let master = TlsRedis::spawn(&pki, free_port(), None, &replication).await;
    let master_port = master.port.to_string();
    let replica_args = [
        "--tls-replication",
        "yes",
        "--replicaof",
        "127.0.0.1",
        &master_port,
    ];
    let replica = TlsRedis::spawn(&pki, free_port(), None, &replica_args).await;
    replica
        .until(&pki, &["info", "replication"], |info| {
            info.contains("master_link_status:up")
        })
        .await;
    let sentinel = TlsRedis::sentinel(&pki, master.port).await;
    let replica_port = format!("{}", replica.port);
    sentinel
        .until(&pki, &["sentinel", "replicas", "volley"], |replicas| {
            replicas.lines().any(|line| line == replica_port)
        })
        .await;
    let (sentinels, ca) = (vec![sentinel.url()], pki.path("ca.pem"));
    let [one, two] = two_nodes(|c| {
        c.redis.sentinels = sentinels.clone();
        c.redis.master_name = "volley".into();
        c.redis.tls_ca_file = ca.clone();
        c.limits.publish_rate = 0;
    })
    .await;
    carry(&one, &two, "before").await;
    // The watches keep their sentinel connection: no new TLS handshake every round
    // (500 ms). Over 2 s the two nodes would open 8; the one counted is redis-cli's own.
    let connections = |info: String| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("total_connections_received")
    };
    let before = connections(sentinel.cli(&pki, &["info", "stats"]).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = connections(sentinel.cli(&pki, &["info", "stats"]).await);
    assert!(
        after - before <= 2,
        "{} new connections in 2 s",
        after - before
    );

    // The replica (over TLS) becomes the master; both nodes follow it over TLS.
    sentinel
        .cli(&pki, &["sentinel", "failover", "volley"])
        .await;
    both_followed([&one, &two]).await;
    let role = replica.cli(&pki, &["role"]).await;
    assert!(role.starts_with("master"), "{role}");
    carry(&one, &two, "after").await;
}

/// A CA that did not sign the server's certificate, whichever way Redis is found: the
/// node says so naming `redis.tls_ca_file`, at once, and stays unready.
#[tokio::test]
async fn a_server_certificate_the_ca_did_not_sign_is_logged_naming_the_key() {
    let pki = Pki::new("wrong");
    let redis = TlsRedis::start(&pki, false).await;
    let wrong = format!("redis.tls_ca_file={}", pki.path("other-ca.pem"));
    let cluster = format!("redis.cluster_nodes=[\"{}\"]", redis.url());
    let sentinels = format!("redis.sentinels=[\"{}\"]", redis.url());
    let ways: [(&str, &str, Vec<&str>); 3] = [
        ("tls-wrong-ca", &redis.url(), vec![]),
        ("tls-wrong-ca-cluster", "", vec!["--set", &cluster]),
        (
            "tls-wrong-ca-sentinel",
            "",
            vec!["--set", &sentinels, "--set", "redis.master_name=volley"],
        ),
    ];
    for (name, url, mut args) in ways {
        args.extend(["--set", &wrong]);
        let node = NodeProcess::alone(name, url, "", &args).await;
        let named = tokio::time::timeout(WAIT, async {
            while !node.log_text().contains("redis.tls_ca_file") {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            named.is_ok(),
            "{name}: no error naming redis.tls_ca_file:\n{}",
            node.log_text()
        );
        let (status, body) = http(node.addr, "GET", "/readyz", &[], b"").await;
        assert_eq!(status, 503, "{name}: {body}");
    }
}

#[test]
fn bad_tls_settings_stop_the_node_naming_the_key() {
    let pki = Pki::new("bad");
    let not_pem = pki.path("not.pem");
    std::fs::write(&not_pem, "not a certificate").expect("write");
    let cases: [(&[&str], &str); 7] = [
        (
            &[
                "redis.url=rediss://127.0.0.1:6380",
                "redis.tls_ca_file=/nonexistent/ca.pem",
            ],
            "redis.tls_ca_file",
        ),
        (
            &[
                "redis.url=rediss://127.0.0.1:6380",
                &format!("redis.tls_ca_file={not_pem}"),
            ],
            "redis.tls_ca_file",
        ),
        (
            &[
                "redis.url=rediss://127.0.0.1:6380",
                &format!("redis.tls_cert_file={}", pki.path("client.pem")),
            ],
            "redis.tls_key_file",
        ),
        (
            &[
                "redis.url=redis://127.0.0.1:6380",
                &format!("redis.tls_ca_file={}", pki.path("ca.pem")),
            ],
            "redis.tls_ca_file",
        ),
        (
            &["redis.cluster_nodes=[\"rediss://127.0.0.1:7000\", \"redis://127.0.0.1:7001\"]"],
            "redis.cluster_nodes",
        ),
        (
            &[
                "redis.sentinels=[\"rediss://127.0.0.1:26379\", \"127.0.0.1:26380\"]",
                "redis.master_name=m",
            ],
            "redis.sentinels",
        ),
        (
            &[
                "redis.sentinels=[\"127.0.0.1:26379\"]",
                "redis.master_name=m",
                &format!("redis.tls_ca_file={}", pki.path("ca.pem")),
            ],
            "redis.tls_ca_file",
        ),
    ];
    for (sets, key) in cases {
        let mut args = vec!["--print-config"];
        for set in sets {
            args.extend(["--set", set]);
        }
        let out = Command::new(env!("CARGO_BIN_EXE_volley"))
            .args(&args)
            .output()
            .expect("volley runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{sets:?}: {stderr}");
        assert!(stderr.contains(key), "{sets:?} should name {key}: {stderr}");
    }
}
