//! Redis behind Sentinel (`redis.sentinels` + `redis.master_name`): the node asks the
//! sentinels which server is the master, runs the Redis engine on it, and follows every
//! failover. The watch asks again every half second, and soon after an engine handed
//! publishes back (a demoted master refusing them is the first sign of a failover); when
//! the sentinels name another master, the set hands over to a new engine on it (see
//! `routed`): publishes the old one still held (the old master gone, or refusing writes
//! with `READONLY` after a graceful failover) go to the new master. Durable rooms then
//! repair any gap from the new master's streams, as after any reconnect.
//!
//! Sentinels given as `rediss://host:port` are reached over TLS, and so are the masters
//! they name (Redis's own TLS deployments run sentinels with `tls-replication yes`, so
//! the addresses they hand out are TLS ports), with the `redis.tls_*` certificates.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{ConnectionInfo, IntoConnectionInfo, TlsCertificates};

use super::{connect_to, Layout, Route, Starter, Streak, Topology};
use crate::broker::redis::{tls, EngineOptions, RedisStartError};
use crate::broker::Counter;
use crate::config::{Config, RedisConfig};

/// How often the sentinels are asked who the master is.
const WATCH: Duration = Duration::from_millis(500);
/// The shortest pause between two rounds of asking, however often engines hand back.
const PAUSE: Duration = Duration::from_millis(100);
/// A master nobody has named yet: the engine waits on it, unreachable, until one is.
const NO_MASTER: &str = "redis://127.0.0.1:1";

pub(crate) struct Sentinel {
    redis: RedisConfig,
    /// Each sentinel's connection settings: its address, `redis.sentinel_password`, TLS
    /// for `rediss://`.
    sentinels: Vec<(String, ConnectionInfo)>,
    /// How the masters the sentinels name are reached: `rediss` when the sentinels are.
    scheme: &'static str,
    /// `redis.tls_*`, for the connections to the sentinels (engines read them themselves).
    certs: Option<TlsCertificates>,
    /// No sentinel answered: logged once per streak.
    unreachable: Streak,
    failovers: AtomicU64,
}

impl Sentinel {
    pub(crate) fn new(config: &Config) -> Result<Sentinel, RedisStartError> {
        let redis = &config.redis;
        let mut sentinels = Vec::with_capacity(redis.sentinels.len());
        for address in &redis.sentinels {
            let url = if address.contains("://") {
                address.clone()
            } else {
                format!("redis://{address}")
            };
            let mut info = url
                .as_str()
                .into_connection_info()
                .map_err(RedisStartError::BadUrl)?;
            if !redis.sentinel_password.is_empty() {
                let settings = info
                    .redis_settings()
                    .clone()
                    .set_password(&redis.sentinel_password);
                info = info.set_redis_settings(settings);
            }
            sentinels.push((address.clone(), info));
        }
        let tls = redis.sentinels.iter().any(|s| s.starts_with("rediss://"));
        Ok(Sentinel {
            redis: redis.clone(),
            sentinels,
            scheme: if tls { "rediss" } else { "redis" },
            certs: tls::certificates(redis).map_err(RedisStartError::Tls)?,
            unreachable: Streak::default(),
            failovers: AtomicU64::new(0),
        })
    }

    /// An engine on the master at `url`: it takes over from the engine before it
    /// (gated). The node's first real master's engine, like a standalone one at start,
    /// first announces what a previous life of this node id left behind; later ones
    /// take over from a live engine and must not.
    fn engine_on(
        starter: &Starter,
        url: &str,
        first: bool,
    ) -> Result<Layout<OneMaster>, RedisStartError> {
        let options = EngineOptions {
            gated: true,
            previous_life: first,
            ..EngineOptions::standalone(starter.config(), url)?
        };
        Ok(Layout {
            engines: vec![starter.start(options)?],
            route: OneMaster {
                master: url.to_string(),
            },
        })
    }

    /// The master's URL, as the sentinel that answered last names it (its connection
    /// kept in `asking`: no new connection, and no TLS handshake, every round), else the
    /// first that answers; else why the last one did not.
    async fn ask(&self, asking: &mut Option<MultiplexedConnection>) -> Result<String, String> {
        if let Some(conn) = asking.as_mut() {
            match self.master_of(conn).await {
                Ok(master) => return Ok(self.master_url(master)),
                Err(_) => *asking = None,
            }
        }
        let mut why = String::from("no sentinel to ask");
        for (address, info) in &self.sentinels {
            let mut conn = match connect_to(info.clone(), self.certs.as_ref(), WATCH).await {
                Ok(conn) => conn,
                Err(e) => {
                    why = format!("{address}: {e}");
                    continue;
                }
            };
            match self.master_of(&mut conn).await {
                Ok(master) => {
                    *asking = Some(conn);
                    return Ok(self.master_url(master));
                }
                Err(e) => why = format!("{address}: {e}"),
            }
        }
        Err(why)
    }

    /// `SENTINEL get-master-addr-by-name` on one sentinel's connection, within `WATCH`.
    async fn master_of(&self, conn: &mut MultiplexedConnection) -> Result<(String, u16), String> {
        let name = &self.redis.master_name;
        let mut cmd = redis::cmd("SENTINEL");
        cmd.arg("get-master-addr-by-name").arg(name);
        match tokio::time::timeout(WATCH, cmd.query_async::<Option<(String, u16)>>(conn)).await {
            Ok(Ok(Some(master))) => Ok(master),
            Ok(Ok(None)) => Err(format!("names no master {name:?}")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {WATCH:?}")),
        }
    }

    /// The URL of the master at `host:port`: reached the way the sentinels are, with
    /// `redis.master_password`.
    fn master_url(&self, (host, port): (String, u16)) -> String {
        let auth = if self.redis.master_password.is_empty() {
            String::new()
        } else {
            format!(":{}@", percent(&self.redis.master_password))
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        format!("{}://{auth}{host}:{port}", self.scheme)
    }
}

/// Everything on the one engine, on the master Sentinel named.
pub(crate) struct OneMaster {
    master: String,
}

impl Route for OneMaster {
    fn room(&self, _: &str) -> Option<usize> {
        Some(0)
    }

    fn user(&self, _: &str) -> Option<usize> {
        Some(0)
    }

    fn home(&self) -> Option<usize> {
        Some(0)
    }

    fn listing(&self) -> Vec<usize> {
        vec![0]
    }
}

impl Topology for Sentinel {
    type Route = OneMaster;
    /// The connection of the sentinel that answered last.
    type Watch = Option<MultiplexedConnection>;
    const ENGINE: &'static str = "redis-sentinel";
    const ROUNDS: Option<(Duration, Duration)> = Some((WATCH, PAUSE));
    const UNSERVED: &'static str = "no Redis master named by Sentinel yet";

    /// Starts on nothing until the sentinels name a master.
    fn first(&self, starter: &Starter) -> Result<Layout<OneMaster>, RedisStartError> {
        let mut layout = Self::engine_on(starter, NO_MASTER, false)?;
        layout.route.master = NO_MASTER.to_string();
        Ok(layout)
    }

    async fn look<'a>(
        &'a self,
        starter: &'a Starter,
        current: &'a Layout<OneMaster>,
        asking: &'a mut Option<MultiplexedConnection>,
    ) -> Option<Layout<OneMaster>> {
        let url = match self.ask(asking).await {
            Ok(url) => {
                self.unreachable.ended();
                url
            }
            Err(why) => {
                if self.unreachable.began() {
                    if current.route.master == NO_MASTER {
                        tracing::warn!(
                            error = %why,
                            "no sentinel named the Redis master; serving local sockets only, /readyz answers 503 until one does"
                        );
                    } else {
                        let master = shown(&current.route.master);
                        tracing::warn!(error = %why, %master, "no sentinel answered; staying on the master named last");
                    }
                }
                return None;
            }
        };
        if url == current.route.master {
            return None;
        }
        let first = current.route.master == NO_MASTER;
        match Self::engine_on(starter, &url, first) {
            Ok(layout) => Some(layout),
            Err(e) => {
                tracing::error!(master = %shown(&url), error = %e, "cannot start on the master Sentinel named");
                None
            }
        }
    }

    fn changed(&self, was: &Layout<OneMaster>, now: &Layout<OneMaster>) {
        let (was, now) = (shown(&was.route.master), shown(&now.route.master));
        if was.as_str() == NO_MASTER {
            tracing::info!(master = %now, "Redis master named by Sentinel");
        } else {
            self.failovers.fetch_add(1, Relaxed);
            tracing::warn!(from = %was, to = %now, "Redis master changed (Sentinel failover); following it");
        }
    }

    fn counters(&self) -> Vec<Counter> {
        vec![Counter::count(
            "redis_failovers",
            "Times the node moved to a new master that Sentinel named.",
            self.failovers.load(Relaxed),
        )]
    }
}

/// A master's URL for the log: `redis.master_password` left out.
fn shown(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, at))) => format!("{scheme}://{at}"),
        _ => url.to_string(),
    }
}

fn percent(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
