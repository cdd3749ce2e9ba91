//! Every Redis channel and key volley uses, with the configured prefix, named in one
//! place: the engine's channels, the live-node set, and the cluster reports' keys.

/// Channel and key names, with the configured prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    room_prefix: String,
    probe_prefix: String,
    pub broadcast: String,
    /// This node's probe channel.
    pub probe: String,
    /// Sorted set of live node ids, scored by when each stops counting as alive.
    pub alive: String,
    /// Sorted set of online users, scored by when each entry expires.
    pub presence_index: String,
    /// Channel of presence changes (`connected` / `disconnected`).
    pub presence_updates: String,
    prefix: String,
    metrics_prefix: String,
    stream_prefix: String,
    /// This node's cluster report hash (`metrics:<serverId>`).
    pub metrics: String,
    /// Set of the ids of nodes that write cluster reports.
    pub nodes: String,
}

impl Keys {
    pub fn new(prefix: &str, node_id: &str) -> Keys {
        let probe_prefix = format!("{prefix}volley:probe:");
        Keys {
            room_prefix: format!("{prefix}room:"),
            broadcast: format!("{prefix}websocket:broadcast"),
            probe: format!("{probe_prefix}{node_id}"),
            alive: format!("{prefix}volley:alive"),
            presence_index: format!("{prefix}presence:online"),
            presence_updates: format!("{prefix}presence:updates"),
            prefix: prefix.to_string(),
            probe_prefix,
            metrics: format!("{prefix}metrics:{node_id}"),
            metrics_prefix: format!("{prefix}metrics:"),
            stream_prefix: format!("{prefix}stream:"),
            nodes: format!("{prefix}volley:nodes"),
        }
    }

    /// A user's presence hash (`serverId`, `connectedAt`, `lastSeen`).
    pub fn presence(&self, user: &str) -> String {
        format!("{}presence:{user}", self.prefix)
    }

    /// The nodes a user has sockets on (sorted set, scored by when each entry expires).
    pub fn presence_nodes(&self, user: &str) -> String {
        format!("{}presence:{user}:nodes", self.prefix)
    }

    /// A user's direct-message channel.
    pub fn user(&self, user: &str) -> String {
        format!("{}user:{user}", self.prefix)
    }

    /// The user of a `user:<id>` channel.
    pub fn user_of<'a>(&self, channel: &'a [u8]) -> Option<&'a str> {
        channel
            .strip_prefix(self.prefix.as_bytes())
            .and_then(|c| c.strip_prefix(b"user:"))
            .and_then(|user| std::str::from_utf8(user).ok())
            .filter(|user| !user.is_empty())
    }

    /// A durable room's stream (`stream:<roomId>`, field `data`, the reference servers' key).
    pub fn stream(&self, room: &str) -> String {
        format!("{}{room}", self.stream_prefix)
    }

    /// A durable room's position hash (`offset`, `epoch`), beside its stream.
    pub fn position(&self, room: &str) -> String {
        format!("{}{room}:position", self.stream_prefix)
    }

    /// Another node's cluster report hash.
    pub fn metrics_of(&self, node_id: &str) -> String {
        format!("{}{node_id}", self.metrics_prefix)
    }

    /// Another node's probe channel.
    pub fn probe_of(&self, node_id: &str) -> String {
        format!("{}{node_id}", self.probe_prefix)
    }

    pub fn room(&self, room: &str) -> String {
        let mut name = String::with_capacity(self.room_prefix.len() + room.len());
        name.push_str(&self.room_prefix);
        name.push_str(room);
        name
    }

    /// The room of a `room:<id>` channel.
    pub fn room_of<'a>(&self, channel: &'a [u8]) -> Option<&'a str> {
        channel
            .strip_prefix(self.room_prefix.as_bytes())
            .and_then(|room| std::str::from_utf8(room).ok())
            .filter(|room| !room.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_channels_keep_their_prefix() {
        let c = Keys::new("app1:", "n1");
        assert_eq!(c.room("42"), "app1:room:42");
        assert_eq!(c.room_of(b"app1:room:42"), Some("42"));
        assert_eq!(c.room_of(b"room:42"), None);
        assert_eq!(c.broadcast, "app1:websocket:broadcast");
    }
}
