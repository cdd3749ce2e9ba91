//! The broker seam: how a node reaches the other nodes that share its rooms.
//!
//! A node serves its own sockets itself, at once; the broker only carries envelopes to
//! other nodes and brings theirs back. Engines differ in transport, not in contract
//! (`tests/engines.rs` runs one contract against every one):
//!
//! | file | job |
//! | --- | --- |
//! | `mod.rs` | the seam: `Broker` (publish, subscribe, history, lifecycle), `start` (the engine the config asks for) |
//! | `presence.rs` | `Presence`: who is online anywhere |
//! | `health.rs` | `Health`: state for `/readyz`, the engine's own counters, described by it |
//! | `reports.rs` | `Reports`: where node reports are kept for `/api/cluster` |
//! | `ledger.rs` | `Ledger`: which nodes hold which rooms and users (webhook events, once per deployment) |
//! | `memory.rs`, `ring.rs` | the embedded engine (the default): an in-process bus, durable rooms in rings (a state room's board beside its ring) |
//! | `redis/` | the Redis engine on one Redis server (`redis.url`) |
//! | `routed/` | several Redis engines behind one route: shards, Sentinel, Redis Cluster |
//!
//! Every method is non-blocking: an engine that talks to a network queues the work and
//! does it on its own tasks, so a publish never waits on I/O in the caller.

mod health;
mod ledger;
pub mod memory;
mod presence;
pub mod redis;
mod reports;
mod ring;
pub mod routed;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Instant;

use crate::config::{Config, Durability, RoomClasses};
use crate::metrics::Stats;
use crate::protocol::board::BoardWrite;
use crate::protocol::inbound::Replay;
use crate::protocol::Encoded;

pub use self::redis::{RedisBroker, RedisStartError};
pub use health::{add_counters, BrokerState, Counter, CounterKind, Health};
pub use ledger::{Ledger, LedgerError, Own, Reaped, Subject};
pub use memory::{MemoryBroker, MemoryBus};
pub use presence::{OnlineUsers, Presence, PresenceError, PresenceEvent, UserPresence};
pub use reports::{ReportError, Reports, StoredReport};

/// Starts the engine the config asks for: Sentinel (`redis.sentinels`), shards
/// (`redis.shards`), a Redis Cluster (`redis.cluster_nodes`), one Redis (`redis.url`),
/// or else the embedded memory engine. The config was validated (at most one is set);
/// `classes` are its room classes, compiled once for the node and its engines.
pub fn start(
    config: &Config,
    classes: &Arc<RoomClasses>,
) -> Result<Arc<dyn Broker>, RedisStartError> {
    let redis = &config.redis;
    Ok(if let Some(set) = routed::start(config, classes)? {
        set
    } else if redis.url.is_empty() {
        Arc::new(MemoryBroker::standalone())
    } else {
        let options = redis::EngineOptions {
            classes: Some(classes.clone()),
            ..redis::EngineOptions::standalone(config, &redis.url)?
        };
        RedisBroker::start_with(config, options)?
    })
}

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
    /// The room's last offset when it was read (0: none yet): where this history ends,
    /// and where live messages take over.
    pub offset: u64,
    /// For a `since` join: whether everything after the position could be served.
    pub recovered: Option<bool>,
    /// For a join that asked for a state room's board (and, with `since`, could not be
    /// served from the history): the board instead of messages.
    pub board: Option<Snapshot>,
}

/// A state room's board at one offset: every entry (`{"key","content","offset"}`) that
/// the messages up to `offset` left.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub offset: u64,
    pub entries: Vec<bytes::Bytes>,
}

/// Why an engine refused a message of a state room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the board holds its most entries (state_max_keys = {max_keys}); a new key is refused until one is removed")]
    StateFull { max_keys: usize },
}

/// Told once what became of a state room's message: its offset, or why it was refused.
/// Not told at all when the engine could not learn it (Redis went away meanwhile).
#[derive(Clone)]
pub struct Outcome(Arc<dyn Fn(Result<u64, Refused>) + Send + Sync>);

impl Outcome {
    pub fn new(tell: impl Fn(Result<u64, Refused>) + Send + Sync + 'static) -> Outcome {
        Outcome(Arc::new(tell))
    }

    pub fn tell(&self, outcome: Result<u64, Refused>) {
        (self.0)(outcome)
    }
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outcome")
    }
}

impl History {
    /// The history of a durable room that has none (never published to, or expired):
    /// no messages and the epoch `""`. A `since` from epoch `""` (taken when the room
    /// had no history either) missed nothing; from any other epoch it cannot be served.
    /// A board join gets the empty board at offset 0 (unless its `since` missed nothing).
    pub fn none(replay: &Replay) -> History {
        let recovered = replay.since_epoch().map(str::is_empty);
        History {
            epoch: Arc::from(""),
            messages: Vec::new(),
            offset: 0,
            recovered,
            board: (replay.wants_board() && recovered != Some(true)).then(Snapshot::default),
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
    /// On a state room's message on its way to the engine: the entry it sets or removes.
    pub board: Option<BoardWrite>,
    /// On a state room's message on its way to the engine: who to tell what became of it.
    pub outcome: Option<Outcome>,
}

impl Envelope {
    /// An envelope of `kind` from `origin`, with nothing of a durable or state room's.
    pub fn new(origin: Arc<str>, target: Target, payload: Encoded, kind: Kind) -> Envelope {
        Envelope {
            origin,
            target,
            payload,
            kind,
            epoch: None,
            board: None,
            outcome: None,
        }
    }
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

/// The future a `Broker` query returns (the trait must stay object safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What `Broker::history` returns.
pub type HistoryFuture<'a> = BoxFuture<'a, Result<History, HistoryError>>;

/// The transport side of the broker seam, with the engine's presence, health and
/// reports beside it (one engine is all four).
pub trait Broker: Presence + Health + Reports + Ledger {
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

    /// A state room's entries not updated for the class's `state_ttl_s` leave its board,
    /// each announced as a removal, as a publish would (the node asks, now and then, for
    /// the rooms it has members in; publishes and reads expire entries too).
    fn expire_entries(&self, room: &Arc<str>, durability: Durability) {
        let _ = (room, durability);
    }

    /// A durable room's history: the last N messages, or everything after a position.
    fn history<'a>(
        &'a self,
        room: &'a str,
        replay: &'a Replay,
        durability: Durability,
    ) -> HistoryFuture<'a> {
        let _ = (room, replay, durability);
        Box::pin(std::future::ready(Err(HistoryError::Unavailable(
            "this engine keeps no history".into(),
        ))))
    }

    /// Sends what is still queued, then stops the engine's tasks, by `deadline` at the
    /// latest: what is still unsent then is counted as dropped and logged.
    fn shutdown(&self, deadline: Instant) -> BoxFuture<'_, ()> {
        let _ = deadline;
        Box::pin(std::future::ready(()))
    }
}
