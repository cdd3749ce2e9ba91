//! What one socket may do: its rooms, its publish budget, and the answer to each frame.
//!
//! The reader hands every complete text message here. A client mistake becomes an
//! `error` frame in the socket's own outbox; the socket stays open and nothing else on
//! the node notices.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use super::outbox::Outbox;
use crate::broker::PublishError;
use crate::config::LimitsConfig;
use crate::metrics::Source;
use crate::node::Node;
use crate::protocol::{self, outbound, ClientFrame, ErrorCode, ProtocolError};

pub struct Session {
    node: Arc<Node>,
    outbox: Arc<Outbox>,
    rooms: HashSet<Box<str>>,
    max_rooms: usize,
    budget: PublishBudget,
}

impl Session {
    pub fn new(node: Arc<Node>, outbox: Arc<Outbox>) -> Session {
        let limits = &node.config().limits;
        Session {
            max_rooms: limits.max_rooms_per_socket,
            budget: PublishBudget::new(limits),
            node,
            outbox,
            rooms: HashSet::new(),
        }
    }

    /// Answers one complete text message from the client.
    pub fn on_text(&mut self, text: &[u8]) {
        if let Err(e) = self.dispatch(text) {
            self.reply_error(&e);
        }
    }

    pub fn reply_error(&self, e: &ProtocolError) {
        self.node.stats().protocol_error(e.code);
        tracing::debug!(
            conn = self.outbox.id(),
            code = e.code.as_str(),
            "client error: {}",
            e.message
        );
        self.outbox.send(&outbound::error(e));
    }

    fn dispatch(&mut self, text: &[u8]) -> Result<(), ProtocolError> {
        match protocol::parse(text)? {
            ClientFrame::Join { room } => {
                if self.rooms.contains(&*room) {
                    return Ok(());
                }
                if self.rooms.len() >= self.max_rooms {
                    return Err(ProtocolError::new(
                        ErrorCode::TooManyRooms,
                        format!("a socket may be in at most {} rooms", self.max_rooms),
                    ));
                }
                self.node.join(&self.outbox, &room);
                self.rooms.insert(room.into());
            }
            ClientFrame::Leave { room } => {
                if !self.rooms.remove(&*room) {
                    return Err(ProtocolError::new(
                        ErrorCode::NotInRoom,
                        format!("not in room {room:?}"),
                    ));
                }
                self.node.leave(self.outbox.id(), &room);
            }
            ClientFrame::Message { room, content } => {
                self.budget.spend()?;
                self.node
                    .publish(&room, content, Source::Socket)
                    .map_err(overloaded)?;
            }
            ClientFrame::Broadcast { payload } => {
                self.budget.spend()?;
                self.node
                    .broadcast(payload, Source::Socket)
                    .map_err(overloaded)?;
            }
        }
        Ok(())
    }

    /// Leaves every room, as when the socket closes.
    pub fn leave_all(&mut self) {
        for room in self.rooms.drain() {
            self.node.leave(self.outbox.id(), &room);
        }
    }
}

fn overloaded(e: PublishError) -> ProtocolError {
    ProtocolError::new(ErrorCode::Overloaded, e.to_string())
}

/// A token bucket: `publish_rate` per second, up to `publish_burst` at once.
struct PublishBudget {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl PublishBudget {
    fn new(limits: &LimitsConfig) -> PublishBudget {
        PublishBudget {
            rate: f64::from(limits.publish_rate),
            burst: f64::from(limits.publish_burst),
            tokens: f64::from(limits.publish_burst),
            last: Instant::now(),
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
                    "publishing faster than {} messages per second; this message was dropped",
                    self.rate
                ),
            ));
        }
        self.tokens -= 1.0;
        Ok(())
    }
}
