//! The presence side of the broker seam: who is online anywhere. The node tells its
//! engine when a user's first socket here appears and their last one goes; the engine
//! keeps the deployment's index and announces changes (`EnvelopeSink::presence`).

use std::sync::Arc;

use super::BoxFuture;

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

impl OnlineUsers {
    /// Several engines' listings as one: sorted by user id, at most `max`.
    pub fn merge(parts: impl IntoIterator<Item = OnlineUsers>, max: usize) -> OnlineUsers {
        let mut all = OnlineUsers::default();
        for part in parts {
            all.truncated |= part.truncated;
            all.users.extend(part.users);
        }
        all.users.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        all.truncated |= all.users.len() > max;
        all.users.truncate(max);
        all
    }
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

/// The presence side of the broker seam. The defaults keep no index: a node alone.
pub trait Presence: Send + Sync {
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
}
