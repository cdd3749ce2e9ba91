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
//!
//! | file | job |
//! | --- | --- |
//! | `mod.rs` | `RedisBroker`: the seam's four traits, and what a routed set asks of an engine |
//! | `start.rs` | `EngineOptions` (what an engine is for), starting its tasks, the connection recipe |
//! | `core.rs` | the state its tasks share: health flags, positions, subscriptions, counters |
//! | `handback.rs` | what an engine hands back to its set |
//! | `queue.rs` | the publish queue: paces, the outage bound |
//! | `publisher/` | the publish task: one pipeline per window, outages, refusals |
//! | `subscriber.rs` | the pub/sub task: subscriptions, probes, restarts |
//! | `inbound.rs` | what arrives: envelopes to the node, probes |
//! | `envelope.rs` | the wire format (the reference servers') |
//! | `durable.rs` | durable rooms: the append script, positions, repairs, history |
//! | `board.rs` | state rooms: the board beside the stream, written in the append's step; snapshots |
//! | `presence/` | the presence task, its scripts and listing |
//! | `reports.rs` | node reports (`metrics:<serverId>`, `volley:nodes`) |
//! | `keys.rs` | every channel and key name |
//! | `tls.rs` | `rediss://`: the clients' certificates (`redis.tls_*`), errors that name them |

mod board;
mod core;
mod durable;
mod envelope;
mod handback;
mod inbound;
mod keys;
mod ledger;
mod presence;
mod publisher;
mod queue;
mod reports;
mod start;
mod subscriber;
pub(crate) mod tls;

pub use self::core::dropped_publishes;
pub use envelope::{decode, EnvelopeWriter, Inbound};
pub use handback::HandBack;
pub use keys::{slot, Keys, HOME_TAG};
#[doc(hidden)]
pub use queue::{PublishPaces, PublishQueue};
pub use start::{EngineOptions, RedisStartError};

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::core::{Core, Subscriptions};
use super::{
    BoxFuture, Broker, BrokerState, Counter, Envelope, EnvelopeSink, Health, HistoryError,
    HistoryFuture, OnlineUsers, Presence, PresenceError, PublishError, UserPresence,
};
use crate::config::{Config, Durability};
use crate::metrics::Stats;
use crate::protocol::inbound::Replay;

pub struct RedisBroker {
    core: Arc<Core>,
    /// This node's presence changes, applied in order by the presence task.
    presence: tokio::sync::mpsc::UnboundedSender<presence::Change>,
    queue: Arc<PublishQueue>,
    subscriptions: Arc<Subscriptions>,
    stop: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl RedisBroker {
    /// The engine on `redis.url`, alone.
    pub fn start(config: &Config) -> Result<Arc<RedisBroker>, RedisStartError> {
        Self::start_with(
            config,
            EngineOptions::standalone(config, &config.redis.url)?,
        )
    }

    /// Lets a gated engine's publisher send (see `EngineOptions::gated`).
    pub fn open_gate(&self) {
        if let Some(gate) = &self.core.gate {
            gate.open.store(true, Relaxed);
            gate.opened.notify_waiters();
        }
    }

    /// Stops delivering what this engine's Redis sends: it is being replaced, and the
    /// engine taking over delivers from the new master.
    pub fn stop_delivering(&self) {
        self.core.delivering.store(false, Relaxed);
    }

    /// Durable messages another engine sent without learning whether they ran: sent
    /// first, with a check that skips those the stream already has.
    pub fn publish_doubtful(&self, batch: &[Envelope]) {
        self.queue.push_doubtful(batch);
    }

    /// Moves a durable room's delivered position from `from` (the engine the room
    /// leaves) to this one: what was missed between is repaired from the stream.
    pub fn take_position(&self, from: &RedisBroker, room: &Arc<str>) {
        if let Some((epoch, last)) = from.core.positions.position(room) {
            self.core.positions.resume(room, epoch, last);
        }
    }

    /// Whether this engine subscribes the node-wide channels (in a Redis Cluster, only
    /// the engine on the master of the home slot does).
    pub fn set_home(&self, home: bool) {
        if self.core.home.swap(home, Relaxed) != home {
            self.subscriptions.changed.notify_one();
        }
    }

    /// Handles one message as if the subscriber connection had received it on `channel`.
    /// For benchmarks and tests of the inbound path; the node never calls it.
    #[doc(hidden)]
    pub fn inject(&self, channel: &[u8], message: &[u8]) {
        self.core.on_message(channel, message);
    }

    /// Subscribes (or unsubscribes) a channel: the subscriber task makes Redis agree.
    fn want(&self, channel: String, wanted: bool) {
        let mut rooms = self.subscriptions.rooms.lock();
        let changed = if wanted {
            rooms.insert(channel)
        } else {
            rooms.remove(&channel)
        };
        if changed {
            self.subscriptions.changed.notify_one();
        }
    }
}

impl Health for RedisBroker {
    fn engine(&self) -> &'static str {
        "redis"
    }

    fn state(&self) -> BrokerState {
        self.core.state()
    }

    fn counters(&self) -> Vec<Counter> {
        let mut counters = self
            .core
            .counters
            .describe(self.core.peers.lock().len() as u64);
        let (buffered, size) = self.queue.fill();
        counters.push(Counter::level(
            "redis_outage_buffered",
            "Publishes waiting for Redis (queued, or held by the publisher while Redis is away); past redis_outage_buffer_size they are refused.",
            buffered as u64,
        ));
        counters.push(Counter::level(
            "redis_outage_buffer_size",
            "redis.outage_buffer: the most publishes that may wait for Redis.",
            size as u64,
        ));
        counters
    }
}

impl Broker for RedisBroker {
    fn attach(&self, node_id: Arc<str>, sink: Weak<dyn EnvelopeSink>, stats: Arc<Stats>) {
        debug_assert_eq!(node_id, self.core.node_id);
        let _ = self.core.sink.set(sink);
        let _ = self.core.stats.set(stats);
    }

    fn publish(&self, batch: &[Envelope]) -> Result<(), PublishError> {
        self.queue.push(batch)
    }

    fn subscribe(&self, room: &Arc<str>) {
        self.want(self.core.keys.room(room), true);
    }

    fn unsubscribe(&self, room: &str) {
        self.core.positions.forget(room);
        self.want(self.core.keys.room(room), false);
    }

    fn until_subscribed(&self, room: &str) -> Option<BoxFuture<'static, bool>> {
        let channel = self.core.keys.room(room);
        if self.core.subscribed.lock().contains(&channel) {
            return None;
        }
        let core = self.core.clone();
        Some(Box::pin(
            async move { core.until_subscribed(&channel).await },
        ))
    }

    fn history<'a>(
        &'a self,
        room: &'a str,
        replay: &'a Replay,
        durability: Durability,
    ) -> HistoryFuture<'a> {
        Box::pin(async move {
            // For a join: subscribed first, read second, so what is published meanwhile
            // arrives live and the join drops what the history already carried. A read
            // with no local socket in the room (the HTTP API) needs no subscription.
            let channel = self.core.keys.room(room);
            let joining = self.subscriptions.rooms.lock().contains(&channel);
            if joining && !self.core.until_subscribed(&channel).await {
                return Err(HistoryError::Unavailable(
                    "not subscribed to the room yet".into(),
                ));
            }
            let conn = self.core.reader_for(HistoryError::Unavailable)?;
            durable::history(&self.core, conn, room, replay, durability).await
        })
    }

    fn expire_entries(&self, room: &Arc<str>, durability: Durability) {
        if durability.board.is_some_and(|b| b.entry_ttl.is_some()) {
            tokio::spawn(board::expire(self.core.clone(), room.clone(), durability));
        }
    }

    fn shutdown(&self, deadline: Instant) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            *self.core.shutdown_deadline.lock() = Some(deadline);
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

impl Presence for RedisBroker {
    fn user_online(&self, user: &Arc<str>) {
        let _ = self.presence.send(presence::Change::Online(user.clone()));
        self.want(self.core.keys.user(user), true);
    }

    fn user_offline(&self, user: &Arc<str>) {
        let _ = self.presence.send(presence::Change::Offline(user.clone()));
        self.want(self.core.keys.user(user), false);
    }

    fn user_rooms_changed(&self, user: &Arc<str>) {
        let _ = self.presence.send(presence::Change::Rooms(user.clone()));
    }

    fn online_users(&self, max: usize) -> BoxFuture<'_, Result<OnlineUsers, PresenceError>> {
        Box::pin(async move {
            let conn = self.core.reader_for(PresenceError::Unavailable)?;
            presence::online_users(&self.core, conn, max).await
        })
    }

    fn presence_of<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Option<UserPresence>, PresenceError>> {
        Box::pin(async move {
            let conn = self.core.reader_for(PresenceError::Unavailable)?;
            presence::presence_of(&self.core, conn, user).await
        })
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
