//! The node: owns the hub, the broker and the delivery window, and is where a message
//! enters and fans out.
//!
//! A message from a socket or the HTTP API is encoded once here, queued for the local
//! subscribers at once, and handed to the broker for the other nodes. A message from the
//! broker arrives already encoded and only fans out. Joins and leaves keep the broker's
//! room subscriptions in step with the hub: subscribed while any local socket is in a room.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::auth::Authenticator;
use crate::batch::{DeliveryPolicy, Pace};
use crate::broker::{
    Broker, BrokerState, Envelope, EnvelopeSink, Kind, Outcome, PresenceError, PresenceEvent,
    PublishError, Subject, Target, UserPresence,
};
use crate::config::{Config, RoomClasses};
use crate::hub::{Hub, Joined, Left};
use crate::metrics::{Stats, StatsSnapshot};
use crate::online::OnlineListing;
use crate::protocol::{ErrorCode, ProtocolError};

pub use crate::hub::FanOut;
pub use crate::metrics::Source;
use crate::outbox::{CloseReason, ConnId, DueList, Outbox};
use crate::protocol::outbound::{self, Membership};
use crate::protocol::{board, now_ms, Encoded};
use crate::throttle::LogThrottle;

mod holdings;
mod replay;
mod state;

use state::{not_a_board, SnapshotReads};

/// How long a read from the broker (a room's history, a user's presence) may take
/// before it is answered as unavailable.
const READ_WAIT: Duration = Duration::from_secs(5);

pub struct Node {
    config: Config,
    id: Arc<str>,
    hub: Hub,
    policy: Arc<DeliveryPolicy>,
    /// Sockets waiting for the next delivery tick; its tick task is the node's clock.
    due: Arc<DueList>,
    /// The `[[rooms]]` classes, compiled once and shared with the delivery window: which
    /// rooms are durable, and each room's pace.
    classes: Arc<RoomClasses>,
    /// Checks tokens (or trusts `userId` where no key is configured).
    auth: Authenticator,
    broker: Arc<dyn Broker>,
    stats: Arc<Stats>,
    next_conn: AtomicU64,
    /// Set when shutdown begins: `/readyz` answers 503 and new sockets are refused.
    draining: AtomicBool,
    /// Who is online: one listing a second, shared by every asker.
    online: OnlineListing,
    /// Boards' snapshot reads, shared by the joiners that wait for one.
    snapshots: SnapshotReads,
    /// The rooms and users this node holds, for the webhooks feature.
    holdings: holdings::Holdings,
}

/// What `/healthz` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub status: &'static str,
    pub node_id: String,
    pub broker: &'static str,
    pub broker_state: BrokerState,
    pub rooms: usize,
    #[serde(flatten)]
    pub stats: StatsSnapshot,
    /// The broker engine's own counters (pipelines, reconnects, drops...).
    #[serde(flatten)]
    pub broker_stats: std::collections::BTreeMap<&'static str, u64>,
}

impl Node {
    /// Builds a node and starts its delivery clocks; call inside a Tokio runtime. The
    /// room classes are compiled from the config (one that failed `Config::validate`
    /// gets none).
    pub fn new(config: Config, broker: Arc<dyn Broker>) -> Arc<Node> {
        let classes = Arc::new(RoomClasses::compiled(&config));
        Self::with_classes(config, broker, classes)
    }

    /// A node with its room classes compiled already (shared with the broker's engines).
    pub fn with_classes(
        config: Config,
        broker: Arc<dyn Broker>,
        classes: Arc<RoomClasses>,
    ) -> Arc<Node> {
        Arc::new_cyclic(|me: &Weak<Node>| {
            let id: Arc<str> = Arc::from(config.server.node_id.as_str());
            let sink: Weak<dyn EnvelopeSink> = me.clone();
            let stats = Arc::new(Stats::default());
            broker.attach(id.clone(), sink, stats.clone());
            let policy = Arc::new(
                DeliveryPolicy::with_classes(&config.batch, classes.clone())
                    .with_compression(config.compression.min_bytes, config.compression.level),
            );
            let due: Arc<DueList> = Arc::new(
                DueList::new(policy.paces().count()).with_io_uring(config.server.io_uring),
            );
            for pace in policy.paces() {
                // At each tick the rooms deliver their windows first, then the sockets
                // listed for the tick write what they hold (the window's clock, once).
                let me = me.clone();
                tokio::spawn(DueList::run_ticks(
                    Arc::downgrade(&due),
                    policy.clone(),
                    pace,
                    move |pace| {
                        me.upgrade()
                            .map(|node| node.deliver_windows(pace))
                            .is_some()
                    },
                ));
            }
            let hub = Hub::with_window(
                policy.clone(),
                stats.clone(),
                config.limits.max_outbox_bytes,
            );
            // Server::bind refused a key that cannot be loaded; here nothing is trusted.
            let auth =
                Authenticator::new(&config.auth).unwrap_or_else(|_| Authenticator::refusing());
            Node {
                policy,
                due,
                classes,
                auth,
                online: OnlineListing::new(config.presence.max_list),
                snapshots: SnapshotReads::default(),
                holdings: Default::default(),
                config,
                id,
                hub,
                broker,
                stats,
                next_conn: AtomicU64::new(1),
                draining: AtomicBool::new(false),
            }
        })
    }

    pub(crate) fn auth(&self) -> &Authenticator {
        &self.auth
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Registers a new socket, or `None` when the node is at `limits.max_connections`.
    pub fn open_socket(&self) -> Option<Arc<Outbox>> {
        if self.stats.connection_opened() > self.config.limits.max_connections as u64 {
            self.stats.connection_closed();
            return None;
        }
        let id = self.next_conn.fetch_add(1, Relaxed);
        let outbox = Arc::new(Outbox::new(
            id,
            self.config.limits.max_outbox_bytes,
            self.policy.clone(),
            self.due.clone(),
            self.stats.clone(),
        ));
        self.hub.add_socket(outbox.clone());
        Some(outbox)
    }

    /// Forgets a socket that has closed (its rooms were left already).
    pub fn disconnect(&self, outbox: &Outbox) {
        self.hub.remove_socket(outbox.id());
        self.stats.connection_closed();
    }

    /// Puts a socket in a room and tells the room (`user_joined`, the joiner included:
    /// the join's answer) once the broker hears the room's other nodes (see
    /// `answer_join`).
    /// With `delta`, the socket takes a state room's deltas (see `offers_delta`).
    pub fn join(self: &Arc<Self>, outbox: &Arc<Outbox>, room: &str, delta: bool) {
        let joined = self
            .hub
            .join(room, outbox, delta, |name| self.room_held(name));
        if let Joined::New { .. } = joined {
            self.stats.joined();
            self.answer_join(outbox, room);
        }
    }

    /// Tells the room of a join (`user_joined`) once what other nodes publish to it
    /// reaches this node (the broker's subscription is confirmed; at once where it is
    /// already, or on the memory engine): from the joiner's answer on, it gets every
    /// message and notice published anywhere. Past the broker's bounded wait the notice
    /// goes anyway: the join stands. Nothing is said for a socket that left meanwhile.
    fn answer_join(self: &Arc<Self>, outbox: &Arc<Outbox>, room: &str) {
        let Some(subscribed) = self.broker.until_subscribed(room) else {
            self.notify_room(room, Membership::Joined, self.hub.members(room));
            return;
        };
        let (node, id, room) = (self.clone(), outbox.id(), Arc::<str>::from(room));
        tokio::spawn(async move {
            if !subscribed.await {
                tracing::debug!(room = %room, "answering a join before its subscription was confirmed");
            }
            if node.hub.is_member(&room, id) {
                node.notify_room(&room, Membership::Joined, node.hub.members(&room));
            }
        });
    }

    /// A room's first local member: the broker subscribes it.
    fn room_held(&self, room: &Arc<str>) {
        self.broker.subscribe(room);
        self.holdings.set(|| Subject::Room(room.clone()), true);
    }

    /// A room's last local member left: the broker unsubscribes it.
    fn room_released(&self, room: &str) {
        self.broker.unsubscribe(room);
        self.holdings.set(|| Subject::Room(room.into()), false);
    }

    /// The rooms and users this node holds (a feature follows them).
    pub fn holdings(&self) -> &holdings::Holdings {
        &self.holdings
    }

    /// Takes a socket out of a room and tells the others left in it (`user_left`).
    pub fn leave(&self, id: ConnId, room: &str) {
        let left = self.hub.leave(room, id, |name| self.room_released(name));
        if let Left::Gone { members, .. } = left {
            self.stats.left();
            self.notify_room(room, Membership::Left, members + 1);
        }
    }

    /// A membership notice, unless notices are off or the room is too big for them: each
    /// notice goes to every member, so a crowd joining would cost members squared.
    fn notify_room(&self, room: &str, kind: Membership, members: usize) {
        let limits = &self.config.limits;
        if !limits.notices || members > limits.notices_max_members {
            return;
        }
        let notice = outbound::membership(kind, room, now_ms());
        if let Err(e) = self.send_room(room, notice, Kind::Notice) {
            static LOG: LogThrottle = LogThrottle::new(Duration::from_secs(10));
            if let Some(held_back) = LOG.allow() {
                tracing::warn!(room, held_back, "membership notice not sent: {e}");
            }
        }
    }

    /// Publishes `content` to a room on every node; returns the local fan-out. When the
    /// broker cannot take it, nobody gets it and the caller must say so (`overloaded`).
    pub fn publish(
        &self,
        room: &str,
        content: &RawValue,
        source: Source,
    ) -> Result<FanOut, ProtocolError> {
        self.publish_to(room, content, false, source, || None)
    }

    /// `publish`, with what a state room's message may ask: `remove` its entry, and an
    /// `outcome` (made only for a state room's message) told what became of it (its
    /// offset, or `state_full`). A state room's message must name its entry
    /// (`state_key`); `remove` is for state rooms only.
    pub fn publish_to<O: Into<Option<Outcome>>>(
        &self,
        room: &str,
        content: &RawValue,
        remove: bool,
        source: Source,
        outcome: impl FnOnce() -> O,
    ) -> Result<FanOut, ProtocolError> {
        let overloaded = |e: PublishError| ProtocolError::new(ErrorCode::Overloaded, e.to_string());
        let Some(durability) = self.classes.durability(room) else {
            if remove {
                return Err(not_a_board(room, "remove"));
            }
            self.stats.message_in(source);
            let message = outbound::room_message(room, content, now_ms());
            return self
                .send_room(room, message, Kind::Message)
                .map_err(overloaded);
        };
        let (payload, board) = match self.classes.state_key_of(room) {
            Some(field) => {
                let key = board::entry_key(content, field)?;
                let message = if remove {
                    board::removal(room, key)
                } else {
                    board::message(room, key, content, now_ms())
                };
                (message.frame, Some(message.write))
            }
            None if remove => return Err(not_a_board(room, "remove")),
            None => (outbound::room_message(room, content, now_ms()), None),
        };
        self.stats.message_in(source);
        // The engine gives it its offset and delivers it here too, in the room's order.
        let mut envelope = Envelope::new(
            self.id.clone(),
            Target::Room(Arc::from(room)),
            payload,
            Kind::Durable(durability),
        );
        if board.is_some() {
            envelope.outcome = outcome().into();
        }
        envelope.board = board;
        self.broker.publish(&[envelope]).map_err(overloaded)?;
        Ok(FanOut::default())
    }

    /// A socket identified as `user`: its user's first socket here puts the user online
    /// on this node and subscribes their direct messages.
    pub(crate) fn identify(&self, outbox: &Arc<Outbox>, user: &Arc<str>) {
        self.hub.add_user(user, outbox, |user| {
            self.broker.user_online(user);
            self.holdings.set(|| Subject::User(user.clone()), true);
        });
    }

    /// A socket of `user` closed; the user's last one here takes them offline here.
    pub(crate) fn forget_user(&self, user: &Arc<str>, id: ConnId) {
        self.hub.remove_user(user, id, |user| {
            self.broker.user_offline(user);
            self.holdings.set(|| Subject::User(user.clone()), false);
        });
    }

    /// Starts or stops presence events for a socket.
    pub(crate) fn watch_presence(&self, outbox: &Arc<Outbox>, watch: bool) {
        self.hub.watch_presence(outbox, watch);
    }

    /// Who is online on any node, at most `presence.max_list`: the node's listing, read
    /// at most once a second and shared by every asker (see `online`).
    pub async fn online_users(&self) -> Result<Encoded, PresenceError> {
        self.online.get(&*self.broker).await
    }

    /// One socket of `user` joined or left `room`: the broker's record of this node's
    /// users follows the rooms they are in (see `EnvelopeSink::rooms_of`).
    pub(crate) fn user_in_room(&self, user: &Arc<str>, room: &str, joined: bool) {
        if self.hub.user_room(user, room, joined) {
            self.broker.user_rooms_changed(user);
        }
    }

    /// One user's presence, if online anywhere.
    pub async fn presence_of(&self, user: &str) -> Result<Option<UserPresence>, PresenceError> {
        let read = self.broker.presence_of(user);
        tokio::time::timeout(READ_WAIT, read)
            .await
            .unwrap_or_else(|_| Err(PresenceError::Unavailable("timed out".into())))
    }

    /// A direct message to every socket of `to`, on any node; `from` is the sender's
    /// identity (`None` from a backend). Refused when the user is online nowhere.
    pub async fn direct_message(
        &self,
        from: Option<&str>,
        to: &str,
        content: &RawValue,
    ) -> Result<FanOut, ProtocolError> {
        let local = self.hub.has_user(to);
        if !local {
            match self.presence_of(to).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(ProtocolError::new(
                        ErrorCode::UserOffline,
                        format!("user {to:?} has no socket on any node"),
                    ))
                }
                Err(e) => {
                    return Err(ProtocolError::new(
                        ErrorCode::PresenceUnavailable,
                        e.to_string(),
                    ))
                }
            }
        }
        let frame = outbound::direct_message(from, content);
        self.broker
            .publish(&[Envelope::new(
                self.id.clone(),
                Target::User(Arc::from(to)),
                frame.clone(),
                Kind::Message,
            )])
            .map_err(|e| ProtocolError::new(ErrorCode::Overloaded, e.to_string()))?;
        Ok(self.log_slow_consumers(self.hub.fan_out_user(to, &frame)))
    }

    /// Sends `payload`, as given, to every socket on every node; returns the local fan-out.
    pub fn broadcast(&self, payload: &RawValue, source: Source) -> Result<FanOut, PublishError> {
        self.stats.message_in(source);
        let message = Encoded::from_json(payload.get().as_bytes());
        self.broker.publish(&[Envelope::new(
            self.id.clone(),
            Target::Broadcast,
            message.clone(),
            Kind::Message,
        )])?;
        Ok(self.log_slow_consumers(self.hub.fan_out_all(&message)))
    }

    fn send_room(&self, room: &str, message: Encoded, kind: Kind) -> Result<FanOut, PublishError> {
        // One lookup serves both the broker's address and the local fan-out; a name is
        // allocated only for a room with no local socket.
        let local = self.hub.room(room);
        let name = local
            .as_ref()
            .map_or_else(|| Arc::from(room), |r| r.name().clone());
        let sent = self.broker.publish(&[Envelope::new(
            self.id.clone(),
            Target::Room(name),
            message.clone(),
            kind,
        )]);
        // A message the other nodes cannot get goes to nobody, so the publisher can retry
        // it; a notice is best effort and still reaches the local members.
        if kind == Kind::Message {
            sent?;
        }
        let fan = self.log_slow_consumers(local.map(|r| r.fan_out(&message)).unwrap_or_default());
        sent.map(|()| fan)
    }

    /// `pace`'s tick: the rooms with messages collected in its window deliver them.
    fn deliver_windows(&self, pace: Pace) {
        self.log_slow_consumers(self.hub.tick(pace));
    }

    /// Logs the slow consumers a fan-out closed (the outbox counted them).
    fn log_slow_consumers(&self, fan: FanOut) -> FanOut {
        if fan.overflowed > 0 {
            tracing::warn!(
                count = fan.overflowed,
                "closing slow consumers: outbox full"
            );
        }
        fan
    }

    /// Shutdown began: the node is no longer ready and takes no new sockets.
    pub fn start_draining(&self) {
        self.draining.store(true, Relaxed);
    }

    /// Whether shutdown began.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// Asks every socket to flush what it has queued and close with 1001.
    pub fn close_all_sockets(&self) {
        // What rooms collected for their next tick goes out with the rest.
        for pace in self.policy.paces() {
            self.deliver_windows(pace);
        }
        for socket in self.hub.sockets() {
            socket.close(CloseReason::Shutdown);
        }
    }

    /// `/metrics`: every figure of this node in the Prometheus text format.
    pub fn prometheus(&self) -> String {
        let (open_fds, max_fds) = crate::fdlimit::usage();
        let broker_connected = self.broker.state() == BrokerState::Connected;
        let levels = crate::metrics::Levels {
            rooms: self.hub.room_count(),
            ready: self.is_ready(),
            broker_connected,
            open_fds,
            max_fds,
        };
        self.stats.render_prometheus(
            &self.id,
            self.broker.engine(),
            &levels,
            &self.broker.counters(),
        )
    }

    /// What `/readyz` answers: the broker connected and the node not draining.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.broker.state() == BrokerState::Connected
    }

    pub fn rooms(&self) -> usize {
        self.hub.room_count()
    }

    pub fn health(&self) -> Health {
        Health {
            status: if self.is_draining() { "draining" } else { "ok" },
            node_id: self.id.to_string(),
            broker: self.broker.engine(),
            broker_state: self.broker.state(),
            rooms: self.hub.room_count(),
            stats: self.stats.snapshot(),
            broker_stats: self
                .broker
                .counters()
                .into_iter()
                .map(|c| (c.name, c.value))
                .collect(),
        }
    }
}

impl EnvelopeSink for Node {
    /// An envelope from another node, or a durable message (from any node, this one too)
    /// in its room's order. Engines never hand a node its own plain envelopes: it
    /// delivered those when they were published.
    fn deliver(&self, envelope: Envelope) {
        self.stats.message_in(Source::Broker);
        match (&envelope.target, &envelope.epoch) {
            (Target::Room(room), Some(epoch)) => {
                self.log_slow_consumers(self.hub.fan_out_durable(room, epoch, &envelope.payload))
            }
            (Target::Room(room), None) => {
                self.log_slow_consumers(self.hub.fan_out(room, &envelope.payload))
            }
            (Target::Broadcast, _) => {
                self.log_slow_consumers(self.hub.fan_out_all(&envelope.payload))
            }
            (Target::User(user), _) => {
                self.log_slow_consumers(self.hub.fan_out_user(user, &envelope.payload))
            }
        };
    }

    fn presence(&self, event: PresenceEvent) {
        let frame = outbound::presence(event.connected, &event.user_id, &event.server_id);
        self.log_slow_consumers(self.hub.fan_out_watchers(&frame));
    }

    fn rooms_of(&self, user: &str) -> Vec<Arc<str>> {
        self.hub.rooms_of(user)
    }

    /// A dead node's users left their rooms: each room hears it as it would have from a
    /// live node (one `user_left` per user, within the notice limits).
    fn users_gone(&self, node: &str, rooms: &[(String, u64)]) {
        for (room, users) in rooms {
            let members = (*users as usize).max(self.hub.members(room));
            for _ in 0..*users {
                self.notify_room(room, Membership::Left, members);
            }
        }
        tracing::debug!(
            node,
            rooms = rooms.len(),
            "announced a dead node's users gone"
        );
    }
}
