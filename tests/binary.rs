//! The `volley` binary: config from flags and env, clear config errors, SIGTERM shutdown.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

fn volley() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_volley"));
    cmd.env_remove("RUST_LOG")
        .env_remove("PORT")
        .env_remove("SERVER_ID");
    cmd
}

#[test]
fn print_config_shows_flags_over_env_over_defaults() {
    let out = volley()
        .args([
            "--print-config",
            "--set",
            "batch.delivery_window_ms=7",
            "--node-id",
            "edge-1",
        ])
        .env("VOLLEY_LIMITS_MAX_ROOMS_PER_SOCKET", "9")
        .env("VOLLEY_BATCH_DELIVERY_WINDOW_MS", "3")
        .env("PORT", "9100")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("delivery_window_ms = 7"), "{text}");
    assert!(text.contains("max_rooms_per_socket = 9"), "{text}");
    assert!(text.contains(r#"node_id = "edge-1""#), "{text}");
    assert!(text.contains(r#"listen = "0.0.0.0:9100""#), "{text}");
}

#[test]
fn a_bad_config_value_is_an_error_naming_the_key() {
    let out = volley()
        .args(["--print-config"])
        .env("VOLLEY_BATCH_DELIVERY_WINDOW_MS", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("batch.delivery_window_ms"), "{err}");
    assert!(
        err.contains("volley_"),
        "says where the value came from: {err}"
    );

    let dir = std::env::temp_dir().join(format!("volley-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("volley.toml");
    std::fs::write(&file, "[limits]\nmax_outbox_bytes = 10\n").unwrap();
    let out = volley()
        .arg("--config")
        .arg(&file)
        .arg("--print-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limits.max_outbox_bytes"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn sigterm_flushes_and_closes_sockets_with_1001() {
    let mut child = volley()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log",
            "info",
            "--delivery-window-ms",
            "50",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // The node logs the address it bound; that line is the signal it is ready.
    let stderr = child.stderr.take().unwrap();
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut tx = Some(addr_tx);
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
    let addr: std::net::SocketAddr = tokio::time::timeout(WAIT, addr_rx)
        .await
        .expect("volley did not report its address")
        .unwrap()
        .parse()
        .unwrap();
    let mut client = Client::connect(addr).await;
    client.join("r").await;

    let pid = child.id() as libc::pid_t;
    // SAFETY: sending a signal to the child process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(
        client.expect_close().await,
        (1001, "server shutting down".to_string())
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}
