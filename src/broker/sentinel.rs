//! Redis behind Sentinel (`redis.sentinels` + `redis.master_name`): the node asks the
//! sentinels which server is the master, runs the Redis engine on it, and follows every
//! failover. A watch asks again every half second; when the sentinels name another
//! master, a new engine starts on it, takes over this node's room subscriptions and online
//! users, and replaces the old one, which is shut down: publishes it still held (the old
//! master gone, or refusing writes with `READONLY` after a graceful failover) come back
//! here and go to the new master. Durable rooms then repair any gap from the new
//! master's streams, as after any reconnect.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;

use super::redis::{Redirected, RedisStartError};
use super::{
    next_round, BoxFuture, Broker, BrokerState, BrokerStats, Envelope, EnvelopeSink, History,
    HistoryError, OnlineUsers, PresenceError, PublishError, RedisBroker, UserPresence,
};
use crate::config::{Config, Durability};
use crate::metrics::Stats;
use crate::protocol::inbound::Replay;

/// How often the sentinels are asked who the master is.
const WATCH: Duration = Duration::from_millis(500);
/// The shortest pause between two rounds of asking, however often engines hand back.
const PAUSE: Duration = Duration::from_millis(100);
/// A master nobody has named yet: the engine waits on it, unreachable, until one is.
const NO_MASTER: &str = "redis://127.0.0.1:1";

/// What `attach` handed over, kept so every new engine can be attached the same way.
type Attached = (Arc<str>, Weak<dyn EnvelopeSink>, Arc<Stats>);

pub struct SentinelBroker {
    config: Config,
    current: RwLock<Arc<RedisBroker>>,
    master: Mutex<String>,
    attached: OnceLock<Attached>,
    /// What the next engine must take over.
    rooms: Mutex<HashSet<Arc<str>>>,
    users: Mutex<HashSet<Arc<str>>>,
    failovers: AtomicU64,
    /// Publishes an engine handed back: refused by a demoted master, or still held by
    /// an engine being replaced. The watch sends them through the current engine.
    redirected: Arc<Redirected>,
    handed_over: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl SentinelBroker {
    /// Starts on whatever the sentinels name (or nothing yet) and watches them.
    pub fn start(config: &Config) -> Result<Arc<SentinelBroker>, RedisStartError> {
        let redirected = Arc::new(Redirected::default());
        let engine = RedisBroker::start_handing_back(config, NO_MASTER, redirected.clone(), false)?;
        let broker = Arc::new(SentinelBroker {
            config: config.clone(),
            current: RwLock::new(engine),
            master: Mutex::new(NO_MASTER.to_string()),
            attached: OnceLock::new(),
            rooms: Mutex::new(HashSet::new()),
            users: Mutex::new(HashSet::new()),
            failovers: AtomicU64::new(0),
            redirected,
            handed_over: Arc::new(AtomicU64::new(0)),
            stop: CancellationToken::new(),
        });
        tokio::spawn(watch(Arc::downgrade(&broker), broker.stop.clone()));
        Ok(broker)
    }

    fn engine(&self) -> Arc<RedisBroker> {
        self.current.read().clone()
    }

    /// Moves to the master at `url`: a new engine with this node's subscriptions.
    fn switch(&self, url: String) {
        let first = *self.master.lock() == NO_MASTER;
        let engine = match RedisBroker::start_handing_back(
            &self.config,
            &url,
            self.redirected.clone(),
            first,
        ) {
            Ok(engine) => engine,
            Err(e) => {
                tracing::error!(master = %url, error = %e, "cannot start on the master Sentinel named");
                return;
            }
        };
        if let Some((id, sink, stats)) = self.attached.get() {
            engine.attach(id.clone(), sink.clone(), stats.clone());
        }
        // Holding both sets until the swap: a join or a user arriving meanwhile waits and
        // then reaches the new engine (their calls take the set's lock, then `current`).
        let rooms = self.rooms.lock();
        let users = self.users.lock();
        let previous = self.engine();
        // From now on only the new master's messages are delivered, and durable rooms go
        // on from what was delivered here: a message the old master took after the
        // promotion, and the new one gets again below, is not delivered twice.
        previous.stop_delivering();
        for room in rooms.iter() {
            engine.take_position(&previous, room);
            engine.subscribe(room);
        }
        for user in users.iter() {
            engine.user_online(user);
        }
        let old = std::mem::replace(&mut *self.current.write(), engine.clone());
        drop((rooms, users));
        let was = std::mem::replace(&mut *self.master.lock(), url.clone());
        if was != NO_MASTER {
            self.failovers.fetch_add(1, Relaxed);
            tracing::warn!(from = %was, to = %url, "Redis master changed (Sentinel failover); following it");
        } else {
            tracing::info!(master = %url, "Redis master named by Sentinel");
        }
        // The old engine hands over what it held and what it sent in the last seconds
        // (sent again with the stream check: what the new master lacks is appended, in
        // order); only then does the new engine send anything.
        let (redirected, handed_over) = (self.redirected.clone(), self.handed_over.clone());
        tokio::spawn(async move {
            old.shutdown(Instant::now() + Duration::from_secs(1)).await;
            hand_over(&redirected, &engine, &handed_over);
            engine.open_gate();
        });
    }

    /// Sends what an engine handed back through the current engine.
    fn send_handed_back(&self) {
        hand_over(&self.redirected, &self.engine(), &self.handed_over);
    }

    /// The master's URL, as the first sentinel that answers names it.
    async fn ask(&self) -> Option<String> {
        let redis = &self.config.redis;
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

/// Sends what engines handed back through `engine`: doubtful durable messages first (they
/// are the older ones, and are checked against the stream), then the rest.
fn hand_over(redirected: &Redirected, engine: &RedisBroker, counter: &AtomicU64) {
    let doubtful = redirected.take_doubtful();
    counter.fetch_add(doubtful.len() as u64, Relaxed);
    engine.publish_doubtful(&doubtful);
    let envelopes = redirected.take();
    if envelopes.is_empty() {
        return;
    }
    let n = envelopes.len() as u64;
    counter.fetch_add(n, Relaxed);
    if let Err(e) = engine.publish(&envelopes) {
        tracing::warn!(
            publishes = n,
            "publishes handed over to the new master dropped: {e}"
        );
    }
}

fn percent(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Asks the sentinels every `WATCH`, and soon after an engine handed publishes back (a
/// demoted master refusing them is the first sign of a failover).
async fn watch(broker: Weak<SentinelBroker>, stop: CancellationToken) {
    let Some(redirected) = broker.upgrade().map(|b| b.redirected.clone()) else {
        return;
    };
    loop {
        let Some(broker) = broker.upgrade() else {
            return;
        };
        if let Some(url) = broker.ask().await {
            if *broker.master.lock() != url {
                broker.switch(url);
            }
        }
        broker.send_handed_back();
        drop(broker);
        if !next_round(WATCH, PAUSE, &redirected.notify, &stop).await {
            return;
        }
    }
}

impl Broker for SentinelBroker {
    fn engine(&self) -> &'static str {
        "redis-sentinel"
    }

    fn attach(&self, node_id: Arc<str>, sink: Weak<dyn EnvelopeSink>, stats: Arc<Stats>) {
        self.engine()
            .attach(node_id.clone(), sink.clone(), stats.clone());
        let _ = self.attached.set((node_id, sink, stats));
    }

    fn publish(&self, batch: &[Envelope]) -> Result<(), PublishError> {
        self.current.read().publish(batch)
    }

    fn subscribe(&self, room: &Arc<str>) {
        let mut rooms = self.rooms.lock();
        rooms.insert(room.clone());
        self.current.read().subscribe(room);
    }

    fn unsubscribe(&self, room: &str) {
        let mut rooms = self.rooms.lock();
        rooms.remove(room);
        self.current.read().unsubscribe(room);
    }

    fn until_subscribed(&self, room: &str) -> Option<BoxFuture<'static, bool>> {
        self.engine().until_subscribed(room)
    }

    fn state(&self) -> BrokerState {
        self.engine().state()
    }

    fn history<'a>(
        &'a self,
        room: &'a str,
        replay: &'a Replay,
        durability: Durability,
    ) -> BoxFuture<'a, Result<History, HistoryError>> {
        let engine = self.engine();
        Box::pin(async move { engine.history(room, replay, durability).await })
    }

    fn user_online(&self, user: &Arc<str>) {
        let mut users = self.users.lock();
        users.insert(user.clone());
        self.current.read().user_online(user);
    }

    fn user_offline(&self, user: &Arc<str>) {
        let mut users = self.users.lock();
        users.remove(user);
        self.current.read().user_offline(user);
    }

    fn user_rooms_changed(&self, user: &Arc<str>) {
        // An engine that takes over writes every user's rooms at its first refresh.
        self.current.read().user_rooms_changed(user);
    }

    fn online_users(&self, max: usize) -> BoxFuture<'_, Result<OnlineUsers, PresenceError>> {
        let engine = self.engine();
        Box::pin(async move { engine.online_users(max).await })
    }

    fn presence_of<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Option<UserPresence>, PresenceError>> {
        let engine = self.engine();
        Box::pin(async move { engine.presence_of(user).await })
    }

    fn stats(&self) -> BrokerStats {
        let mut stats = self.engine().stats();
        stats.push(("redis_failovers", self.failovers.load(Relaxed)));
        stats.push(("redis_redirected_publishes", self.handed_over.load(Relaxed)));
        stats
    }

    fn shutdown(&self, deadline: Instant) -> BoxFuture<'_, ()> {
        self.stop.cancel();
        let engine = self.engine();
        Box::pin(async move { engine.shutdown(deadline).await })
    }
}
