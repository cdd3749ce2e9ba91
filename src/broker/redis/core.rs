//! The engine's state, shared by its tasks (publisher, subscriber, presence) and the
//! subscriber's push handler: health flags, positions, subscriptions, counters.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::ConnectionManager;

use super::{durable, HandBack, Keys};
use crate::broker::{BrokerState, Counter, EnvelopeSink};
use crate::config::Config;
use crate::metrics::Stats;
use crate::protocol::now_ms;

/// State shared by the engine's tasks and the subscriber's push handler.
pub(super) struct Core {
    pub(super) node_id: Arc<str>,
    pub(super) keys: Keys,
    /// In a Redis Cluster this engine is one of several, one per master: its channels
    /// are sharded (`SPUBLISH` / `SSUBSCRIBE`).
    pub(super) spublish: bool,
    /// Where publishes go that this engine's Redis refused (a cluster redirection, a
    /// demoted master's `READONLY`) or that it still held when it was shut down: the
    /// engine that owns this one (cluster, Sentinel) routes them again. Without one they
    /// are held here, and dropped and counted at shutdown.
    pub(super) hand_back: Option<Arc<HandBack>>,
    /// Whether this engine subscribes the node-wide channels (broadcasts, presence
    /// changes): always on a standalone Redis; in a cluster only the engine on the
    /// master of the home slot.
    pub(super) home: AtomicBool,
    pub(super) sink: OnceLock<Weak<dyn EnvelopeSink>>,
    /// The node's stats, for pipeline sizes and publish latency.
    pub(super) stats: OnceLock<Arc<Stats>>,
    pub(super) publisher_ok: AtomicBool,
    pub(super) subscriber_ok: AtomicBool,
    /// Highest probe number received back on the probe channel.
    pub(super) probe_seen: AtomicU64,
    /// This process's token in its probes: a probe with another token on this node's
    /// channel comes from another node with the same id.
    pub(super) instance: u64,
    /// When such a probe was last seen (ms since the epoch; 0 = never).
    pub(super) duplicate_seen_ms: AtomicU64,
    /// How long one such probe keeps the node unready.
    pub(super) duplicate_hold_ms: u64,
    /// Bumped when the subscriber connection is replaced; older handlers fall silent.
    pub(super) generation: AtomicU64,
    /// Redis dropped the subscriptions (a disconnection): subscribe everything again.
    pub(super) resubscribe: AtomicBool,
    /// The other nodes alive at the last probe.
    pub(super) peers: Mutex<Vec<String>>,
    /// Bounds on what arrives from Redis.
    pub(super) inbound: InboundLimits,
    /// `presence.ttl_s`, in ms: a listed user was last seen this long before its entry
    /// expires.
    pub(super) presence_ttl_ms: u64,
    /// Set by `shutdown`: the last pipeline must be answered by then.
    pub(super) shutdown_deadline: Mutex<Option<Instant>>,
    /// Durable rooms: the last offset delivered here, and repairs.
    pub(super) positions: durable::Positions,
    /// For history reads and repairs (a handle on the publisher's connection).
    pub(super) reader: OnceLock<ConnectionManager>,
    /// The channels Redis has confirmed subscribed, for reads that must not start before.
    pub(super) subscribed: Mutex<HashSet<String>>,
    pub(super) subscribed_changed: tokio::sync::Notify,
    /// Cleared when an owner engine replaces this one (`stop_delivering`): what its old
    /// master still sends is not delivered, the new master's copy is.
    pub(super) delivering: AtomicBool,
    /// Set for an engine that takes over from another (Sentinel): it sends nothing
    /// until the old engine has handed over what it held (`open_gate`).
    pub(super) gate: Option<Gate>,
    /// Sharded channels the server unsubscribed by itself (their slot moved away).
    pub(super) moved_channels: Mutex<Vec<String>>,
    pub(super) counters: Counts,
}

/// Bounds on envelopes received from Redis: they come from any program that can publish.
pub(super) struct InboundLimits {
    /// Most messages in one envelope; a bigger envelope is dropped whole.
    pub(super) max_messages: usize,
    /// Largest single message; a bigger one is dropped (a socket's outbox could not take
    /// it, and the subscriber would be closed as slow).
    pub(super) max_payload_bytes: usize,
}

#[derive(Default)]
pub(super) struct Counts {
    pub(super) pipelines: AtomicU64,
    pub(super) published_messages: AtomicU64,
    pub(super) publish_commands: AtomicU64,
    pub(super) dropped_publishes: AtomicU64,
    pub(super) received_envelopes: AtomicU64,
    pub(super) bad_envelopes: AtomicU64,
    pub(super) subscriber_restarts: AtomicU64,
    /// Pub/sub connections lost (killed, cut, Redis restarted); each subscribes again.
    pub(super) subscriber_disconnects: AtomicU64,
    pub(super) publish_failures: AtomicU64,
    pub(super) reconnects: AtomicU64,
    /// Messages in pipelines Redis may or may not have run (never sent again).
    pub(super) unconfirmed_publishes: AtomicU64,
    /// Received messages over the size bound, dropped.
    pub(super) oversized_payloads: AtomicU64,
    /// Durable rooms' missed ranges read back from their streams.
    pub(super) repairs: AtomicU64,
    /// Repairs that could not read the stream.
    pub(super) repair_failures: AtomicU64,
    /// Dead nodes whose users this node announced gone.
    pub(super) nodes_reaped: AtomicU64,
}

/// Rooms the node wants; the subscriber task makes Redis agree.
pub(super) struct Subscriptions {
    pub(super) rooms: Mutex<HashSet<String>>,
    pub(super) changed: tokio::sync::Notify,
}

impl Counts {
    /// The engine's counters, each as it means it (`peers`: the level of live peers).
    pub(super) fn describe(&self, peers: u64) -> Vec<Counter> {
        let n = |c: &AtomicU64| c.load(Relaxed);
        vec![
            Counter::count("redis_pipelines", "Publish pipelines Redis answered.", n(&self.pipelines)),
            Counter::count("redis_publish_commands", "PUBLISH (or script) commands in answered pipelines.", n(&self.publish_commands)),
            Counter::count("redis_published_messages", "Messages in answered publish pipelines.", n(&self.published_messages)),
            Counter::count("redis_publish_failures", "Publish pipelines that failed (Redis unreachable, or refusing writes).", n(&self.publish_failures)),
            Counter::count("redis_reconnects", "Times publishing to Redis resumed after a failure.", n(&self.reconnects)),
            dropped_publishes(n(&self.dropped_publishes)),
            Counter::count("redis_received_envelopes", "Envelopes received from Redis.", n(&self.received_envelopes)),
            Counter::count("redis_bad_envelopes", "Messages from Redis that are not envelopes or carry over redis.max_envelope_messages, dropped.", n(&self.bad_envelopes)),
            Counter::count("redis_subscriber_restarts", "Pub/sub connections replaced after missed probes.", n(&self.subscriber_restarts)),
            Counter::count("redis_subscriber_disconnects", "Pub/sub connections lost (killed, cut, Redis restarted); each reconnects and subscribes again.", n(&self.subscriber_disconnects)),
            Counter::count("redis_unconfirmed_publishes", "Publishes in pipelines Redis may or may not have run (a reply timeout, a broken connection); never sent again.", n(&self.unconfirmed_publishes)),
            Counter::count("redis_oversized_payloads", "Messages from Redis over limits.max_frame_bytes, dropped.", n(&self.oversized_payloads)),
            Counter::level("redis_peers", "Other live nodes this node saw at its last probe.", peers),
            Counter::count("redis_repairs", "Durable rooms' missed ranges read back from their streams.", n(&self.repairs)),
            Counter::count("redis_repair_failures", "Repairs of durable rooms that could not read the stream.", n(&self.repair_failures)),
            Counter::count("redis_nodes_reaped", "Dead nodes (presence expired) whose users this node announced gone: presence disconnected, user_left in their rooms.", n(&self.nodes_reaped)),
        ]
    }
}

/// A closed gate holds an engine's publisher before its first send.
#[derive(Default)]
pub(super) struct Gate {
    pub(super) open: AtomicBool,
    pub(super) opened: tokio::sync::Notify,
}

impl Gate {
    pub(super) async fn wait(&self) {
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

impl Core {
    pub(super) fn new(
        config: &Config,
        keys: Keys,
        spublish: bool,
        hand_back: Option<Arc<HandBack>>,
        gated: bool,
    ) -> Core {
        let node_id: Arc<str> = Arc::from(config.server.node_id.as_str());
        Core {
            keys,
            node_id,
            home: AtomicBool::new(!spublish),
            spublish,
            hand_back,
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
            counters: Counts::default(),
        }
    }

    /// Where received messages go, unless this engine was told to stop delivering.
    pub(super) fn sink(&self) -> Option<Arc<dyn EnvelopeSink>> {
        if !self.delivering.load(Relaxed) {
            return None;
        }
        self.sink.get().and_then(Weak::upgrade)
    }

    /// Whether channels are Redis Cluster's sharded pub/sub (`SPUBLISH`).
    pub(super) fn spublish(&self) -> bool {
        self.spublish
    }

    /// `PUBLISH`, or `SPUBLISH` in a cluster.
    pub(super) fn publish_command(&self) -> &'static str {
        if self.spublish() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    pub(super) fn state(&self) -> BrokerState {
        let duplicate = self.duplicate_seen_ms.load(Relaxed);
        if duplicate != 0 && now_ms().saturating_sub(duplicate) < self.duplicate_hold_ms {
            BrokerState::DuplicateNodeId
        } else if self.publisher_ok.load(Relaxed) && self.subscriber_ok.load(Relaxed) {
            BrokerState::Connected
        } else {
            BrokerState::Reconnecting
        }
    }

    pub(super) fn shutdown_deadline(&self) -> Option<Instant> {
        *self.shutdown_deadline.lock()
    }

    /// The connection presence queries read with.
    /// The connection reads go through (a handle on the publisher's), or the caller's
    /// "unavailable" error before it exists.
    pub(super) fn reader_for<E>(
        &self,
        unavailable: impl FnOnce(String) -> E,
    ) -> Result<ConnectionManager, E> {
        self.reader
            .get()
            .cloned()
            .ok_or_else(|| unavailable("no Redis connection".into()))
    }

    /// Waits (bounded) until Redis has confirmed the subscription to `channel`.
    pub(super) async fn until_subscribed(&self, channel: &str) -> bool {
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

/// `redis_dropped_publishes`: also counted by a routed set, for what no engine took.
pub fn dropped_publishes(value: u64) -> Counter {
    Counter::count(
        "redis_dropped_publishes",
        "Publishes dropped: at shutdown with Redis unreachable or the drain timeout reached, or refused by Redis with an error.",
        value,
    )
}
