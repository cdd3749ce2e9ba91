//! Redis behind Sentinel (`redis.sentinels` + `redis.master_name`): the node asks the
//! sentinels which server is the master, runs the Redis engine on it, and follows every
//! failover. The watch asks again every half second, and soon after an engine handed
//! publishes back (a demoted master refusing them is the first sign of a failover); when
//! the sentinels name another master, the set hands over to a new engine on it (see
//! `routed`): publishes the old one still held (the old master gone, or refusing writes
//! with `READONLY` after a graceful failover) go to the new master. Durable rooms then
//! repair any gap from the new master's streams, as after any reconnect.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::{Layout, Route, Starter, Topology};
use crate::broker::redis::{EngineOptions, RedisStartError};
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
    failovers: AtomicU64,
}

impl Sentinel {
    pub(crate) fn new(config: &Config) -> Sentinel {
        Sentinel {
            redis: config.redis.clone(),
            failovers: AtomicU64::new(0),
        }
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

    /// The master's URL, as the first sentinel that answers names it.
    async fn ask(&self) -> Option<String> {
        let redis = &self.redis;
        for sentinel in &redis.sentinels {
            let auth = if redis.sentinel_password.is_empty() {
                String::new()
            } else {
                format!(":{}@", percent(&redis.sentinel_password))
            };
            let Ok(client) = redis::Client::open(format!("redis://{auth}{sentinel}")) else {
                continue;
            };
            let asked = async {
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&redis.master_name)
                    .query_async::<Option<(String, u16)>>(&mut conn)
                    .await
                    .ok()
                    .flatten()
            };
            if let Ok(Some((host, port))) = tokio::time::timeout(WATCH, asked).await {
                let auth = if redis.master_password.is_empty() {
                    String::new()
                } else {
                    format!(":{}@", percent(&redis.master_password))
                };
                return Some(format!("redis://{auth}{host}:{port}"));
            }
        }
        None
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
    type Watch = ();
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
        _: &'a mut (),
    ) -> Option<Layout<OneMaster>> {
        let url = self.ask().await?;
        if url == current.route.master {
            return None;
        }
        let first = current.route.master == NO_MASTER;
        match Self::engine_on(starter, &url, first) {
            Ok(layout) => Some(layout),
            Err(e) => {
                tracing::error!(master = %url, error = %e, "cannot start on the master Sentinel named");
                None
            }
        }
    }

    fn changed(&self, was: &Layout<OneMaster>, now: &Layout<OneMaster>) {
        let (was, now) = (&was.route.master, &now.route.master);
        if was == NO_MASTER {
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

fn percent(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
