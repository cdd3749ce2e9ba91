//! The `volley` binary: config from flags and env, clear config errors, SIGTERM shutdown.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;

fn volley() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_volley"));
    for (name, _) in std::env::vars() {
        if name.starts_with("VOLLEY_") || name.starts_with("REDIS_") {
            cmd.env_remove(name);
        }
    }
    cmd.env_remove("RUST_LOG")
        .env_remove("PORT")
        .env_remove("SERVER_ID");
    cmd
}

/// A running `volley` process and the lines it logs.
struct Running {
    /// Taken by `exit_status`; killed on drop if still here.
    child: Option<std::process::Child>,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    addr: std::net::SocketAddr,
    /// What it logged before it listened.
    logged: Vec<String>,
}

impl Running {
    /// Starts the binary on a free port and waits for the line that names its address.
    async fn start(cmd: &mut Command) -> Running {
        let mut child = cmd
            .args(["--listen", "127.0.0.1:0", "--log", "info"])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut logged = Vec::new();
        let line = tokio::time::timeout(WAIT, async {
            loop {
                let line = lines.recv().await.expect("volley exited");
                if line.contains("addr=") {
                    return line;
                }
                logged.push(line);
            }
        })
        .await
        .expect("volley never logged its address");
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap();
        Running {
            child: Some(child),
            lines,
            addr,
            logged,
        }
    }

    async fn wait_line(&mut self, needle: &str) -> String {
        wait_line(&mut self.lines, needle).await
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: sending a signal to the child process this test started.
        let pid = self.child.as_ref().expect("running").id();
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, signal) }, 0);
    }

    /// Waits for the process to exit (bounded by WAIT).
    async fn exit_status(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        tokio::time::timeout(WAIT, tokio::task::spawn_blocking(move || child.wait()))
            .await
            .expect("volley did not exit")
            .unwrap()
            .unwrap()
    }
}

impl Drop for Running {
    /// A test that fails before its node exited must not leave the process behind.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn wait_line(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    needle: &str,
) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            let line = lines.recv().await.expect("volley exited");
            if line.contains(needle) {
                return line;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("volley never logged {needle:?}"))
}

#[test]
fn the_seed_names_rank_between_the_file_and_volley_variables() {
    let dir = std::env::temp_dir().join(format!("volley-rank-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("volley.toml");
    std::fs::write(
        &file,
        "[server]\nnode_id = \"from-file\"\nlisten = \"127.0.0.1:7000\"\n",
    )
    .unwrap();
    let print = |cmd: &mut Command| {
        let out = cmd
            .arg("--config")
            .arg(&file)
            .arg("--print-config")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // The seed's names outrank the file...
    let text = print(volley().env("SERVER_ID", "from-seed").env("PORT", "9100"));
    assert!(text.contains(r#"node_id = "from-seed""#), "{text}");
    assert!(text.contains(r#"listen = "0.0.0.0:9100""#), "{text}");
    // ...and VOLLEY_* outranks them.
    let text = print(
        volley()
            .env("SERVER_ID", "from-seed")
            .env("VOLLEY_SERVER_NODE_ID", "from-volley"),
    );
    assert!(text.contains(r#"node_id = "from-volley""#), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_errors_name_the_key_they_are_about() {
    let run = |cmd: &mut Command| {
        let out = cmd.arg("--print-config").output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = run(volley().args(["--set", "demo.symbols=20000"]));
    assert!(err.contains("demo.symbols"), "{err}");
    let err = run(volley().args(["--set", "redis.url=redis://cache:notaport"]));
    assert!(err.contains("redis.url"), "{err}");
    let err = run(volley().env("VOLLEY_BATCH_WINDOW_MS", "5"));
    assert!(err.contains("VOLLEY_BATCH_WINDOW_MS"), "{err}");
    assert!(err.contains("batch.delivery_window_ms"), "{err}");
    let err = run(volley().args(["--set", "limits.max_conections=5"]));
    assert!(err.contains("did you mean limits.max_connections"), "{err}");
    // A 65th distinct publish window is refused, not run on another class's window.
    let dir = std::env::temp_dir().join(format!("volley-paces-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("volley.toml");
    let classes: String = (1..=70)
        .map(|ms| format!("[[rooms]]\nmatch = \"r{ms}:*\"\npublish_window_ms = {ms}\n"))
        .collect();
    std::fs::write(&file, classes).unwrap();
    let err = run(volley().arg("--config").arg(&file));
    assert!(err.contains("publish_window_ms"), "{err}");
    // A misspelt key in the file gets the nearest key, as a flag does.
    std::fs::write(&file, "[limits]\nmax_conections = 5\n").unwrap();
    let err = run(volley().arg("--config").arg(&file));
    assert!(err.contains("did you mean limits.max_connections"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn an_unreachable_redis_at_start_is_logged() {
    // Below the ephemeral range: a node or Redis another test here starts on port 0
    // cannot be given it meanwhile (one was, once, and answered HTTP to the Redis client).
    let port = common::process::free_port();
    let mut node =
        Running::start(volley().env("REDIS_URL", format!("redis://127.0.0.1:{port}"))).await;
    let line = node.wait_line("cannot reach Redis").await;
    assert!(line.contains(&port.to_string()), "{line}");
    node.signal(libc::SIGTERM);
    assert!(node.exit_status().await.success());
}

/// A node whose Redis sleeps for 8 s with one of the node's publishes in a pipeline it
/// will not answer; returns the node and the stall (finished once Redis wakes).
async fn node_with_a_hung_redis(
    redis: &RedisServer,
    drain_timeout_ms: u64,
) -> (Running, tokio::task::JoinHandle<()>) {
    let drain = format!("server.drain_timeout_ms={drain_timeout_ms}");
    let node = Running::start(volley().env("REDIS_URL", redis.url()).args([
        "--set",
        &drain,
        "--set",
        "api.key=k",
    ]))
    .await;
    wait_status(node.addr, "/readyz", 200).await;
    let asleep = redis.stall(8).await;
    let (status, _) = http(
        node.addr,
        "POST",
        "/api/publish",
        &[("Authorization", "apikey k")],
        br#"{"roomId":"r","content":1}"#,
    )
    .await;
    assert_eq!(status, 200);
    (node, asleep)
}

#[tokio::test]
async fn shutdown_keeps_to_the_drain_timeout_while_redis_hangs() {
    let redis = RedisServer::start().await;
    let (node, asleep) = node_with_a_hung_redis(&redis, 1000).await;
    node.signal(libc::SIGTERM);
    let status = node.exit_status().await;
    assert!(status.success(), "{status:?}");
    assert!(!asleep.is_finished(), "exited only when Redis woke up");
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let redis = RedisServer::start().await;
    let (mut node, asleep) = node_with_a_hung_redis(&redis, 60_000).await;
    // A socket that never answers the close keeps the first shutdown busy (for the close
    // grace) whether or not the node already gave the publish up on the hung Redis.
    let _silent = RawWs::connect(node.addr).await;
    node.signal(libc::SIGTERM);
    node.wait_line("shutting down").await;
    node.signal(libc::SIGTERM);
    let status = node.exit_status().await;
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(!asleep.is_finished(), "exited only when Redis woke up");
}

#[tokio::test]
async fn a_file_limit_below_max_connections_is_named_at_start() {
    use std::os::unix::process::CommandExt;
    let mut cmd = volley();
    // SAFETY: setrlimit only, in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 512,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            Ok(())
        });
    }
    let running = Running::start(cmd.args(["--set", "limits.max_connections=10000"])).await;
    let warning = running
        .logged
        .iter()
        .find(|l| l.contains("limits.max_connections"))
        .unwrap_or_else(|| panic!("no warning: {:?}", running.logged));
    // Raised to the hard limit first, and the fix named.
    assert!(warning.contains("may open 512 files"), "{warning}");
    assert!(warning.contains("LimitNOFILE=10064"), "{warning}");
    // Within the limit: no warning.
    let quiet = Running::start(volley().args(["--set", "limits.max_connections=100"])).await;
    assert!(
        quiet
            .logged
            .iter()
            .all(|l| !l.contains("limits.max_connections")),
        "{:?}",
        quiet.logged
    );
}
