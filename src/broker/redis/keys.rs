//! Every Redis channel and key volley uses, with the configured prefix, named in one
//! place: the engine's channels, the live-node set, and the cluster reports' keys.
//!
//! In a Redis Cluster (`Keys::cluster`) names carry hash tags, because a script or a
//! sharded channel must stay in one slot: a room's channel, stream and position share
//! the tag `{<roomId>}`, so rooms spread over all 16 384 slots; everything that is not a
//! room (broadcasts, presence, direct messages) shares the tag `{volley}`, one home slot;
//! an engine's probe channel and live-node set carry a tag of the master it talks to.

/// The hash tag of everything in a Redis Cluster that is not a room.
pub const HOME_TAG: &str = "volley";

/// Channel and key names, with the configured prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    room_prefix: String,
    /// Closes a room's name: `}` in a cluster (the end of its hash tag), else nothing.
    room_suffix: &'static str,
    probe_prefix: String,
    user_prefix: String,
    presence_prefix: String,
    stream_prefix: String,
    pub broadcast: String,
    /// This node's probe channel.
    pub probe: String,
    /// Sorted set of live node ids, scored by when each stops counting as alive.
    pub alive: String,
    /// Sorted set of online users, scored by when each entry expires.
    pub presence_index: String,
    /// Hash of online users: user -> `{"serverId":S,"connectedAt":MS}`, so a listing is
    /// two commands (the index, then one HMGET), not one per user.
    pub presence_info: String,
    /// Sorted set of the nodes with users, scored by when each node's liveness expires
    /// (its last presence refresh plus `presence.ttl_s`).
    pub presence_nodes: String,
    presence_node_prefix: String,
    /// Channel of presence changes (`connected` / `disconnected`).
    pub presence_updates: String,
    metrics_prefix: String,
    /// This node's cluster report hash (`metrics:<serverId>`).
    pub metrics: String,
    /// Set of the ids of nodes that write cluster reports.
    pub nodes: String,
    ledger_prefix: String,
    /// The ledger's node liveness (sorted set, scored by when each node expires).
    pub ledger_nodes: String,
}

impl Keys {
    pub fn new(prefix: &str, node_id: &str) -> Keys {
        let probe_prefix = format!("{prefix}volley:probe:");
        Keys {
            room_prefix: format!("{prefix}room:"),
            room_suffix: "",
            broadcast: format!("{prefix}websocket:broadcast"),
            probe: format!("{probe_prefix}{node_id}"),
            alive: format!("{prefix}volley:alive"),
            presence_index: format!("{prefix}presence:online"),
            presence_info: format!("{prefix}volley:presence:info"),
            presence_nodes: format!("{prefix}volley:presence:nodes"),
            presence_node_prefix: format!("{prefix}volley:presence:node:"),
            presence_updates: format!("{prefix}presence:updates"),
            user_prefix: format!("{prefix}user:"),
            presence_prefix: format!("{prefix}presence:"),
            probe_prefix,
            metrics: format!("{prefix}metrics:{node_id}"),
            metrics_prefix: format!("{prefix}metrics:"),
            stream_prefix: format!("{prefix}stream:"),
            nodes: format!("{prefix}volley:nodes"),
            ledger_prefix: format!("{prefix}volley:ledger:"),
            ledger_nodes: format!("{prefix}volley:ledger:nodes"),
        }
    }

    /// The names in a Redis Cluster, for the engine on the master whose slots include
    /// the slot of `probe_tag` (the prefix must not contain `{` or `}`).
    pub fn cluster(prefix: &str, node_id: &str, probe_tag: &str) -> Keys {
        let home = format!("{prefix}{{{HOME_TAG}}}:");
        let probe_prefix = format!("{prefix}volley:probe:{{{probe_tag}}}:");
        Keys {
            room_prefix: format!("{prefix}room:{{"),
            room_suffix: "}",
            broadcast: format!("{home}websocket:broadcast"),
            probe: format!("{probe_prefix}{node_id}"),
            alive: format!("{prefix}volley:alive:{{{probe_tag}}}"),
            presence_index: format!("{home}presence:online"),
            presence_info: format!("{home}volley:presence:info"),
            presence_nodes: format!("{home}volley:presence:nodes"),
            presence_node_prefix: format!("{home}volley:presence:node:"),
            presence_updates: format!("{home}presence:updates"),
            user_prefix: format!("{home}user:"),
            presence_prefix: format!("{home}presence:"),
            probe_prefix,
            metrics: format!("{home}metrics:{node_id}"),
            metrics_prefix: format!("{home}metrics:"),
            stream_prefix: format!("{prefix}stream:{{"),
            nodes: format!("{home}volley:nodes"),
            ledger_prefix: format!("{home}volley:ledger:"),
            ledger_nodes: format!("{home}volley:ledger:nodes"),
        }
    }

    /// What every user's presence hash name starts with (`presence:`).
    pub fn presence_prefix(&self) -> &str {
        &self.presence_prefix
    }

    /// A user's presence hash (`serverId`, `connectedAt`, `lastSeen`).
    pub fn presence(&self, user: &str) -> String {
        format!("{}{user}", self.presence_prefix)
    }

    /// The nodes a user has sockets on (sorted set, scored by when each entry expires).
    pub fn presence_nodes(&self, user: &str) -> String {
        format!("{}{user}:nodes", self.presence_prefix)
    }

    /// A node's record of its users and their rooms (hash: user -> JSON list of rooms),
    /// read by the node that announces them gone when the node dies.
    pub fn presence_node(&self, node: &str) -> String {
        format!("{}{node}", self.presence_node_prefix)
    }

    /// The ledger's set of the nodes that hold a subject (`room:R`, `user:U`; `""`: the
    /// prefix).
    pub fn ledger(&self, subject: &str) -> String {
        format!("{}{subject}", self.ledger_prefix)
    }

    /// The ledger's set of what a node holds (`""`: the prefix).
    pub fn ledger_node(&self, node: &str) -> String {
        format!("{}node:{node}", self.ledger_prefix)
    }

    /// A user's direct-message channel.
    pub fn user(&self, user: &str) -> String {
        format!("{}{user}", self.user_prefix)
    }

    /// The user of a `user:<id>` channel.
    pub fn user_of<'a>(&self, channel: &'a [u8]) -> Option<&'a str> {
        channel
            .strip_prefix(self.user_prefix.as_bytes())
            .and_then(|user| std::str::from_utf8(user).ok())
            .filter(|user| !user.is_empty())
    }

    /// A durable room's stream (`stream:<roomId>`, field `data`, the reference servers' key).
    pub fn stream(&self, room: &str) -> String {
        format!("{}{room}{}", self.stream_prefix, self.room_suffix)
    }

    /// A durable room's position hash (`offset`, `epoch`), beside its stream.
    pub fn position(&self, room: &str) -> String {
        format!("{}{room}{}:position", self.stream_prefix, self.room_suffix)
    }

    /// A state room's board (hash: key -> entry), beside its stream.
    pub fn board(&self, room: &str) -> String {
        format!("{}{room}{}:board", self.stream_prefix, self.room_suffix)
    }

    /// When each entry of a state room's board was last written (sorted set, ms).
    pub fn board_times(&self, room: &str) -> String {
        format!(
            "{}{room}{}:board-times",
            self.stream_prefix, self.room_suffix
        )
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
        let mut name =
            String::with_capacity(self.room_prefix.len() + room.len() + self.room_suffix.len());
        name.push_str(&self.room_prefix);
        name.push_str(room);
        name.push_str(self.room_suffix);
        name
    }

    /// The cluster slot of a room's channel and keys, without building a name when the
    /// room's id gives the hash tag (a cluster's names are `room:{<id>}`).
    pub fn room_slot(&self, room: &str) -> u16 {
        match room.split('}').next() {
            Some(tag) if !tag.is_empty() && !self.room_suffix.is_empty() => slot(tag.as_bytes()),
            _ => slot(self.room(room).as_bytes()),
        }
    }

    /// The room of a `room:<id>` channel.
    pub fn room_of<'a>(&self, channel: &'a [u8]) -> Option<&'a str> {
        channel
            .strip_prefix(self.room_prefix.as_bytes())
            .and_then(|room| room.strip_suffix(self.room_suffix.as_bytes()))
            .and_then(|room| std::str::from_utf8(room).ok())
            .filter(|room| !room.is_empty())
    }
}

/// The cluster slot of a key or sharded channel: CRC16 (XMODEM) of its hash tag (the
/// text between the first `{` and the next `}`, when not empty), else of the whole name.
pub fn slot(name: &[u8]) -> u16 {
    let tagged = name.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &name[open + 1..];
        rest.iter()
            .position(|&b| b == b'}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    crc16(tagged.unwrap_or(name)) % 16_384
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
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
        assert_eq!(c.user_of(b"app1:user:ann"), Some("ann"));
    }

    #[test]
    fn slots_are_redis_cluster_slots() {
        // Values from Redis' CLUSTER KEYSLOT.
        assert_eq!(slot(b"123456789"), 12_739);
        assert_eq!(slot(b"foo"), 12_182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }

    #[test]
    fn a_rooms_names_share_one_slot_in_a_cluster() {
        let c = Keys::cluster("", "n1", "t7");
        let s = slot(c.room("scores:1").as_bytes());
        assert_eq!(slot(c.stream("scores:1").as_bytes()), s);
        assert_eq!(slot(c.position("scores:1").as_bytes()), s);
        assert_eq!(c.room_of(c.room("scores:1").as_bytes()), Some("scores:1"));
        let home = slot(HOME_TAG.as_bytes());
        for name in [
            &c.broadcast,
            &c.presence_updates,
            &c.presence_index,
            &c.presence_info,
            &c.presence_nodes,
            &c.presence_node("n2"),
            &c.user("ann"),
        ] {
            assert_eq!(slot(name.as_bytes()), home, "{name}");
        }
        assert_eq!(slot(c.probe.as_bytes()), slot(b"t7"));
        assert_eq!(slot(c.alive.as_bytes()), slot(b"t7"));
        assert_eq!(c.user_of(c.user("ann").as_bytes()), Some("ann"));
        for room in ["a", "a}b", "}odd", "{x}", "long:room:name"] {
            assert_eq!(c.room_slot(room), slot(c.room(room).as_bytes()), "{room}");
        }
    }
}
