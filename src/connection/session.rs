//! What one socket may do: its rooms, its publish budget, and the answer to each frame.
//!
//! The reader hands every complete text message here. A client mistake becomes an
//! `error` frame in the socket's own outbox; the socket stays open and nothing else on
//! the node notices.
//!
//! Nothing here waits: what needs another node or Redis (a join's history, who is online,
//! a direct message's user) runs on a task of its own and answers into the outbox when
//! it can, so a slow or absent Redis never holds up the socket's other frames. Direct
//! messages keep their order: one task per socket sends them one after another.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::access::{Access, Expiry, UpgradeAuth};
use crate::broker::{Outcome, PublishError};
use crate::metrics::Source;
use crate::node::Node;
use crate::outbox::Outbox;
use crate::protocol::inbound::Replay;
use crate::protocol::{self, outbound, ClientFrame, ErrorCode, ProtocolError};

pub struct Session {
    node: Arc<Node>,
    outbox: Arc<Outbox>,
    rooms: HashSet<Box<str>>,
    max_rooms: usize,
    max_json_depth: usize,
    access: Access,
    /// The user this socket is identified as on the node (presence, direct messages).
    user: Option<Arc<str>>,
    publishes: Budget,
    /// For a trusted publisher: `limits.trusted_publish_rate`.
    trusted_publishes: Budget,
    joins: Budget,
    /// `get_online_users`: `limits.presence_rate`.
    presence_queries: Budget,
    /// Direct messages on their way, in order (the task starts with the first one).
    direct: Option<mpsc::Sender<Direct>>,
}

/// Most direct messages of one socket waiting to be sent (each may wait for a presence
/// read); one more is refused with `overloaded`.
const DIRECT_QUEUE: usize = 64;

/// A direct message waiting its turn.
struct Direct {
    from: Option<Arc<str>>,
    to: Box<str>,
    content: Box<RawValue>,
}

impl Session {
    pub fn new(node: Arc<Node>, outbox: Arc<Outbox>, upgrade: UpgradeAuth) -> Session {
        let token = upgrade.token.clone();
        let mut session = Session::anonymous(node, outbox, upgrade);
        if let Some(token) = token {
            if let Err(e) = session.authenticate(Some(&token), None) {
                session.reply_error(&e);
            }
        }
        session
    }

    /// For a stream that cannot be answered later (SSE): a token that gives no identity
    /// is refused now, before anything is sent.
    pub fn checked(
        node: Arc<Node>,
        outbox: Arc<Outbox>,
        upgrade: UpgradeAuth,
    ) -> Result<Session, ProtocolError> {
        let token = upgrade.token.clone();
        let mut session = Session::anonymous(node, outbox, upgrade);
        if let Some(token) = token {
            session.authenticate(Some(&token), None)?;
        }
        Ok(session)
    }

    fn anonymous(node: Arc<Node>, outbox: Arc<Outbox>, upgrade: UpgradeAuth) -> Session {
        let config = node.config();
        let limits = &config.limits;
        let trusted_rate = limits.trusted_publish_rate;
        Session {
            max_rooms: limits.max_rooms_per_socket,
            max_json_depth: limits.max_json_depth,
            access: Access::new(config, node.auth().checks_tokens(), upgrade.api_key),
            publishes: Budget::new(limits.publish_rate, limits.publish_burst, "publishing"),
            trusted_publishes: Budget::new(trusted_rate, trusted_rate.max(1), "publishing"),
            joins: Budget::new(limits.join_rate, limits.join_burst, "joining rooms"),
            presence_queries: Budget::new(
                limits.presence_rate,
                limits.presence_burst,
                "asking who is online",
            ),
            direct: None,
            node: node.clone(),
            outbox,
            rooms: HashSet::new(),
            user: None,
        }
    }

    fn authenticate(
        &mut self,
        token: Option<&str>,
        user_id: Option<&str>,
    ) -> Result<(), ProtocolError> {
        let identity = self.access.authenticate(&self.node, token, user_id)?;
        let user = identity.user_id.clone();
        self.outbox.send(&outbound::authenticated(&user));
        if self.user.is_none() {
            self.node.identify(&self.outbox, &user);
            for room in &self.rooms {
                self.node.user_in_room(&user, room, true);
            }
            self.user = Some(user);
        }
        Ok(())
    }

    /// When the token's expiry next needs the reader's attention.
    pub fn deadline(&self) -> Option<std::time::Instant> {
        self.access.deadline()
    }

    /// The token's deadline passed: warn the client, or tell the reader to close.
    pub fn on_deadline(&mut self) -> bool {
        match self.access.expired() {
            Expiry::Warn(e) => {
                self.reply_error(&e);
                true
            }
            Expiry::Close => false,
        }
    }

    fn spend_publish(&mut self) -> Result<(), ProtocolError> {
        if self.access.trusted() {
            self.trusted_publishes.spend()
        } else {
            self.publishes.spend()
        }
    }

    /// Answers one complete text message from the client. What needs another node or
    /// Redis is started here and answers later (see the module's doc); the next frame is
    /// read at once.
    pub fn on_text(&mut self, text: &[u8]) {
        match self.dispatch(text) {
            Ok(Some(later)) => self.start(later),
            Ok(None) => {}
            Err(e) => self.reply_error(&e),
        }
    }

    /// Starts work that waits for another node or Redis.
    fn start(&mut self, later: Later) {
        match later {
            Later::Replay(room, replay, delta) => {
                self.node.join_replaying(&self.outbox, &room, replay, delta);
            }
            Later::OnlineUsers => {
                let (node, outbox) = (self.node.clone(), self.outbox.clone());
                tokio::spawn(async move {
                    match node.online_users().await {
                        Ok(listing) => {
                            outbox.send(&listing);
                        }
                        Err(e) => reply_error(
                            &node,
                            &outbox,
                            &ProtocolError::new(ErrorCode::PresenceUnavailable, e.to_string()),
                        ),
                    }
                });
            }
            Later::Direct(direct) => {
                let queue = self.direct.get_or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(DIRECT_QUEUE);
                    tokio::spawn(send_directs(self.node.clone(), self.outbox.clone(), rx));
                    tx
                });
                if queue.try_send(direct).is_err() {
                    self.reply_error(&ProtocolError::new(
                        ErrorCode::Overloaded,
                        format!("{DIRECT_QUEUE} direct messages of this socket are still on their way; this one was dropped"),
                    ));
                }
            }
        }
    }

    pub fn reply_error(&self, e: &ProtocolError) {
        reply_error(&self.node, &self.outbox, e);
    }

    /// Handles a frame; what must be waited for is returned for `on_text`.
    fn dispatch(&mut self, text: &[u8]) -> Result<Option<Later>, ProtocolError> {
        let frame = protocol::parse(text)?;
        if let ClientFrame::Auth { token, user_id } = &frame {
            self.authenticate(token.as_deref(), user_id.as_deref())?;
            return Ok(None);
        }
        self.access.check_authenticated()?;
        match frame {
            ClientFrame::Auth { .. } => {}
            ClientFrame::GetOnlineUsers => {
                self.presence_queries.spend()?;
                return Ok(Some(Later::OnlineUsers));
            }
            ClientFrame::Presence { subscribe } => {
                self.node.watch_presence(&self.outbox, subscribe);
            }
            ClientFrame::DirectMessage { to, content } => {
                if self.user.is_none() {
                    return Err(ProtocolError::new(
                        ErrorCode::Unauthenticated,
                        "a direct message needs an identity: send auth first",
                    ));
                }
                protocol::check_content(content, "content", self.max_json_depth)?;
                self.spend_publish()?;
                return Ok(Some(Later::Direct(Direct {
                    from: self.user.clone(),
                    to: to.into(),
                    content: content.to_owned(),
                })));
            }
            ClientFrame::Join {
                room,
                replay,
                delta,
            } => return self.join(room.into(), replay, delta),
            ClientFrame::Leave { room } => {
                if !self.rooms.remove(&*room) {
                    return Err(ProtocolError::new(
                        ErrorCode::NotInRoom,
                        format!("not in room {room:?}"),
                    ));
                }
                self.leave(&room);
            }
            ClientFrame::Message {
                room,
                content,
                remove,
            } => self.publish(&room, content, remove)?,
            ClientFrame::Broadcast { payload } => {
                self.access.may_broadcast()?;
                protocol::check_content(payload, "payload", self.max_json_depth)?;
                self.spend_publish()?;
                self.node
                    .broadcast(payload, Source::Socket)
                    .map_err(overloaded)?;
            }
        }
        Ok(None)
    }

    /// A join asked for outside a frame (an SSE stream's rooms): checked as a `join`
    /// frame is, with the error returned instead of sent.
    pub fn join_now(&mut self, room: &str, replay: Option<Replay>) -> Result<(), ProtocolError> {
        self.access.check_authenticated()?;
        protocol::inbound::check_room_id(room)?;
        if let Some(later) = self.join(room.into(), replay, false)? {
            self.start(later);
        }
        Ok(())
    }

    /// A join: checked, charged, and the socket in the room (a replaying join goes on
    /// a task of its own: `Later::Replay`).
    fn join(
        &mut self,
        room: Box<str>,
        replay: Option<Replay>,
        delta: bool,
    ) -> Result<Option<Later>, ProtocolError> {
        if self.rooms.contains(&room) {
            return Ok(None);
        }
        self.access.may_join(&room)?;
        if delta && !self.node.offers_delta(&room) {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                format!(
                    r#"room {room:?} offers no deltas (no [[rooms]] class with delta = "fossil" matches it); join without delta"#
                ),
            ));
        }
        if self.rooms.len() >= self.max_rooms {
            return Err(ProtocolError::new(
                ErrorCode::TooManyRooms,
                format!("a socket may be in at most {} rooms", self.max_rooms),
            ));
        }
        // Joins cost Redis work (subscriptions, notices): charged like publishes.
        self.joins.spend()?;
        self.rooms.insert(room.clone());
        if let Some(user) = &self.user {
            self.node.user_in_room(user, &room, true);
        }
        match replay {
            Some(replay) => Ok(Some(Later::Replay(room, replay, delta))),
            None => {
                self.node.join(&self.outbox, &room, delta);
                Ok(None)
            }
        }
    }

    /// A publish to a room; a state room's refusal (`state_full`) comes from the engine,
    /// later, as an `error` frame on this socket.
    fn publish(
        &mut self,
        room: &str,
        content: &RawValue,
        remove: bool,
    ) -> Result<(), ProtocolError> {
        self.access.may_publish(room)?;
        protocol::check_content(content, "content", self.max_json_depth)?;
        self.spend_publish()?;
        let (node, outbox) = (&self.node, &self.outbox);
        let outcome = || {
            let (node, outbox) = (Arc::downgrade(node), Arc::downgrade(outbox));
            Outcome::new(move |outcome| {
                if let (Err(refused), Some(node), Some(outbox)) =
                    (outcome, node.upgrade(), outbox.upgrade())
                {
                    let e = ProtocolError::new(ErrorCode::StateFull, refused.to_string());
                    reply_error(&node, &outbox, &e);
                }
            })
        };
        self.node
            .publish_to(room, content, remove, Source::Socket, outcome)?;
        Ok(())
    }

    /// Leaves every room, as when the socket closes.
    pub fn leave_all(&mut self) {
        for room in std::mem::take(&mut self.rooms) {
            self.leave(&room);
        }
    }

    /// Out of one room (already taken out of `rooms`).
    fn leave(&self, room: &str) {
        self.node.leave(self.outbox.id(), room);
        if let Some(user) = &self.user {
            self.node.user_in_room(user, room, false);
        }
    }

    /// The socket is gone (or closing): out of its rooms, its user's sockets and presence
    /// watchers. Ending twice does nothing more.
    pub fn end(&mut self) {
        self.leave_all();
        self.node.watch_presence(&self.outbox, false);
        if let Some(user) = self.user.take() {
            self.node.forget_user(&user, self.outbox.id());
        }
    }
}

/// Work a frame leaves for a task of its own.
enum Later {
    /// A join with a replay; `true`: with deltas.
    Replay(Box<str>, Replay, bool),
    OnlineUsers,
    Direct(Direct),
}

/// An `error` frame for the client, counted by code.
fn reply_error(node: &Node, outbox: &Arc<Outbox>, e: &ProtocolError) {
    node.stats().protocol_error(e.code);
    tracing::debug!(
        conn = outbox.id(),
        code = e.code.as_str(),
        "client error: {}",
        e.message
    );
    outbox.send(&outbound::error(e));
}

/// Sends one socket's direct messages in order; ends when the socket's session does.
async fn send_directs(node: Arc<Node>, outbox: Arc<Outbox>, mut queue: mpsc::Receiver<Direct>) {
    while let Some(direct) = queue.recv().await {
        let sent = node
            .direct_message(direct.from.as_deref(), &direct.to, &direct.content)
            .await;
        if let Err(e) = sent {
            reply_error(&node, &outbox, &e);
        }
    }
}

fn overloaded(e: PublishError) -> ProtocolError {
    ProtocolError::new(ErrorCode::Overloaded, e.to_string())
}

/// A token bucket: `rate` per second, up to `burst` at once; rate 0 is no limit.
struct Budget {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    /// What the budget is for, in the refusal: "publishing", "joining rooms".
    doing: &'static str,
}

impl Budget {
    fn new(rate: u32, burst: u32, doing: &'static str) -> Budget {
        Budget {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: Instant::now(),
            doing,
        }
    }

    fn spend(&mut self) -> Result<(), ProtocolError> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens < 1.0 {
            return Err(ProtocolError::new(
                ErrorCode::RateLimited,
                format!(
                    "{} faster than {} per second; this frame was dropped",
                    self.doing, self.rate
                ),
            ));
        }
        self.tokens -= 1.0;
        Ok(())
    }
}
