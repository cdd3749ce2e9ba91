//! Redis Cluster (`redis.cluster_nodes`): rooms use sharded pub/sub (`SPUBLISH` /
//! `SSUBSCRIBE`), so a room's messages travel only within the shard that owns its slot,
//! instead of plain `PUBLISH`, which a cluster copies to every one of its nodes.
//!
//! The node reads the slot map (`CLUSTER SLOTS`) and runs one Redis engine per master
//! that serves slots: its own pipelines, its own sharded pub/sub connection, its own
//! probe. A room goes to the master of its slot; a room's channel, stream and position
//! share the hash tag `{<roomId>}`, so the durable publish script stays in one slot and
//! rooms spread over all 16 384 slots by their ids. What is not a room (broadcasts,
//! presence, direct messages) lives on the master of the home tag `{volley}`.
//!
//! Slots move (a resharding, a master added, a replica promoted): the map is read again
//! every second, and at once when a master answers `MOVED`/`ASK`/`TRYAGAIN`/
//! `CLUSTERDOWN` or takes a subscription away (`sunsubscribe`). A room whose slot moved
//! is subscribed on its new master's engine before the old one lets it go. Publishes a
//! master refused did not run: they come back here and are routed again by the new map.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use redis::aio::MultiplexedConnection;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Value};
use tokio_util::sync::CancellationToken;

use super::redis::{slot, Keys, Redirected, RedisStartError, HOME_TAG};
use super::{
    add_stats, next_round, BoxFuture, Broker, BrokerState, BrokerStats, Envelope, EnvelopeSink,
    History, HistoryError, OnlineUsers, PresenceError, PublishError, RedisBroker, Target,
    UserPresence,
};
use crate::config::{Config, Durability};
use crate::metrics::Stats;
use crate::protocol::inbound::Replay;

/// How often the slot map is read when nothing asks for it sooner.
const REFRESH: Duration = Duration::from_secs(1);
/// The shortest pause between two reads, however often masters redirect.
const MIN_REFRESH: Duration = Duration::from_millis(100);
/// How long one node may take to connect and answer `CLUSTER SLOTS`.
const ASK_WAIT: Duration = Duration::from_secs(1);
const SLOTS: usize = 16_384;
/// A slot no master serves.
const UNSERVED: u16 = u16::MAX;

/// What `attach` handed over, kept so every new engine can be attached the same way.
type Attached = (Arc<str>, Weak<dyn EnvelopeSink>, Arc<Stats>);

#[derive(Clone)]
struct Master {
    host: String,
    port: u16,
    /// A hash tag whose slot this master serves: the engine's probe channel and
    /// live-node set carry it. Every node picks the same one from the same map.
    tag: String,
    engine: Arc<RedisBroker>,
}

/// One reading of the slot map, with an engine per master.
struct Topology {
    masters: Vec<Master>,
    /// Each slot's master, as an index into `masters`.
    owner: Vec<u16>,
}

impl Topology {
    fn empty() -> Topology {
        Topology {
            masters: Vec::new(),
            owner: vec![UNSERVED; SLOTS],
        }
    }

    fn engine_at(&self, slot: u16) -> Option<&Arc<RedisBroker>> {
        let owner = *self.owner.get(usize::from(slot))?;
        self.masters.get(usize::from(owner)).map(|m| &m.engine)
    }

    fn home(&self) -> Option<&Arc<RedisBroker>> {
        self.engine_at(slot(HOME_TAG.as_bytes()))
    }

    fn room(&self, keys: &Keys, room: &str) -> Option<&Arc<RedisBroker>> {
        self.engine_at(keys.room_slot(room))
    }

    fn engine_for(&self, keys: &Keys, target: &Target) -> Option<&Arc<RedisBroker>> {
        match target {
            Target::Room(room) => self.room(keys, room),
            Target::Broadcast | Target::User(_) => self.home(),
        }
    }

    /// Every slot has a master.
    fn complete(&self) -> bool {
        !self.masters.is_empty() && !self.owner.contains(&UNSERVED)
    }
}

/// One range of `CLUSTER SLOTS`: first slot, last slot, the master's host and port.
type SlotRange = (u16, u16, String, u16);

pub struct ClusterBroker {
    config: Config,
    /// The first cluster node's connection settings (credentials, database): every
    /// master is reached with them.
    base: ConnectionInfo,
    /// For room slots (names with hash tags, as every engine's).
    keys: Keys,
    topology: RwLock<Arc<Topology>>,
    attached: OnceLock<Attached>,
    /// What a master's new engine must take over.
    rooms: Mutex<HashSet<Arc<str>>>,
    users: Mutex<HashSet<Arc<str>>>,
    /// Publishes refused by a master (or made before the first map), to route again.
    redirected: Arc<Redirected>,
    changes: AtomicU64,
    redirects: AtomicU64,
    /// Counters of engines that were shut down, so the node's totals never go back:
    /// engines still shutting down, and the final counts of those done.
    retiring: Arc<Mutex<Vec<Arc<RedisBroker>>>>,
    retired: Arc<Mutex<BrokerStats>>,
    stop: CancellationToken,
}

impl ClusterBroker {
    /// Starts without a map and reads it in the background: a node starts while the
    /// cluster is down and reports it through `/readyz`.
    pub fn start(config: &Config) -> Result<Arc<ClusterBroker>, RedisStartError> {
        let first = config
            .redis
            .cluster_nodes
            .first()
            .map(String::as_str)
            .unwrap_or_default();
        let base = first
            .into_connection_info()
            .map_err(RedisStartError::BadUrl)?;
        let broker = Arc::new(ClusterBroker {
            config: config.clone(),
            base,
            keys: Keys::cluster(&config.redis.key_prefix, &config.server.node_id, ""),
            topology: RwLock::new(Arc::new(Topology::empty())),
            attached: OnceLock::new(),
            rooms: Mutex::new(HashSet::new()),
            users: Mutex::new(HashSet::new()),
            redirected: Arc::new(Redirected::default()),
            changes: AtomicU64::new(0),
            redirects: AtomicU64::new(0),
            retiring: Arc::new(Mutex::new(Vec::new())),
            retired: Arc::new(Mutex::new(Vec::new())),
            stop: CancellationToken::new(),
        });
        tokio::spawn(watch(Arc::downgrade(&broker), broker.stop.clone()));
        Ok(broker)
    }

    fn topology(&self) -> Arc<Topology> {
        self.topology.read().clone()
    }

    /// The nodes to ask for the map: the masters in use, then the configured ones.
    fn candidates(&self) -> Vec<(String, u16)> {
        let mut out: Vec<(String, u16)> = self
            .topology()
            .masters
            .iter()
            .map(|m| (m.host.clone(), m.port))
            .collect();
        for url in &self.config.redis.cluster_nodes {
            if let Ok(info) = url.as_str().into_connection_info() {
                if let ConnectionAddr::Tcp(host, port) = info.addr() {
                    if !out.iter().any(|(h, p)| h == host && p == port) {
                        out.push((host.clone(), *port));
                    }
                }
            }
        }
        out
    }

    /// The slot map: from the node that answered last time (its connection kept in
    /// `asking`), else from the first candidate that answers.
    async fn read_slots(
        &self,
        asking: &mut Option<MultiplexedConnection>,
    ) -> Option<Vec<SlotRange>> {
        if let Some(conn) = asking.as_mut() {
            match ask_slots(conn).await {
                Some(ranges) => return Some(ranges),
                None => *asking = None,
            }
        }
        for (host, port) in self.candidates() {
            let info = self.base.clone().set_addr(ConnectionAddr::Tcp(host, port));
            let Ok(client) = redis::Client::open(info) else {
                continue;
            };
            let connect = client.get_multiplexed_async_connection();
            let Ok(Ok(mut conn)) = tokio::time::timeout(ASK_WAIT, connect).await else {
                continue;
            };
            if let Some(ranges) = ask_slots(&mut conn).await {
                *asking = Some(conn);
                return Some(ranges);
            }
        }
        None
    }

    /// Follows a new map: engines for new masters, rooms and users moved to the engine
    /// of their slot's master, engines no map needs any more shut down. As with
    /// Sentinel, a replaced engine stops delivering at once and hands over what it held
    /// (and its last seconds of durable appends, checked against the stream) before the
    /// new engines send anything.
    fn apply(self: &Arc<Self>, ranges: &[SlotRange]) {
        let current = self.topology();
        let mut addrs: Vec<(String, u16)> = Vec::new();
        let mut owner = vec![UNSERVED; SLOTS];
        for (first, last, host, port) in ranges {
            let index = match addrs.iter().position(|(h, p)| h == host && p == port) {
                Some(i) => i,
                None => {
                    addrs.push((host.clone(), *port));
                    addrs.len() - 1
                }
            };
            for slot in *first..=(*last).min(SLOTS as u16 - 1) {
                owner[usize::from(slot)] = index as u16;
            }
        }
        let same_masters = addrs.len() == current.masters.len()
            && addrs
                .iter()
                .zip(&current.masters)
                .all(|((h, p), m)| *h == m.host && *p == m.port);
        if same_masters && owner == current.owner {
            return;
        }
        let mut masters = Vec::with_capacity(addrs.len());
        let mut started = Vec::new();
        let first_map = current.masters.is_empty();
        for (index, (host, port)) in addrs.into_iter().enumerate() {
            let index = index as u16;
            let kept = current.masters.iter().find(|m| {
                m.host == host
                    && m.port == port
                    && owner[usize::from(slot(m.tag.as_bytes()))] == index
            });
            if let Some(master) = kept {
                masters.push(master.clone());
                continue;
            }
            let Some(tag) = (0..100_000)
                .map(|k| format!("volley-{k}"))
                .find(|tag| owner[usize::from(slot(tag.as_bytes()))] == index)
            else {
                continue;
            };
            let info = self
                .base
                .clone()
                .set_addr(ConnectionAddr::Tcp(host.clone(), port));
            let engine = match RedisBroker::start_member(
                &self.config,
                info,
                &tag,
                self.redirected.clone(),
                !first_map,
            ) {
                Ok(engine) => engine,
                Err(e) => {
                    tracing::error!(master = %format!("{host}:{port}"), error = %e, "cannot start on a cluster master");
                    continue;
                }
            };
            if let Some((id, sink, stats)) = self.attached.get() {
                engine.attach(id.clone(), sink.clone(), stats.clone());
            }
            started.push(engine.clone());
            masters.push(Master {
                host,
                port,
                tag,
                engine,
            });
        }
        let next = Arc::new(Topology { masters, owner });
        let retiring: Vec<Arc<RedisBroker>> = current
            .masters
            .iter()
            .filter(|m| {
                !next
                    .masters
                    .iter()
                    .any(|n| Arc::ptr_eq(&n.engine, &m.engine))
            })
            .map(|m| m.engine.clone())
            .collect();
        for engine in &retiring {
            engine.stop_delivering();
        }
        // Holding both sets until the swap: a join or a user arriving meanwhile waits and
        // then reaches the engine of the new map (their calls take the set's lock first).
        let rooms = self.rooms.lock();
        let users = self.users.lock();
        for room in rooms.iter() {
            let (was, now) = (current.room(&self.keys, room), next.room(&self.keys, room));
            if !same(was, now) {
                if let Some(now) = now {
                    if let Some(was) = was {
                        now.take_position(was, room);
                    }
                    now.subscribe(room);
                }
                if let Some(was) = was {
                    was.unsubscribe(room);
                }
            }
        }
        let (was_home, home) = (current.home(), next.home());
        if !same(was_home, home) {
            for user in users.iter() {
                if let Some(home) = home {
                    home.user_online(user);
                }
                if let Some(was) = was_home {
                    was.user_offline(user);
                }
            }
        }
        for master in &next.masters {
            master
                .engine
                .set_home(home.is_some_and(|home| Arc::ptr_eq(home, &master.engine)));
        }
        let old = std::mem::replace(&mut *self.topology.write(), next.clone());
        drop((rooms, users));
        if old.masters.is_empty() {
            tracing::info!(masters = next.masters.len(), "Redis Cluster slot map read");
        } else {
            self.changes.fetch_add(1, Relaxed);
            tracing::warn!(
                masters = next.masters.len(),
                complete = next.complete(),
                "Redis Cluster slot map changed; following it"
            );
        }
        drop(old);
        self.retire(retiring, started);
    }

    /// Shuts engines down in the background; what they held comes back through
    /// `redirected` and is routed by the new map; then the new engines may send.
    fn retire(self: &Arc<Self>, engines: Vec<Arc<RedisBroker>>, started: Vec<Arc<RedisBroker>>) {
        self.retiring.lock().extend(engines.iter().cloned());
        let broker = Arc::downgrade(self);
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(1);
            for engine in &engines {
                engine.shutdown(deadline).await;
            }
            if let Some(broker) = broker.upgrade() {
                // Both locks at once, so `stats` never counts an engine twice or not at all.
                let mut retiring = broker.retiring.lock();
                let mut retired = broker.retired.lock();
                for engine in &engines {
                    retiring.retain(|e| !Arc::ptr_eq(e, engine));
                    let counts = engine
                        .stats()
                        .into_iter()
                        .filter(|(name, _)| !is_gauge(name));
                    add_stats(&mut retired, counts.collect());
                }
                drop((retiring, retired));
                broker.route_redirected();
            }
            for engine in &started {
                engine.open_gate();
            }
        });
    }

    /// Routes again what masters refused (and what came before the first map).
    fn route_redirected(&self) {
        let topology = self.topology();
        // Doubtful durable messages first (the older ones), each to its room's master.
        let mut unroutable = Vec::new();
        for envelope in self.redirected.take_doubtful() {
            match topology.engine_for(&self.keys, &envelope.target) {
                Some(engine) => {
                    self.redirects.fetch_add(1, Relaxed);
                    engine.publish_doubtful(std::slice::from_ref(&envelope));
                }
                None => unroutable.push(envelope),
            }
        }
        if !unroutable.is_empty() {
            self.redirected.hand_back_doubtful(unroutable);
        }
        let envelopes = self.redirected.take();
        if envelopes.is_empty() {
            return;
        }
        let mut unroutable = Vec::new();
        for envelope in envelopes {
            match topology.engine_for(&self.keys, &envelope.target) {
                Some(engine) => {
                    self.redirects.fetch_add(1, Relaxed);
                    if engine.publish(std::slice::from_ref(&envelope)).is_err() {
                        self.count_dropped(1);
                    }
                }
                None => unroutable.push(envelope),
            }
        }
        if !unroutable.is_empty() {
            self.redirected.hand_back(unroutable);
        }
    }

    fn count_dropped(&self, n: u64) {
        add_stats(
            &mut self.retired.lock(),
            vec![("redis_dropped_publishes", n)],
        );
    }
}

/// An engine figure that is a level, not a count: a retired engine's is gone with it.
fn is_gauge(name: &str) -> bool {
    crate::metrics::BROKER_GAUGES.contains(&name)
}

/// Whether two lookups found the same engine (or both none).
fn same(a: Option<&Arc<RedisBroker>>, b: Option<&Arc<RedisBroker>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// `CLUSTER SLOTS` on one connection, within `ASK_WAIT`; `None` for no usable answer.
async fn ask_slots(conn: &mut MultiplexedConnection) -> Option<Vec<SlotRange>> {
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg("SLOTS");
    let value = tokio::time::timeout(ASK_WAIT, cmd.query_async::<Value>(conn))
        .await
        .ok()?
        .ok()?;
    parse_slots(&value).filter(|ranges| !ranges.is_empty())
}

/// `CLUSTER SLOTS`: `[[first, last, [host, port, id, ...], replicas...], ...]`.
fn parse_slots(value: &Value) -> Option<Vec<SlotRange>> {
    let Value::Array(ranges) = value else {
        return None;
    };
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(parts) = range else {
            return None;
        };
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            return None;
        };
        let (Some(host), Some(Value::Int(port))) = (master.first(), master.get(1)) else {
            return None;
        };
        let host = match host {
            Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok()?,
            Value::SimpleString(s) => s.clone(),
            _ => return None,
        };
        out.push((
            u16::try_from(*first).ok()?,
            u16::try_from(*last).ok()?,
            host,
            u16::try_from(*port).ok()?,
        ));
    }
    Some(out)
}

/// Reads the slot map every second, and soon after a master redirected something.
async fn watch(broker: Weak<ClusterBroker>, stop: CancellationToken) {
    let mut asking = None;
    loop {
        let Some(b) = broker.upgrade() else { return };
        let redirected = b.redirected.clone();
        match b.read_slots(&mut asking).await {
            Some(ranges) => b.apply(&ranges),
            None => {
                if !b.topology().masters.is_empty() {
                    tracing::warn!(
                        "no Redis Cluster node answered CLUSTER SLOTS; keeping the last map"
                    );
                }
            }
        }
        b.route_redirected();
        drop(b);
        if !next_round(REFRESH, MIN_REFRESH, &redirected.notify, &stop).await {
            return;
        }
    }
}

impl Broker for ClusterBroker {
    fn engine(&self) -> &'static str {
        "redis-cluster"
    }

    fn attach(&self, node_id: Arc<str>, sink: Weak<dyn EnvelopeSink>, stats: Arc<Stats>) {
        for master in &self.topology().masters {
            master
                .engine
                .attach(node_id.clone(), sink.clone(), stats.clone());
        }
        let _ = self.attached.set((node_id, sink, stats));
    }

    fn publish(&self, batch: &[Envelope]) -> Result<(), PublishError> {
        let topology = self.topology.read();
        for envelope in batch {
            match topology.engine_for(&self.keys, &envelope.target) {
                Some(engine) => engine.publish(std::slice::from_ref(envelope))?,
                None => {
                    // No map yet, or nobody serves the slot: held for the next map,
                    // within the same bound as an engine's queue.
                    if self.redirected.len() >= self.config.redis.outage_buffer {
                        return Err(PublishError::Overloaded);
                    }
                    self.redirected.hand_back([envelope.clone()]);
                }
            }
        }
        Ok(())
    }

    fn subscribe(&self, room: &Arc<str>) {
        let mut rooms = self.rooms.lock();
        rooms.insert(room.clone());
        if let Some(engine) = self.topology.read().room(&self.keys, room) {
            engine.subscribe(room);
        }
    }

    fn unsubscribe(&self, room: &str) {
        let mut rooms = self.rooms.lock();
        rooms.remove(room);
        if let Some(engine) = self.topology.read().room(&self.keys, room) {
            engine.unsubscribe(room);
        }
    }

    fn until_subscribed(&self, room: &str) -> Option<BoxFuture<'static, bool>> {
        let topology = self.topology();
        match topology.room(&self.keys, room) {
            Some(engine) => engine.until_subscribed(room),
            // No master serves the room's slot yet: nothing to wait for that would come.
            None => Some(Box::pin(std::future::ready(false))),
        }
    }

    /// Connected while every slot has a master and every master's engine is connected.
    fn state(&self) -> BrokerState {
        let topology = self.topology();
        if !topology.complete() {
            return BrokerState::Reconnecting;
        }
        BrokerState::all(topology.masters.iter().map(|m| m.engine.state()))
    }

    fn history<'a>(
        &'a self,
        room: &'a str,
        replay: &'a Replay,
        durability: Durability,
    ) -> BoxFuture<'a, Result<History, HistoryError>> {
        let engine = self.topology().room(&self.keys, room).cloned();
        Box::pin(async move {
            let Some(engine) = engine else {
                return Err(HistoryError::Unavailable(
                    "no Redis Cluster master serves the room's slot yet".into(),
                ));
            };
            engine.history(room, replay, durability).await
        })
    }

    fn user_online(&self, user: &Arc<str>) {
        let mut users = self.users.lock();
        users.insert(user.clone());
        if let Some(home) = self.topology.read().home() {
            home.user_online(user);
        }
    }

    fn user_offline(&self, user: &Arc<str>) {
        let mut users = self.users.lock();
        users.remove(user);
        if let Some(home) = self.topology.read().home() {
            home.user_offline(user);
        }
    }

    fn user_rooms_changed(&self, user: &Arc<str>) {
        // A new home engine writes every user's rooms at its first refresh.
        if let Some(home) = self.topology.read().home() {
            home.user_rooms_changed(user);
        }
    }

    fn online_users(&self, max: usize) -> BoxFuture<'_, Result<OnlineUsers, PresenceError>> {
        let home = self.topology().home().cloned();
        Box::pin(async move {
            match home {
                Some(home) => home.online_users(max).await,
                None => Err(PresenceError::Unavailable(
                    "no Redis Cluster slot map yet".into(),
                )),
            }
        })
    }

    fn presence_of<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Option<UserPresence>, PresenceError>> {
        let home = self.topology().home().cloned();
        Box::pin(async move {
            match home {
                Some(home) => home.presence_of(user).await,
                None => Err(PresenceError::Unavailable(
                    "no Redis Cluster slot map yet".into(),
                )),
            }
        })
    }

    /// Every engine's counters summed by name (with those of engines shut down), and
    /// the map's changes.
    fn stats(&self) -> BrokerStats {
        let mut total: BrokerStats = Vec::new();
        for master in &self.topology().masters {
            add_stats(&mut total, master.engine.stats());
        }
        let retiring = self.retiring.lock();
        let retired = self.retired.lock();
        for engine in retiring.iter() {
            let counts = engine
                .stats()
                .into_iter()
                .filter(|(name, _)| !is_gauge(name));
            add_stats(&mut total, counts.collect());
        }
        add_stats(&mut total, retired.clone());
        total.push(("redis_cluster_changes", self.changes.load(Relaxed)));
        total.push(("redis_redirected_publishes", self.redirects.load(Relaxed)));
        total
    }

    fn shutdown(&self, deadline: Instant) -> BoxFuture<'_, ()> {
        self.stop.cancel();
        let topology = self.topology();
        Box::pin(async move {
            for master in &topology.masters {
                master.engine.shutdown(deadline).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_spread_over_three_masters_within_a_fifth_of_even() {
        // The slots as `redis-cli --cluster create` splits them over three masters.
        let bounds = [0u16, 5461, 10923, 16384];
        let keys = Keys::cluster("", "n1", "");
        let mut counts = [0usize; 3];
        for room in 0..1000 {
            let slot = keys.room_slot(&format!("ticker:{room}"));
            let master = bounds.windows(2).position(|w| (w[0]..w[1]).contains(&slot));
            counts[master.unwrap_or(0)] += 1;
        }
        for count in counts {
            assert!((267..=400).contains(&count), "{counts:?}");
        }
    }

    #[test]
    fn cluster_slots_replies_parse() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7001),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                node("127.0.0.1", 7002),
                node("127.0.0.1", 7003),
            ]),
        ]);
        assert_eq!(
            parse_slots(&reply),
            Some(vec![
                (0, 5460, "127.0.0.1".to_string(), 7001),
                (5461, 16383, "127.0.0.1".to_string(), 7002),
            ])
        );
        assert_eq!(parse_slots(&Value::Int(3)), None);
    }
}
