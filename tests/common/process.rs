//! `volley` processes for the tests that must kill one (SIGKILL: no goodbye) or signal it
//! (SIGTERM: a graceful drain): a node on a fixed port, started again on the same port
//! after a kill, its log appended to one file.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::WAIT;

/// A free port below the ephemeral range (from 32 768): a killed node or Redis comes back
/// on its port, which a client connection's own port must not have taken meanwhile.
pub fn free_port() -> u16 {
    loop {
        let port = fastrand::u16(24_000..26_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub struct NodeProcess {
    pub name: String,
    pub addr: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    redis_url: String,
    args: Vec<String>,
    child: Option<Child>,
    /// A directory of its own (`alone`), removed when the node is dropped.
    own_dir: Option<PathBuf>,
}

impl NodeProcess {
    /// A node named `name` on the Redis at `redis_url`, with the config file `toml` (what
    /// only a file can give, `[[rooms]]`) and more flags (`--set KEY=VALUE`, ...); its
    /// files go in `dir`.
    pub fn new(dir: &Path, name: &str, redis_url: &str, toml: &str, args: &[&str]) -> NodeProcess {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).expect("write config");
        NodeProcess {
            name: name.to_string(),
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            log: dir.join(format!("{name}.log")),
            config,
            redis_url: redis_url.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
            own_dir: None,
        }
    }

    /// A node with a directory of its own for its files, started: the usual case of a
    /// test that needs one process to kill or signal.
    pub async fn alone(name: &str, redis_url: &str, toml: &str, args: &[&str]) -> NodeProcess {
        let dir = std::env::temp_dir().join(format!("volley-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("node dir");
        let mut node = NodeProcess::new(&dir, name, redis_url, toml, args);
        node.own_dir = Some(dir);
        node.start().await;
        node
    }

    /// Starts the process and waits until it listens.
    pub async fn start(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_volley"))
            .arg("--config")
            .arg(&self.config)
            .args(["--listen", &self.addr.to_string(), "--node-id", &self.name])
            .args(["--log", "warn"])
            .args(["--set", "api.key=test-key"])
            .args(&self.args)
            .env_remove("RUST_LOG")
            .env("REDIS_URL", &self.redis_url)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start volley");
        self.child = Some(child);
        let addr = self.addr;
        let up = tokio::time::timeout(WAIT, async {
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(up.is_ok(), "{} did not start listening", self.name);
    }

    /// SIGKILL, and wait for it: no goodbye to anyone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (a graceful drain); returns the exit code once it exited (bounded by WAIT).
    pub async fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling the child process this test started.
        let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(sent, 0, "SIGTERM to {}", self.name);
        tokio::time::timeout(WAIT, tokio::task::spawn_blocking(move || child.wait()))
            .await
            .expect("volley did not exit after SIGTERM")
            .expect("wait task")
            .expect("wait")
            .code()
    }

    /// Still running (not exited by itself).
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = self.own_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
