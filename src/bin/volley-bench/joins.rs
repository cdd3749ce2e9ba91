//! Connecting and joining many sockets: at a bounded concurrency (`--connect-concurrency`),
//! from several loopback source addresses (`--source-addrs N`: 127.0.0.2, 127.0.0.3, ...,
//! each with its own ephemeral ports), confirmed without a notice per join, and timed.
//!
//! A join is confirmed by its own `user_joined`, or, in a room too big for notices
//! (`limits.notices_max_members`), by a probe: a message `{"probe":"<room>"}` that a prober
//! socket publishes to every room while joins are outstanding (after 0.25 s, 0.5 s, 1 s,
//! then every 2 s; with `--shard i/n` each shard at 1/n of that pace). A
//! probe reaches a socket only once its node delivers the room to it, from any node: the
//! same proof the notice gives. The bench's scanner ignores probes.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::clients::{self, host_port};
use crate::error::BenchError;
use crate::report::JoinReport;

/// The prober's first pause between rounds; it doubles up to `PROBE_EVERY_MAX`: each
/// round is a delivery to every socket of every room, which a join storm of 100 000
/// sockets must not pay four times a second.
const PROBE_EVERY: Duration = Duration::from_millis(250);
const PROBE_EVERY_MAX: Duration = Duration::from_secs(2);
/// Joins are left to their notices this long before probes start.
const PROBES_AFTER: Duration = Duration::from_secs(1);

/// Attempts per socket before the run gives up on it, and the first pause between them.
const ATTEMPTS: u32 = 4;
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// The run's joining: the gate, the source addresses, and the times.
pub struct Joining {
    gate: Semaphore,
    sources: Vec<Ipv4Addr>,
    next_source: AtomicUsize,
    times: Mutex<Histogram<u64>>,
    failed: AtomicU64,
    started: Instant,
}

impl Joining {
    pub fn new(concurrency: usize, source_addrs: usize) -> Joining {
        Joining {
            gate: Semaphore::new(concurrency.max(1)),
            sources: (0..source_addrs.min(250))
                .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i as u8))
                .collect(),
            next_source: AtomicUsize::new(0),
            times: Mutex::new(
                Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds"),
            ),
            failed: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// One socket's connect and join, under the bound, timed and counted. `connect`
    /// gets its place among the sockets connecting at once, to give up once its handshake
    /// is done (the answer to its join may be a probe away), and the time it started.
    /// A failed attempt (refused, dropped mid-handshake) is counted and tried again
    /// after a pause, as a browser would, up to `ATTEMPTS` times; the time is the
    /// successful attempt's.
    pub async fn join<'a, T, Fut>(
        &'a self,
        connect: impl Fn(Option<SemaphorePermit<'a>>, Instant) -> Fut,
    ) -> Result<T, BenchError>
    where
        Fut: Future<Output = Result<T, BenchError>>,
    {
        let mut pause = RETRY_AFTER;
        let mut attempt = 1;
        loop {
            let place = self.gate.acquire().await.ok();
            let started = Instant::now();
            match connect(place, started).await {
                Ok(joined) => {
                    if let Ok(mut times) = self.times.lock() {
                        let _ = times.record((started.elapsed().as_micros() as u64).max(1));
                    }
                    return Ok(joined);
                }
                Err(e) => {
                    self.failed.fetch_add(1, Relaxed);
                    if attempt == ATTEMPTS {
                        return Err(e);
                    }
                }
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
            attempt += 1;
        }
    }

    /// A subscriber's TCP connection, from the next source address when there are some.
    pub async fn tcp(&self, url: &str) -> Result<TcpStream, BenchError> {
        if self.sources.is_empty() {
            return clients::tcp(url).await;
        }
        let (host, port) = host_port(url)?;
        let failed = |source| BenchError::Connect {
            url: url.to_string(),
            source,
        };
        let target: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(failed)?
            .find(SocketAddr::is_ipv4)
            .ok_or_else(|| BenchError::Url {
                url: url.to_string(),
                reason: "--source-addrs needs an IPv4 host (127.0.0.1)".into(),
            })?;
        let n = self.next_source.fetch_add(1, Relaxed);
        let source = self.sources[n % self.sources.len()];
        let socket = TcpSocket::new_v4().map_err(failed)?;
        socket
            .bind(SocketAddr::new(IpAddr::V4(source), 0))
            .map_err(failed)?;
        let stream = socket.connect(target).await.map_err(failed)?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// How the connect and join storm went, once every socket is in.
    pub fn report(&self, sockets: usize) -> JoinReport {
        let seconds = self.started.elapsed().as_secs_f64();
        let ms = |us: u64| us as f64 / 1000.0;
        let (p50, p99, max) = match self.times.lock() {
            Ok(t) => (
                ms(t.value_at_quantile(0.5)),
                ms(t.value_at_quantile(0.99)),
                ms(t.max()),
            ),
            Err(_) => (0.0, 0.0, 0.0),
        };
        let rss = rss_bytes();
        JoinReport {
            sockets,
            seconds,
            sockets_per_s: sockets as f64 / seconds.max(1e-9),
            p50_ms: p50,
            p99_ms: p99,
            max_ms: max,
            failed: self.failed.load(Relaxed),
            bench_rss_mb: rss.map(|b| b as f64 / 1e6),
            bench_kib_per_socket: rss.map(|b| b as f64 / 1024.0 / sockets.max(1) as f64),
        }
    }
}

/// `{"probe":"<room>"}` as it appears in a frame (room ids here need no escaping).
pub fn probe_of(room: &str) -> Vec<u8> {
    format!(r#"{{"probe":"{room}"}}"#).into_bytes()
}

/// Publishes a probe to every room, a few times a second, until `stop` (after giving
/// notices a second to answer the joins first).
/// `shards` processes probe the same room, each at 1/`shards` of the pace, so the room
/// gets one probe round per pause in all (seven probers at full pace, each round a
/// delivery to every socket joined so far, starved the 100 000-socket storm's
/// handshakes past the nodes' header timeout).
pub async fn prober(url: String, rooms: Vec<String>, shards: u32, stop: CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(PROBES_AFTER) => {}
        _ = stop.cancelled() => return,
    }
    let Ok(mut ws) = clients::connect(&url).await else {
        eprintln!("volley-bench: the prober could not connect to {url}; joins wait for notices");
        return;
    };
    let shards = shards.max(1);
    let mut pause = PROBE_EVERY * shards;
    loop {
        for room in &rooms {
            let probe = String::from_utf8_lossy(&probe_of(room)).into_owned();
            let frame = format!(r#"{{"type":"message","roomId":"{room}","content":{probe}}}"#);
            // Refusals (the socket's publish rate) come back as error frames, unread:
            // the next round sends again.
            if clients::send_text(&mut ws, frame).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => return,
        }
        pause = (pause * 2).min(PROBE_EVERY_MAX * shards);
    }
}

/// The process's resident memory, from `/proc/self/status`.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Raises the soft limit on open files to the hard one; an error naming what to raise
/// when even that is below what `sockets` need.
pub fn raise_file_limit(sockets: usize) -> Result<(), String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Ok(());
    }
    let need = sockets as u64 + 64;
    if limit.rlim_cur < need && limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    }
    if limit.rlim_max < need {
        return Err(format!(
            "{sockets} sockets need about {need} open files, and this process may hold at most {} (the hard limit): raise it (`ulimit -Hn {need}` as root, LimitNOFILE= in a systemd unit, nofile in /etc/security/limits.conf), or split the sockets over several volley-bench processes",
            limit.rlim_max
        ));
    }
    Ok(())
}
