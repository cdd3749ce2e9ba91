//! Redis over TLS: `rediss://` URLs with `redis.tls_ca_file` (and a client certificate
//! for servers that ask for one), against Debian's redis-server listening on a TLS port
//! only, with certificates from a test CA. A server whose certificate the configured CA
//! did not sign is an error that names the key, logged at once, and the node stays
//! unready; bad TLS files stop the node at start naming the key.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::process::{free_port, NodeProcess};
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

/// redis-server on a TLS port only (`--port 0`): every connection to it is TLS.
struct TlsRedis {
    port: u16,
    child: Child,
}

impl TlsRedis {
    async fn start(pki: &Pki, client_certificates: bool) -> TlsRedis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--tls-cert-file", &pki.path("server.pem")])
            .args(["--tls-key-file", &pki.path("server.key")])
            .args(["--tls-ca-cert-file", &pki.path("ca.pem")])
            .args([
                "--tls-auth-clients",
                if client_certificates { "yes" } else { "no" },
            ])
            .args(["--save", "", "--appendonly", "no"])
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
        TlsRedis { port, child }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two nodes on the TLS Redis: ready, and a message published on one reaches a socket
/// on the other (publish and pub/sub both over TLS).
async fn two_nodes_carry_a_message(redis: &TlsRedis, tweak: impl Fn(&mut volley::Config)) {
    let url = redis.url();
    let mut nodes = Vec::new();
    for id in ["tls-1", "tls-2"] {
        let node = start(|c| {
            c.redis.url = url.clone();
            c.server.node_id = id.into();
            c.redis.probe_interval_ms = 100;
            tweak(c);
        })
        .await;
        wait_status(node.local_addr(), "/readyz", 200).await;
        nodes.push(node);
    }
    let (one, two) = (&nodes[0], &nodes[1]);
    let mut viewer = Client::connect(two.local_addr()).await;
    viewer.join("scores").await;
    let mut publisher = Client::connect(one.local_addr()).await;
    for n in 0..5 {
        publisher
            .send(json!({"type": "message", "roomId": "scores", "content": {"n": n}}))
            .await;
    }
    let mut got = Vec::new();
    while got.len() < 5 {
        for m in frame_messages(&viewer.next_frame().await) {
            if m["type"] == "message" {
                got.push(m["content"]["n"].as_u64().expect("n"));
            }
        }
    }
    assert_eq!(got, vec![0, 1, 2, 3, 4]);
}

#[tokio::test]
async fn nodes_talk_through_a_tls_redis_trusting_the_configured_ca() {
    let pki = Pki::new("ca");
    let redis = TlsRedis::start(&pki, false).await;
    let ca = pki.path("ca.pem");
    two_nodes_carry_a_message(&redis, |c| c.redis.tls_ca_file = ca.clone()).await;
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
async fn a_server_certificate_the_ca_did_not_sign_is_logged_naming_the_key() {
    let pki = Pki::new("wrong");
    let redis = TlsRedis::start(&pki, false).await;
    let wrong = format!("redis.tls_ca_file={}", pki.path("other-ca.pem"));
    let node = NodeProcess::alone("tls-wrong-ca", &redis.url(), "", &["--set", &wrong]).await;
    let named = tokio::time::timeout(WAIT, async {
        while !node.log_text().contains("redis.tls_ca_file") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        named.is_ok(),
        "no error naming redis.tls_ca_file:\n{}",
        node.log_text()
    );
    assert!(
        node.log_text().contains("cannot reach Redis"),
        "{}",
        node.log_text()
    );
    let (status, body) = http(node.addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(status, 503, "{body}");
}

#[test]
fn bad_tls_settings_stop_the_node_naming_the_key() {
    let pki = Pki::new("bad");
    let not_pem = pki.path("not.pem");
    std::fs::write(&not_pem, "not a certificate").expect("write");
    let cases: [(&[&str], &str); 6] = [
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
            &["redis.cluster_nodes=[\"rediss://127.0.0.1:7000\"]"],
            "redis.cluster_nodes",
        ),
        (
            &[
                "redis.sentinels=[\"rediss://127.0.0.1:26379\"]",
                "redis.master_name=m",
            ],
            "redis.sentinels",
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
