//! The Redis engine: nodes on many machines share rooms through Redis Pub/Sub.
//!
//! Two connections per node, each a `ConnectionManager` that reconnects by itself:
//! - `publisher`: every publish is queued; once per publish window the whole queue leaves
//!   as ONE pipeline (one `PUBLISH` per room per window in `batch` mode, one per message in
//!   `single` mode). While Redis is away, publishes wait in a bounded outage buffer.
//! - `subscriber` (RESP3): `room:<id>` channels follow the hub (subscribed while any
//!   local socket is in the room), `websocket:broadcast` and the node's probe channel
//!   always. Inbound envelopes are parsed once, bounded, and fanned out (`inbound`).
//!
//! Pub/sub can stay connected and still stop delivering, so the node publishes a probe to
//! its own channel every `redis.probe_interval_ms`, resubscribes when Redis lost its
//! subscriptions, and restarts the subscriber connection when probes stop coming back.
//! The node is ready only while publishing works and its own probe comes back, and never
//! while another live node uses its id.

mod durable;
mod envelope;
mod inbound;
mod keys;
mod presence;
mod publisher;
mod queue;
mod subscriber;

pub use envelope::{decode, EnvelopeWriter, Inbound};
pub use keys::{slot, Keys, HOME_TAG};
#[doc(hidden)]
pub use queue::{PublishPaces, PublishQueue};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ConnectionInfo, IntoConnectionInfo, ProtocolVersion};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{
    BoxFuture, Broker, BrokerState, BrokerStats, Envelope, EnvelopeSink, History, HistoryError,
    OnlineUsers, PresenceError, PublishError, UserPresence,
};
use crate::config::Config;
use crate::config::Durability;
use crate::metrics::Stats;
use crate::protocol::inbound::Replay;
use crate::protocol::now_ms;

/// Reconnect backoff of the engine's tasks: doubling from 100 ms to 2 s.
struct Backoff {
    min: Duration,
    max: Duration,
}

const BACKOFF: Backoff = Backoff {
    min: Duration::from_millis(100),
    max: Duration::from_secs(2),
};

impl Backoff {
    fn start(&self) -> Duration {
        self.min
    }

    fn next(&self, last: Duration) -> Duration {
        (last * 2).min(self.max)
    }
}

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum RedisStartError {
    #[error("redis.url is not a usable Redis URL: {0}")]
    BadUrl(redis::RedisError),
}

/// Publishes a cluster master refused to run (`MOVED`, `ASK`, `TRYAGAIN`,
/// `CLUSTERDOWN`: their slot is moving or lives on another master), handed back to the
/// cluster engine to route again. Redis did not run them, so sending them again
/// duplicates nothing.
#[derive(Default)]
pub struct Redirected {
    envelopes: Mutex<Vec<Envelope>>,
    /// Durable messages whose pipeline's answer was lost: sent again with a check that
    /// skips those the stream already has (`publish_doubtful`).
    doubtful: Mutex<Vec<Envelope>>,
    /// Wakes the cluster engine: read the slot map again.
    pub notify: tokio::sync::Notify,
}

impl Redirected {
    pub fn hand_back(&self, envelopes: impl IntoIterator<Item = Envelope>) {
        self.envelopes.lock().extend(envelopes);
        self.notify.notify_one();
    }

    pub fn hand_back_doubtful(&self, envelopes: impl IntoIterator<Item = Envelope>) {
        self.doubtful.lock().extend(envelopes);
        self.notify.notify_one();
    }

    /// Takes every envelope handed back, oldest first.
    pub fn take(&self) -> Vec<Envelope> {
        std::mem::take(&mut *self.envelopes.lock())
    }

    /// Takes the doubtful durable messages handed back, oldest first.
    pub fn take_doubtful(&self) -> Vec<Envelope> {
        std::mem::take(&mut *self.doubtful.lock())
    }

    pub fn len(&self) -> usize {
        self.envelopes.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// State shared by the engine's tasks and the subscriber's push handler.
struct Shared {
    node_id: Arc<str>,
    keys: Keys,
    /// In a Redis Cluster this engine is one of several, one per master: its channels
    /// are sharded (`SPUBLISH` / `SSUBSCRIBE`).
    sharded: bool,
    /// Where publishes go that this engine's Redis refused (a cluster redirection, a
    /// demoted master's `READONLY`) or that it still held when it was shut down: the
    /// engine that owns this one (cluster, Sentinel) routes them again. Without one they
    /// are held here, and dropped and counted at shutdown.
    redirected: Option<Arc<Redirected>>,
    /// Whether this engine subscribes the node-wide channels (broadcasts, presence
    /// changes): always on a standalone Redis; in a cluster only the engine on the
    /// master of the home slot.
    home: AtomicBool,
    sink: OnceLock<Weak<dyn EnvelopeSink>>,
    /// The node's stats, for pipeline sizes and publish latency.
    stats: OnceLock<Arc<Stats>>,
    publisher_ok: AtomicBool,
    subscriber_ok: AtomicBool,
    /// Highest probe number received back on the probe channel.
    probe_seen: AtomicU64,
    /// This process's token in its probes: a probe with another token on this node's
    /// channel comes from another node with the same id.
    instance: u64,
    /// When such a probe was last seen (ms since the epoch; 0 = never).
    duplicate_seen_ms: AtomicU64,
    /// How long one such probe keeps the node unready.
    duplicate_hold_ms: u64,
    /// Bumped when the subscriber connection is replaced; older handlers fall silent.
    generation: AtomicU64,
    /// Redis dropped the subscriptions (a disconnection): subscribe everything again.
    resubscribe: AtomicBool,
    /// The other nodes alive at the last probe.
    peers: Mutex<Vec<String>>,
    /// Bounds on what arrives from Redis.
    inbound: InboundLimits,
    /// `presence.ttl_s`, in ms: a listed user was last seen this long before its entry
    /// expires.
    presence_ttl_ms: u64,
    /// Set by `shutdown`: the last pipeline must be answered by then.
    shutdown_deadline: Mutex<Option<Instant>>,
    /// Durable rooms: the last offset delivered here, and repairs.
    positions: durable::Positions,
    /// For history reads and repairs (a handle on the publisher's connection).
    reader: OnceLock<ConnectionManager>,
    /// The channels Redis has confirmed subscribed, for reads that must not start before.
    subscribed: Mutex<std::collections::HashSet<String>>,
    subscribed_changed: tokio::sync::Notify,
    /// Cleared when an owner engine replaces this one (`stop_delivering`): what its old
    /// master still sends is not delivered, the new master's copy is.
    delivering: AtomicBool,
    /// Set for an engine that takes over from another (Sentinel): it sends nothing
    /// until the old engine has handed over what it held (`open_gate`).
    gate: Option<Gate>,
    /// Sharded channels the server unsubscribed by itself (their slot moved away).
    moved_channels: Mutex<Vec<String>>,
    counters: RedisStats,
}

/// Bounds on envelopes received from Redis: they come from any program that can publish.
struct InboundLimits {
    /// Most messages in one envelope; a bigger envelope is dropped whole.
    max_messages: usize,
    /// Largest single message; a bigger one is dropped (a socket's outbox could not take
    /// it, and the subscriber would be closed as slow).
    max_payload_bytes: usize,
}

#[derive(Default)]
struct RedisStats {
    pipelines: AtomicU64,
    published_messages: AtomicU64,
    publish_commands: AtomicU64,
    dropped_publishes: AtomicU64,
    received_envelopes: AtomicU64,
    bad_envelopes: AtomicU64,
    subscriber_restarts: AtomicU64,
    /// Pub/sub connections lost (killed, cut, Redis restarted); each subscribes again.
    subscriber_disconnects: AtomicU64,
    publish_failures: AtomicU64,
    reconnects: AtomicU64,
    /// Messages in pipelines Redis may or may not have run (never sent again).
    unconfirmed_publishes: AtomicU64,
    /// Received messages over the size bound, dropped.
    oversized_payloads: AtomicU64,
    /// Durable rooms' missed ranges read back from their streams.
    repairs: AtomicU64,
    /// Repairs that could not read the stream.
    repair_failures: AtomicU64,
    /// Dead nodes whose users this node announced gone.
    nodes_reaped: AtomicU64,
}

/// Rooms the node wants; the subscriber task makes Redis agree.
struct Subscriptions {
    rooms: Mutex<std::collections::HashSet<String>>,
    changed: tokio::sync::Notify,
}

pub struct RedisBroker {
    shared: Arc<Shared>,
    /// This node's presence changes, applied in order by the presence task.
    presence: tokio::sync::mpsc::UnboundedSender<presence::Change>,
    queue: Arc<PublishQueue>,
    subscriptions: Arc<Subscriptions>,
    stop: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl RedisBroker {
    /// Starts the engine's tasks; connections are made (and remade) in the background,
    /// so a node starts even while Redis is down and reports it through `/readyz`.
    pub fn start(config: &Config) -> Result<Arc<RedisBroker>, RedisStartError> {
        Self::start_on(config, &config.redis.url)
    }

    /// Starts the engine on the Redis at `url` (one of `redis.shards`, or `redis.url`).
    pub fn start_on(config: &Config, url: &str) -> Result<Arc<RedisBroker>, RedisStartError> {
        let info = url
            .into_connection_info()
            .map_err(RedisStartError::BadUrl)?;
        let keys = Keys::new(&config.redis.key_prefix, &config.server.node_id);
        Self::start_with(config, info, keys, false, None, false, true)
    }

    /// Starts the engine on the Redis at `url` for an owner that takes back what this
    /// engine's Redis refuses or what it still holds at shutdown (the Sentinel engine).
    /// It sends nothing until `open_gate`: the engine it replaces hands over first.
    ///
    /// `first` for the node's first real master: that engine, like a standalone one at
    /// start, first announces what a previous life of this node id left behind (see
    /// `presence`); later ones take over from a live engine and must not.
    pub fn start_handing_back(
        config: &Config,
        url: &str,
        redirected: Arc<Redirected>,
        first: bool,
    ) -> Result<Arc<RedisBroker>, RedisStartError> {
        let info = url
            .into_connection_info()
            .map_err(RedisStartError::BadUrl)?;
        let keys = Keys::new(&config.redis.key_prefix, &config.server.node_id);
        Self::start_with(config, info, keys, false, Some(redirected), true, first)
    }

    /// Lets a gated engine's publisher send (see `start_handing_back`).
    pub fn open_gate(&self) {
        if let Some(gate) = &self.shared.gate {
            gate.open.store(true, Relaxed);
            gate.opened.notify_waiters();
        }
    }

    /// Stops delivering what this engine's Redis sends: it is being replaced, and the
    /// engine taking over delivers from the new master.
    pub fn stop_delivering(&self) {
        self.shared.delivering.store(false, Relaxed);
    }

    /// Starts the engine for one master of a Redis Cluster: sharded pub/sub, names with
    /// hash tags (its probe channel and live-node set tagged `probe_tag`, a tag whose
    /// slot the master serves), refused publishes handed back to `redirected`. It
    /// subscribes the node-wide channels only after `set_home(true)`. A `gated` one
    /// sends nothing until `open_gate` (it takes over from engines being retired).
    pub fn start_member(
        config: &Config,
        info: ConnectionInfo,
        probe_tag: &str,
        redirected: Arc<Redirected>,
        gated: bool,
    ) -> Result<Arc<RedisBroker>, RedisStartError> {
        let keys = Keys::cluster(&config.redis.key_prefix, &config.server.node_id, probe_tag);
        // Engines of the first slot map start with the node; later ones take over.
        Self::start_with(config, info, keys, true, Some(redirected), gated, !gated)
    }

    /// Durable messages another engine sent without learning whether they ran: sent
    /// first, with a check that skips those the stream already has.
    pub fn publish_doubtful(&self, batch: &[Envelope]) {
        self.queue.push_doubtful(batch);
    }

    /// Moves a durable room's delivered position from `from` (the engine the room
    /// leaves) to this one: what was missed between is repaired from the stream.
    pub fn take_position(&self, from: &RedisBroker, room: &Arc<str>) {
        if let Some((epoch, last)) = from.shared.positions.position(room) {
            self.shared.positions.resume(room, epoch, last);
        }
    }

    /// Whether this cluster engine subscribes the node-wide channels.
    pub fn set_home(&self, home: bool) {
        if self.shared.home.swap(home, Relaxed) != home {
            self.subscriptions.changed.notify_one();
        }
    }

    fn start_with(
        config: &Config,
        info: ConnectionInfo,
        keys: Keys,
        sharded: bool,
        redirected: Option<Arc<Redirected>>,
        gated: bool,
        previous_life: bool,
    ) -> Result<Arc<RedisBroker>, RedisStartError> {
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let pubsub_client = Client::open(info.clone().set_redis_settings(resp3))
            .map_err(RedisStartError::BadUrl)?;
        let client = Client::open(info).map_err(RedisStartError::BadUrl)?;

        let node_id: Arc<str> = Arc::from(config.server.node_id.as_str());
        let shared = Arc::new(Shared {
            keys,
            node_id,
            home: AtomicBool::new(!sharded),
            sharded,
            redirected,
            sink: OnceLock::new(),
            stats: OnceLock::new(),
            publisher_ok: AtomicBool::new(false),
            subscriber_ok: AtomicBool::new(false),
            probe_seen: AtomicU64::new(0),
            instance: fastrand::u64(..),
            duplicate_seen_ms: AtomicU64::new(0),
            duplicate_hold_ms: 3 * config.redis.probe_interval_ms + 1000,
            generation: AtomicU64::new(0),
            resubscribe: AtomicBool::new(false),
            peers: Mutex::new(Vec::new()),
            inbound: InboundLimits {
                max_messages: config.redis.max_envelope_messages,
                // A message frame wraps at most max_frame_bytes of client input in a few
                // dozen bytes (type, roomId, timestamp).
                max_payload_bytes: config.limits.max_frame_bytes + 512,
            },
            presence_ttl_ms: config.presence.ttl_s * 1000,
            shutdown_deadline: Mutex::new(None),
            positions: durable::Positions::default(),
            reader: OnceLock::new(),
            subscribed: Mutex::new(Default::default()),
            subscribed_changed: tokio::sync::Notify::new(),
            moved_channels: Mutex::new(Vec::new()),
            delivering: AtomicBool::new(true),
            gate: gated.then(Gate::default),
            counters: RedisStats::default(),
        });
        let queue = Arc::new(PublishQueue::new(
            config.redis.outage_buffer,
            PublishPaces::new(config),
        ));
        let subscriptions = Arc::new(Subscriptions {
            rooms: Mutex::new(Default::default()),
            changed: tokio::sync::Notify::new(),
        });
        let stop = CancellationToken::new();
        // No retries inside a publish: a pipeline that meets a broken connection must
        // fail, so the batcher keeps it and holds it until the subscribers are back,
        // instead of the manager sending it to a restarted Redis that nobody has
        // subscribed to yet. The manager still reconnects in the background.
        let publisher_conn = ConnectionManager::new_lazy_with_config(
            client,
            manager_config().set_number_of_retries(0),
        )
        .map_err(RedisStartError::BadUrl)?;
        let _ = shared.reader.set(publisher_conn.clone());
        let publisher = tokio::spawn(publisher::run(publisher::Publisher::new(
            shared.clone(),
            queue.clone(),
            publisher_conn.clone(),
            config,
            stop.clone(),
        )));
        let (presence_tx, presence_rx) = tokio::sync::mpsc::unbounded_channel();
        let presence = tokio::spawn(presence::run(
            shared.clone(),
            publisher_conn.clone(),
            presence_rx,
            config.presence.clone(),
            previous_life,
            stop.clone(),
        ));
        let subscriber = tokio::spawn(subscriber::run(
            shared.clone(),
            subscriptions.clone(),
            pubsub_client,
            publisher_conn,
            Duration::from_millis(config.redis.probe_interval_ms),
            stop.clone(),
        ));
        Ok(Arc::new(RedisBroker {
            shared,
            presence: presence_tx,
            queue,
            subscriptions,
            stop,
            tasks: Mutex::new(vec![publisher, subscriber, presence]),
        }))
    }
}

/// A script with its `PUBLISH` calls made `SPUBLISH`, for a Redis Cluster.
fn sharded_script(script: &str) -> String {
    script.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")
}

/// The one recipe for volley's Redis connections (the engine's, the cluster
/// reporter's): reconnect quickly and give up on a single attempt fast, since volley
/// retries on its own schedule and keeps serving local sockets meanwhile.
pub(crate) fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1))
}

/// A closed gate holds an engine's publisher before its first send.
#[derive(Default)]
struct Gate {
    open: AtomicBool,
    opened: tokio::sync::Notify,
}

impl Gate {
    async fn wait(&self) {
        loop {
            let opened = self.opened.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            if self.open.load(Relaxed) {
                return;
            }
            opened.await;
        }
    }
}

impl Shared {
    /// Where received messages go, unless this engine was told to stop delivering.
    fn sink(&self) -> Option<Arc<dyn EnvelopeSink>> {
        if !self.delivering.load(Relaxed) {
            return None;
        }
        self.sink.get().and_then(Weak::upgrade)
    }

    /// Whether channels are sharded (a Redis Cluster).
    fn sharded(&self) -> bool {
        self.sharded
    }

    /// `PUBLISH`, or `SPUBLISH` in a cluster.
    fn publish_command(&self) -> &'static str {
        if self.sharded() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    fn state(&self) -> BrokerState {
        let duplicate = self.duplicate_seen_ms.load(Relaxed);
        if duplicate != 0 && now_ms().saturating_sub(duplicate) < self.duplicate_hold_ms {
            BrokerState::DuplicateNodeId
        } else if self.publisher_ok.load(Relaxed) && self.subscriber_ok.load(Relaxed) {
            BrokerState::Connected
        } else {
            BrokerState::Reconnecting
        }
    }

    fn shutdown_deadline(&self) -> Option<Instant> {
        *self.shutdown_deadline.lock()
    }

    /// The connection presence queries read with.
    fn reader_for_presence(&self) -> Result<ConnectionManager, PresenceError> {
        self.reader
            .get()
            .cloned()
            .ok_or_else(|| PresenceError::Unavailable("no Redis connection".into()))
    }

    /// Waits (bounded) until Redis has confirmed the subscription to `channel`.
    async fn until_subscribed(&self, channel: &str) -> bool {
        let wait = async {
            loop {
                let changed = self.subscribed_changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.subscribed.lock().contains(channel) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .is_ok()
    }
}

impl RedisBroker {
    /// Handles one message as if the subscriber connection had received it on `channel`.
    /// For benchmarks and tests of the inbound path; the node never calls it.
    #[doc(hidden)]
    pub fn inject(&self, channel: &[u8], message: &[u8]) {
        self.shared.on_message(channel, message);
    }
}

impl Broker for RedisBroker {
    fn engine(&self) -> &'static str {
        "redis"
    }

    fn attach(&self, node_id: Arc<str>, sink: Weak<dyn EnvelopeSink>, stats: Arc<Stats>) {
        debug_assert_eq!(node_id, self.shared.node_id);
        let _ = self.shared.sink.set(sink);
        let _ = self.shared.stats.set(stats);
    }

    fn publish(&self, batch: &[Envelope]) -> Result<(), PublishError> {
        self.queue.push(batch)
    }

    fn subscribe(&self, room: &Arc<str>) {
        let channel = self.shared.keys.room(room);
        if self.subscriptions.rooms.lock().insert(channel) {
            self.subscriptions.changed.notify_one();
        }
    }

    fn until_subscribed(&self, room: &str) -> Option<BoxFuture<'static, bool>> {
        let channel = self.shared.keys.room(room);
        if self.shared.subscribed.lock().contains(&channel) {
            return None;
        }
        let shared = self.shared.clone();
        Some(Box::pin(
            async move { shared.until_subscribed(&channel).await },
        ))
    }

    fn unsubscribe(&self, room: &str) {
        self.shared.positions.forget(room);
        let channel = self.shared.keys.room(room);
        if self.subscriptions.rooms.lock().remove(&channel) {
            self.subscriptions.changed.notify_one();
        }
    }

    fn state(&self) -> BrokerState {
        self.shared.state()
    }

    fn user_online(&self, user: &Arc<str>) {
        let _ = self.presence.send(presence::Change::Online(user.clone()));
        if self
            .subscriptions
            .rooms
            .lock()
            .insert(self.shared.keys.user(user))
        {
            self.subscriptions.changed.notify_one();
        }
    }

    fn user_rooms_changed(&self, user: &Arc<str>) {
        let _ = self.presence.send(presence::Change::Rooms(user.clone()));
    }

    fn user_offline(&self, user: &Arc<str>) {
        let _ = self.presence.send(presence::Change::Offline(user.clone()));
        if self
            .subscriptions
            .rooms
            .lock()
            .remove(&self.shared.keys.user(user))
        {
            self.subscriptions.changed.notify_one();
        }
    }

    fn online_users(&self, max: usize) -> BoxFuture<'_, Result<OnlineUsers, PresenceError>> {
        Box::pin(async move {
            let conn = self.shared.reader_for_presence()?;
            presence::online_users(&self.shared, conn, max).await
        })
    }

    fn presence_of<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Option<UserPresence>, PresenceError>> {
        Box::pin(async move {
            let conn = self.shared.reader_for_presence()?;
            presence::presence_of(&self.shared, conn, user).await
        })
    }

    fn history<'a>(
        &'a self,
        room: &'a str,
        replay: &'a Replay,
        durability: Durability,
    ) -> BoxFuture<'a, Result<History, HistoryError>> {
        Box::pin(async move {
            // For a join: subscribed first, read second, so what is published meanwhile
            // arrives live and the join drops what the history already carried. A read
            // with no local socket in the room (the HTTP API) needs no subscription.
            let channel = self.shared.keys.room(room);
            let joining = self.subscriptions.rooms.lock().contains(&channel);
            if joining && !self.shared.until_subscribed(&channel).await {
                return Err(HistoryError::Unavailable(
                    "not subscribed to the room yet".into(),
                ));
            }
            let Some(conn) = self.shared.reader.get() else {
                return Err(HistoryError::Unavailable("no Redis connection".into()));
            };
            durable::history(&self.shared, conn.clone(), room, replay, durability).await
        })
    }

    fn stats(&self) -> BrokerStats {
        let f = &self.shared.counters;
        vec![
            ("redis_pipelines", f.pipelines.load(Relaxed)),
            ("redis_publish_commands", f.publish_commands.load(Relaxed)),
            (
                "redis_published_messages",
                f.published_messages.load(Relaxed),
            ),
            ("redis_publish_failures", f.publish_failures.load(Relaxed)),
            ("redis_reconnects", f.reconnects.load(Relaxed)),
            ("redis_dropped_publishes", f.dropped_publishes.load(Relaxed)),
            (
                "redis_received_envelopes",
                f.received_envelopes.load(Relaxed),
            ),
            ("redis_bad_envelopes", f.bad_envelopes.load(Relaxed)),
            (
                "redis_subscriber_restarts",
                f.subscriber_restarts.load(Relaxed),
            ),
            (
                "redis_subscriber_disconnects",
                f.subscriber_disconnects.load(Relaxed),
            ),
            (
                "redis_unconfirmed_publishes",
                f.unconfirmed_publishes.load(Relaxed),
            ),
            (
                "redis_oversized_payloads",
                f.oversized_payloads.load(Relaxed),
            ),
            ("redis_peers", self.shared.peers.lock().len() as u64),
            ("redis_repairs", f.repairs.load(Relaxed)),
            ("redis_repair_failures", f.repair_failures.load(Relaxed)),
            ("redis_nodes_reaped", f.nodes_reaped.load(Relaxed)),
        ]
    }

    fn shutdown(&self, deadline: Instant) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            *self.shared.shutdown_deadline.lock() = Some(deadline);
            self.stop.cancel();
            let tasks = std::mem::take(&mut *self.tasks.lock());
            for mut task in tasks {
                // The publisher gives up at the deadline by itself; this also ends a task
                // stuck in a call to a Redis that does not answer.
                if tokio::time::timeout_at(deadline.into(), &mut task)
                    .await
                    .is_err()
                {
                    task.abort();
                }
            }
        })
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
