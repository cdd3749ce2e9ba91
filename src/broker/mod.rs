//! The broker seam: how a node reaches the other nodes that share its rooms.
//!
//! A node serves its own sockets itself, at once; the broker only carries envelopes to
//! other nodes and brings theirs back. Engines differ in transport, not in contract:
//! `memory` (in-process, the default) and, with a Redis URL, `redis`. The hub and the
//! connection code never see which one runs.
//!
//! Every method is non-blocking: an engine that talks to a network queues the work and
//! does it on its own tasks, so a publish never waits on I/O in the caller.

pub mod memory;
pub mod redis;
pub mod redis_cluster;
mod ring;
pub mod sentinel;
pub mod sharded;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::config::Durability;
use crate::metrics::Stats;
use crate::protocol::inbound::Replay;
use crate::protocol::Encoded;

pub use self::redis::RedisBroker;
pub use memory::{MemoryBroker, MemoryBus};
pub use redis_cluster::ClusterBroker;
pub use sentinel::SentinelBroker;
pub use sharded::ShardedBroker;

/// An engine's own counters, as `name -> value` (`redis_pipelines`, ...).
pub type BrokerStats = Vec<(&'static str, u64)>;

/// A publish the broker could not take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error(
        "the node's queue to other nodes is full; the message was not sent, try again shortly"
    )]
    Overloaded,
}

/// Where an envelope goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every socket in one room (channel `room:<id>`).
    Room(Arc<str>),
    /// Every socket on every node (channel `websocket:broadcast`).
    Broadcast,
    /// Every socket of one user, on every node (channel `user:<id>`).
    User(Arc<str>),
}

/// One user online, as the presence index has it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserPresence {
    pub user_id: String,
    /// A node the user has a socket on.
    pub server_id: String,
    pub connected_at: u64,
    pub last_seen: u64,
}

/// An answer to "who is online", at most the asked-for number.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OnlineUsers {
    pub users: Vec<UserPresence>,
    /// More users are online than were listed.
    pub truncated: bool,
}

/// A user's first socket anywhere appeared, or their last one went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEvent {
    pub connected: bool,
    pub user_id: Arc<str>,
    pub server_id: Arc<str>,
}

/// Why a presence query could not be answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PresenceError {
    #[error("presence is not available: {0}")]
    Unavailable(String),
}

/// What an envelope carries, for an engine that can tell who is listening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A published message: always sent.
    Message,
    /// A membership notice (`user_joined`, `user_left`): best effort, the local members
    /// get it even when other nodes cannot.
    Notice,
    /// A message of a durable room. The engine gives it the room's next offset, keeps it
    /// in the room's history, and delivers it to every node in the room, its origin too
    /// (which did not deliver it locally): one order for all.
    Durable(Durability),
}

/// A durable room's history, as a join asked for it.
#[derive(Debug, Clone)]
pub struct History {
    /// The room's epoch: changes whenever its history was lost and started again.
    pub epoch: Arc<str>,
    /// Message frames (with their offsets), oldest first.
    pub messages: Vec<Encoded>,
    /// For a `since` join: whether everything after the position could be served.
    pub recovered: Option<bool>,
}

impl History {
    /// The history of a durable room that has none (never published to, or expired):
    /// no messages and the epoch `""`. A `since` from epoch `""` (taken when the room
    /// had no history either) missed nothing; from any other epoch it cannot be served.
    pub fn none(replay: &Replay) -> History {
        History {
            epoch: Arc::from(""),
            messages: Vec::new(),
            recovered: match replay {
                Replay::Last(_) => None,
                Replay::Since { epoch, .. } => Some(epoch.is_empty()),
            },
        }
    }
}

/// Why an engine could not answer a history query.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HistoryError {
    #[error("room history is not available: {0}")]
    Unavailable(String),
}

/// One published message on its way between nodes.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The node that published it (`serverId`); that node delivered it locally already.
    pub origin: Arc<str>,
    pub target: Target,
    /// The frame subscribers receive, encoded once on the publishing node.
    pub payload: Encoded,
    pub kind: Kind,
    /// On a durable room's message on its way to the node: the room's epoch, as the
    /// engine that gave the message its offset says. The node tells the room's sockets
    /// when it changes (`epoch_changed`). `None` on everything else.
    pub epoch: Option<Arc<str>>,
}

/// The receiving side of a broker: a node.
pub trait EnvelopeSink: Send + Sync {
    fn deliver(&self, envelope: Envelope);

    /// A presence change anywhere (this node's own included).
    fn presence(&self, event: PresenceEvent) {
        let _ = event;
    }

    /// The rooms the sockets of `user` on this node are in, for the engine's record of
    /// this node's users (read when the node dies, to announce them gone).
    fn rooms_of(&self, user: &str) -> Vec<Arc<str>> {
        let _ = user;
        Vec::new()
    }

    /// Another node died (its presence expired) with users in these rooms (room, how many
    /// of its users were in it): this node was chosen to tell the rooms (`user_left`).
    fn users_gone(&self, node: &str, rooms: &[(String, u64)]) {
        let _ = (node, rooms);
    }
}

/// How a broker is doing, for `/healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerState {
    Connected,
    Reconnecting,
    /// Another live node reports this node's id: the two would drop each other's
    /// messages as their own echo, so neither may count as ready.
    DuplicateNodeId,
}

impl BrokerState {
    /// Several engines together (shards, cluster masters): connected only while every
    /// one is, since a node that cannot reach one cannot serve that one's rooms.
    pub fn all(states: impl IntoIterator<Item = BrokerState>) -> BrokerState {
        let mut all = BrokerState::Connected;
        for state in states {
            match state {
                BrokerState::DuplicateNodeId => return BrokerState::DuplicateNodeId,
                BrokerState::Reconnecting => all = BrokerState::Reconnecting,
                BrokerState::Connected => {}
            }
        }
        all
    }
}

/// Waits for the next round of an owner engine's watch (Sentinel, cluster): at least
/// `soonest` after the last one, then `every`, or sooner when `soon` is notified (an
/// engine handed something back). False once `stop` is cancelled.
pub(crate) async fn next_round(
    every: Duration,
    soonest: Duration,
    soon: &tokio::sync::Notify,
    stop: &tokio_util::sync::CancellationToken,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(soonest) => {}
        _ = stop.cancelled() => return false,
    }
    tokio::select! {
        _ = tokio::time::sleep(every.saturating_sub(soonest)) => true,
        _ = soon.notified() => true,
        _ = stop.cancelled() => false,
    }
}

/// Adds an engine's counters into `total`, by name.
pub fn add_stats(total: &mut BrokerStats, more: BrokerStats) {
    for (name, value) in more {
        match total.iter_mut().find(|(n, _)| *n == name) {
            Some((_, sum)) => *sum += value,
            None => total.push((name, value)),
        }
    }
}

/// The future a `Broker` query returns (the trait must stay object safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait Broker: Send + Sync {
    /// The engine's name, as configured (`memory`, `redis`).
    fn engine(&self) -> &'static str;

    /// Connects the node that receives this broker's inbound envelopes, and the node's
    /// stats the engine records into (pipeline sizes, publish latency). Called once.
    fn attach(&self, node_id: Arc<str>, sink: Weak<dyn EnvelopeSink>, stats: Arc<Stats>);

    /// Queues a batch of envelopes for the other nodes, in order: all of them, or none
    /// and an error the caller must pass on.
    fn publish(&self, batch: &[Envelope]) -> Result<(), PublishError>;

    /// Starts receiving envelopes for `room` (the first local socket joined it).
    fn subscribe(&self, room: &Arc<str>);

    /// Stops receiving envelopes for `room` (the last local socket left it).
    fn unsubscribe(&self, room: &str);

    /// What other nodes publish to `room` reaches this node once the engine's subscription
    /// to it is confirmed: `None` when it is already (or the engine has no network to wait
    /// for), else a future that ends when it is, or with `false` after a bounded wait.
    /// A join is answered after it, so a member gets everything from its answer on.
    fn until_subscribed(&self, room: &str) -> Option<BoxFuture<'static, bool>> {
        let _ = room;
        None
    }

    fn state(&self) -> BrokerState;

    /// A durable room's history: the last N messages, or everything after a position.
    fn history<'a>(
        &'a self,
        room: &'a str,
        replay: &'a Replay,
        durability: Durability,
    ) -> BoxFuture<'a, Result<History, HistoryError>> {
        let _ = (room, replay, durability);
        Box::pin(std::future::ready(Err(HistoryError::Unavailable(
            "this engine keeps no history".into(),
        ))))
    }

    /// A user's first socket on this node appeared: the user is online here; their
    /// direct messages are wanted here.
    fn user_online(&self, user: &Arc<str>) {
        let _ = user;
    }

    /// A user's last socket on this node went.
    fn user_offline(&self, user: &Arc<str>) {
        let _ = user;
    }

    /// The rooms a user's sockets on this node are in changed (`EnvelopeSink::rooms_of`
    /// says which now).
    fn user_rooms_changed(&self, user: &Arc<str>) {
        let _ = user;
    }

    /// Who is online anywhere, at most `max` of them.
    fn online_users(&self, max: usize) -> BoxFuture<'_, Result<OnlineUsers, PresenceError>> {
        let _ = max;
        Box::pin(std::future::ready(Ok(OnlineUsers::default())))
    }

    /// One user's presence, if online anywhere.
    fn presence_of<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Option<UserPresence>, PresenceError>> {
        let _ = user;
        Box::pin(std::future::ready(Ok(None)))
    }

    /// The engine's own counters, for `/healthz` and `/metrics`.
    fn stats(&self) -> BrokerStats {
        Vec::new()
    }

    /// Sends what is still queued, then stops the engine's tasks, by `deadline` at the
    /// latest: what is still unsent then is counted as dropped and logged.
    fn shutdown(&self, deadline: Instant) -> BoxFuture<'_, ()> {
        let _ = deadline;
        Box::pin(std::future::ready(()))
    }
}
