//! The ledger side of the broker seam: which nodes hold which rooms and users, so an
//! event about the whole deployment (a room's first subscriber anywhere, a user's last
//! socket anywhere) is decided once, by the node whose change made it true.
//!
//! A node tells the ledger when it starts holding a subject (its first local member of a
//! room, its first socket of a user) and when it stops; each answer says whether that
//! made the subject held by some node for the first time, or by none any more. A node
//! that dies cannot say it stopped: every node renews its liveness, and the first
//! survivor to find a node's liveness ended takes over what it held (one atomic step, so
//! exactly one node does). On Redis, in every topology, the ledger is kept on the home
//! engine's server; an engine without a shared store is one node alone, and its node's
//! own changes are the deployment's.

use std::sync::Arc;
use std::time::Duration;

use super::BoxFuture;

/// What a deployment-wide event is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    Room(Arc<str>),
    User(Arc<str>),
}

impl Subject {
    /// The name in the ledger's keys and replies: `room:<id>` or `user:<id>`.
    pub fn key(&self) -> String {
        match self {
            Subject::Room(room) => format!("room:{room}"),
            Subject::User(user) => format!("user:{user}"),
        }
    }

    /// The subject a ledger key names.
    pub fn from_key(key: &str) -> Option<Subject> {
        if let Some(room) = key.strip_prefix("room:") {
            return Some(Subject::Room(room.into()));
        }
        key.strip_prefix("user:")
            .map(|user| Subject::User(user.into()))
    }
}

/// Why the ledger could not answer (Redis is away): the caller tries again later.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    #[error("the ledger is not available: {0}")]
    Unavailable(String),
}

pub trait Ledger: Send + Sync {
    /// This node holds `subject` now; true when no node held it before.
    fn hold<'a>(&'a self, subject: &'a Subject) -> BoxFuture<'a, Result<bool, LedgerError>> {
        let _ = subject;
        Box::pin(std::future::ready(Ok(true)))
    }

    /// This node holds `subject` no more; true when no node holds it now.
    fn release<'a>(&'a self, subject: &'a Subject) -> BoxFuture<'a, Result<bool, LedgerError>> {
        let _ = subject;
        Box::pin(std::future::ready(Ok(true)))
    }

    /// Renews this node's liveness for `ttl` and takes over nodes whose liveness ended.
    fn reap(&self, ttl: Duration) -> BoxFuture<'_, Result<Reaped, LedgerError>> {
        let _ = ttl;
        Box::pin(std::future::ready(Ok(Reaped::default())))
    }
}

/// What a liveness renewal found.
#[derive(Debug, Default)]
pub struct Reaped {
    /// What dead nodes held that no node holds now.
    pub gone: Vec<Subject>,
    /// What became of this node's own entry since its last renewal.
    pub own: Own,
}

/// This node's entry in the ledger, as a renewal found it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Own {
    /// There, as the node left it.
    #[default]
    Kept,
    /// Taken over by another node, which announced what it held as gone (Redis was out
    /// of this node's reach for longer than its liveness): what it still holds must be
    /// held, and announced, anew.
    TakenOver,
    /// Not there (the node's first renewal, or Redis lost its data): what it holds must
    /// be held anew, silently: nobody announced it gone.
    Missing,
}
