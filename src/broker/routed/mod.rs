//! Several Redis engines behind one route: the topologies where a node talks to more than
//! one Redis server, or to one that can change.
//!
//! An `EngineSet` is written once for all of them: it holds the engines of the current
//! `Layout` (the engines and the route between them: which engine serves a room, a user,
//! the node-wide things), the node's rooms and online users (what a new engine must take
//! over), and its watch; it forwards the seam's every method through the route. A
//! topology is its route plus its watch:
//!
//! | file | topology | route | watch |
//! | --- | --- | --- | --- |
//! | `shards.rs` | `redis.shards`: independent servers | rendezvous hashing of the room (user) id | none: the shards are fixed |
//! | `sentinel.rs` | `redis.sentinels`: one master, replaced on failover | everything on the one engine | ask the sentinels every 500 ms |
//! | `cluster.rs` | `redis.cluster_nodes`: a Redis Cluster | the room's slot's master; the rest on the home slot's | read `CLUSTER SLOTS` every second |
//!
//! When the watch finds a new layout, the set hands over: engines that leave stop
//! delivering at once; with both sets locked, every room whose engine changed takes its
//! durable position to the new engine and is subscribed there, and every user whose
//! engine changed goes online there; the layout is swapped; the engines that left are
//! shut down, and what they held comes back (handed back, with their last seconds of
//! durable appends as doubtful) and is routed by the new layout; only then do the new
//! engines (gated) send anything. Durable rooms repair any gap from their streams.
//!
//! Why not redis-rs's own clients (read in redis 1.8.1, features `cluster-async` and
//! `sentinel`): `cluster_async::ClusterConnection` routes each command by its key and
//! follows `MOVED`/`ASK` by itself, and its `ssubscribe` keeps a `SubscriptionTracker`
//! that subscribes again inside the client after the slot map changes. That is what a
//! plain client wants, and what volley cannot use: it never says that a room's slot
//! moved, so there is no moment to stop delivering from the old master, move a durable
//! room's position, or hold the room's joins until the new subscription is confirmed; a
//! refused publish is retried inside the client instead of handed back in its window's
//! order; and it has no probe per master, which is how an engine here learns
//! that pub/sub stopped delivering. `sentinel::SentinelClient` opens a connection to
//! whichever server is the master when it is called (`get_async_connection`), with no
//! signal when the master changes, so the hand-over would have no place to run either.
//! Both ask the deployment what these watches ask (`CLUSTER SLOTS`,
//! `SENTINEL get-master-addr-by-name`); volley asks it itself and keeps one Redis engine
//! per server, with its pipelines, probe and hand-back.

mod cluster;
mod handover;
mod presence;
mod sentinel;
mod shards;

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;

use self::handover::{counts_only, for_each_run, watch};
use super::redis::{EngineOptions, HandBack, RedisStartError};
use super::{
    add_counters, BoxFuture, Broker, BrokerState, Counter, Envelope, EnvelopeSink, Health,
    HistoryError, HistoryFuture, PublishError, RedisBroker, Target,
};
use crate::config::{Config, Durability, RoomClasses};
use crate::metrics::Stats;
use crate::protocol::inbound::Replay;

pub use shards::pick;

/// The engine set the config asks for (`redis.sentinels`, `redis.shards` or
/// `redis.cluster_nodes`), or `None` when it asks for none of them.
pub fn start(
    config: &Config,
    classes: &Arc<RoomClasses>,
) -> Result<Option<Arc<dyn Broker>>, RedisStartError> {
    let redis = &config.redis;
    let set: Arc<dyn Broker> = if !redis.sentinels.is_empty() {
        EngineSet::start(config, classes, sentinel::Sentinel::new(config)?)?
    } else if !redis.shards.is_empty() {
        EngineSet::start(config, classes, shards::Shards::new(config))?
    } else if !redis.cluster_nodes.is_empty() {
        EngineSet::start(config, classes, cluster::Cluster::new(config)?)?
    } else {
        return Ok(None);
    };
    Ok(Some(set))
}

/// Which engine of a layout serves what (an index into its engines; `None`: nothing
/// serves it yet).
pub(crate) trait Route: Send + Sync + 'static {
    fn room(&self, room: &str) -> Option<usize>;
    /// A user's presence and direct messages.
    fn user(&self, user: &str) -> Option<usize>;
    /// Broadcasts and node reports.
    fn home(&self) -> Option<usize>;
    /// The engines whose listings of online users together list everyone.
    fn listing(&self) -> Vec<usize>;
    /// Every room has an engine (in a cluster: every slot a master).
    fn complete(&self) -> bool {
        true
    }
}

/// The engines, and the route between them.
pub(crate) struct Layout<R> {
    pub engines: Vec<Arc<RedisBroker>>,
    pub route: R,
}

impl<R: Route> Layout<R> {
    fn at(&self, index: Option<usize>) -> Option<&Arc<RedisBroker>> {
        index.and_then(|i| self.engines.get(i))
    }

    fn room(&self, room: &str) -> Option<&Arc<RedisBroker>> {
        self.at(self.route.room(room))
    }

    fn user(&self, user: &str) -> Option<&Arc<RedisBroker>> {
        self.at(self.route.user(user))
    }

    fn home(&self) -> Option<&Arc<RedisBroker>> {
        self.at(self.route.home())
    }

    fn target(&self, target: &Target) -> Option<usize> {
        match target {
            Target::Room(room) => self.route.room(room),
            Target::User(user) => self.route.user(user),
            Target::Broadcast => self.route.home(),
        }
    }

    fn has(&self, engine: &Arc<RedisBroker>) -> bool {
        self.engines.iter().any(|e| Arc::ptr_eq(e, engine))
    }
}

/// A connection to one server a watch asks (a sentinel, a cluster node), made within
/// `wait`; else why not (a refused certificate names the `redis.tls_*` keys).
async fn connect_to(
    info: redis::ConnectionInfo,
    certs: Option<&redis::TlsCertificates>,
    wait: Duration,
) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = super::redis::tls::client(info, certs).map_err(|e| e.to_string())?;
    match tokio::time::timeout(wait, client.get_multiplexed_async_connection()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(super::redis::tls::explain(&e)),
        Err(_) => Err(format!("no connection within {wait:?}")),
    }
}

/// A watch's run of failures to reach its deployment: logged once when it begins, not at
/// every round.
#[derive(Default)]
pub(crate) struct Streak(AtomicBool);

impl Streak {
    /// A round failed: true for the first of a run.
    fn began(&self) -> bool {
        !self.0.swap(true, Relaxed)
    }

    /// A round got its answer.
    fn ended(&self) {
        self.0.store(false, Relaxed);
    }
}

/// A topology: its route, its watch, and what it says when nothing serves a room yet.
pub(crate) trait Topology: Send + Sync + Sized + 'static {
    type Route: Route;
    /// The watch's own state between rounds (a connection it keeps).
    type Watch: Default + Send;
    /// The engine's name (`Health::engine`).
    const ENGINE: &'static str;
    /// How often the watch looks, and the shortest pause between two looks however
    /// often engines hand back; `None` for a fixed topology (no watch).
    const ROUNDS: Option<(Duration, Duration)>;
    /// Why a room (or the users) cannot be served yet.
    const UNSERVED: &'static str;

    /// The layout the node starts with.
    fn first(&self, starter: &Starter) -> Result<Layout<Self::Route>, RedisStartError>;

    /// Looks at the deployment; a new layout when it changed (its new engines started
    /// with `starter`, the engines it keeps shared with `current`).
    fn look<'a>(
        &'a self,
        starter: &'a Starter,
        current: &'a Layout<Self::Route>,
        watch: &'a mut Self::Watch,
    ) -> impl Future<Output = Option<Layout<Self::Route>>> + Send + 'a;

    /// A new layout replaced `was`: log it, count it.
    fn changed(&self, was: &Layout<Self::Route>, now: &Layout<Self::Route>) {
        let _ = (was, now);
    }

    /// The topology's own counters.
    fn counters(&self) -> Vec<Counter> {
        Vec::new()
    }
}

/// What `attach` handed over, kept so every new engine can be attached the same way.
type Attached = (Arc<str>, Weak<dyn EnvelopeSink>, Arc<Stats>);

/// How long an engine that leaves the layout has to hand back what it holds.
const RETIRE_WITHIN: Duration = Duration::from_secs(1);

/// Starts the engines of a set.
pub(crate) struct Starter {
    config: Config,
    /// The set's hand-back, for a topology that changes (a fixed one's engines keep and
    /// count what they hold, as one alone).
    hand_back: Option<Arc<HandBack>>,
    classes: Arc<RoomClasses>,
}

impl Starter {
    pub(crate) fn start(
        &self,
        mut options: EngineOptions,
    ) -> Result<Arc<RedisBroker>, RedisStartError> {
        options.hand_back = self.hand_back.clone();
        options.classes = Some(self.classes.clone());
        RedisBroker::start_with(&self.config, options)
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }
}

/// Several Redis engines behind one route (see the module docs).
pub(crate) struct EngineSet<T: Topology> {
    topology: T,
    starter: Starter,
    layout: RwLock<Arc<Layout<T::Route>>>,
    attached: OnceLock<Attached>,
    /// What a new engine must take over: the rooms with local sockets, the users online
    /// here.
    rooms: Mutex<HashSet<Arc<str>>>,
    users: Mutex<HashSet<Arc<str>>>,
    /// What the engines hand back, for the watch to route again.
    hand_back: Arc<HandBack>,
    /// Publishes sent again through another engine.
    handed_back: AtomicU64,
    /// Publishes handed back that no engine would take.
    dropped: AtomicU64,
    /// Counters of engines that left the layout, so the node's totals never go back:
    /// engines still shutting down, and the final counts of those done.
    retiring: Mutex<Vec<Arc<RedisBroker>>>,
    retired: Mutex<Vec<Counter>>,
    stop: CancellationToken,
}

impl<T: Topology> EngineSet<T> {
    fn start(
        config: &Config,
        classes: &Arc<RoomClasses>,
        topology: T,
    ) -> Result<Arc<EngineSet<T>>, RedisStartError> {
        let hand_back = Arc::new(HandBack::default());
        let starter = Starter {
            config: config.clone(),
            hand_back: T::ROUNDS.map(|_| hand_back.clone()),
            classes: classes.clone(),
        };
        let first = topology.first(&starter)?;
        let set = Arc::new(EngineSet {
            topology,
            starter,
            layout: RwLock::new(Arc::new(first)),
            attached: OnceLock::new(),
            rooms: Mutex::new(HashSet::new()),
            users: Mutex::new(HashSet::new()),
            hand_back,
            handed_back: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            retiring: Mutex::new(Vec::new()),
            retired: Mutex::new(Vec::new()),
            stop: CancellationToken::new(),
        });
        if let Some((every, soonest)) = T::ROUNDS {
            tokio::spawn(watch(
                Arc::downgrade(&set),
                every,
                soonest,
                set.stop.clone(),
            ));
        }
        Ok(set)
    }

    fn layout(&self) -> Arc<Layout<T::Route>> {
        self.layout.read().clone()
    }
}

impl<T: Topology> Health for EngineSet<T> {
    fn engine(&self) -> &'static str {
        T::ENGINE
    }

    /// Connected while every room has an engine and every engine is connected.
    fn state(&self) -> BrokerState {
        let layout = self.layout();
        if !layout.route.complete() {
            return BrokerState::Reconnecting;
        }
        BrokerState::all(layout.engines.iter().map(|e| e.state()))
    }

    /// Every engine's counters summed by name (with those of engines that left), the
    /// publishes handed back, and the topology's own.
    fn counters(&self) -> Vec<Counter> {
        let mut total = Vec::new();
        for engine in &self.layout().engines {
            add_counters(&mut total, engine.counters());
        }
        let retiring = self.retiring.lock();
        let retired = self.retired.lock();
        for engine in retiring.iter() {
            add_counters(&mut total, counts_only(engine.counters()));
        }
        add_counters(&mut total, retired.iter().copied());
        drop((retiring, retired));
        add_counters(
            &mut total,
            [super::redis::dropped_publishes(self.dropped.load(Relaxed))],
        );
        if T::ROUNDS.is_some() {
            let handed_back = self.handed_back.load(Relaxed);
            total.push(Counter::count(
                "redis_handed_back_publishes",
                HANDED_BACK_HELP,
                handed_back,
            ));
            total.push(Counter::count(
                "redis_redirected_publishes",
                "Deprecated, the same as volley_redis_handed_back_publishes_total (the old name, kept for one release).",
                handed_back,
            ));
        }
        total.extend(self.topology.counters());
        total
    }
}

const HANDED_BACK_HELP: &str = "Publishes sent again through another engine of the set: refused by Redis without running (a cluster's MOVED, ASK, TRYAGAIN or CLUSTERDOWN, a demoted master's READONLY or NOREPLICAS), or still held by an engine replaced at a failover or slot change.";

impl<T: Topology> Broker for EngineSet<T> {
    fn attach(&self, node_id: Arc<str>, sink: Weak<dyn EnvelopeSink>, stats: Arc<Stats>) {
        for engine in &self.layout().engines {
            engine.attach(node_id.clone(), sink.clone(), stats.clone());
        }
        let _ = self.attached.set((node_id, sink, stats));
    }

    fn publish(&self, batch: &[Envelope]) -> Result<(), PublishError> {
        let layout = self.layout.read();
        for_each_run(&layout, batch, |engine, run| match layout.at(engine) {
            Some(engine) => engine.publish(run),
            None => {
                // Nothing serves it yet (no slot map): held for the next layout, within
                // the same bound as an engine's queue.
                if self.hand_back.len() + run.len() > self.starter.config.redis.outage_buffer {
                    return Err(PublishError::Overloaded);
                }
                self.hand_back.hand_back(run.iter().cloned());
                Ok(())
            }
        })
    }

    fn subscribe(&self, room: &Arc<str>) {
        let mut rooms = self.rooms.lock();
        rooms.insert(room.clone());
        if let Some(engine) = self.layout.read().room(room) {
            engine.subscribe(room);
        }
    }

    fn unsubscribe(&self, room: &str) {
        let mut rooms = self.rooms.lock();
        rooms.remove(room);
        if let Some(engine) = self.layout.read().room(room) {
            engine.unsubscribe(room);
        }
    }

    fn until_subscribed(&self, room: &str) -> Option<BoxFuture<'static, bool>> {
        match self.layout().room(room) {
            Some(engine) => engine.until_subscribed(room),
            // Nothing serves the room yet: nothing to wait for that would come.
            None => Some(Box::pin(std::future::ready(false))),
        }
    }

    fn expire_entries(&self, room: &Arc<str>, durability: Durability) {
        if let Some(engine) = self.layout().room(room) {
            engine.expire_entries(room, durability);
        }
    }

    fn history<'a>(
        &'a self,
        room: &'a str,
        replay: &'a Replay,
        durability: Durability,
    ) -> HistoryFuture<'a> {
        let engine = self.layout().room(room).cloned();
        Box::pin(async move {
            let Some(engine) = engine else {
                return Err(HistoryError::Unavailable(T::UNSERVED.into()));
            };
            engine.history(room, replay, durability).await
        })
    }

    fn shutdown(&self, deadline: Instant) -> BoxFuture<'_, ()> {
        self.stop.cancel();
        let layout = self.layout();
        Box::pin(async move {
            for engine in &layout.engines {
                engine.shutdown(deadline).await;
            }
        })
    }
}
