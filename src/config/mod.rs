//! One typed configuration for a node, read once at start.
//!
//! Sources, later ones winning: built-in defaults, a TOML file (`--config FILE`),
//! the reference servers' environment names (`PORT`, `SERVER_ID`, `REDIS_URL`), `VOLLEY_*` environment
//! variables, then command-line flags (`--listen`, `--set batch.delivery_window_ms=10`, ...).
//! A bad value is an error at start that names the key; nothing here is read again
//! while the node runs, so the hot path never touches this module.
//!
//! | file | job |
//! | --- | --- |
//! | `mod.rs` | the sections and their defaults, loading, `validate` |
//! | `rooms.rs` | `[[rooms]]` classes, compiled once: history, delivery and publish paces, conflation |
//! | `keys.rs` | the keys that may be set, and the nearest one for a key that is not |

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The sections of the file; `VOLLEY_<SECTION>_<KEY>` maps to `section.key`.
const SECTIONS: [&str; 12] = [
    "server",
    "batch",
    "limits",
    "api",
    "auth",
    "presence",
    "redis",
    "metrics",
    "demo",
    "tls",
    "compression",
    "webhooks",
];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub batch: BatchConfig,
    pub limits: LimitsConfig,
    pub api: ApiConfig,
    pub auth: AuthConfig,
    pub presence: PresenceConfig,
    pub redis: RedisConfig,
    pub metrics: MetricsConfig,
    pub demo: DemoConfig,
    pub tls: TlsConfig,
    pub compression: CompressionConfig,
    pub webhooks: WebhooksConfig,
    /// Room classes, `[[rooms]]` in the file: the first whose `match` glob matches a room
    /// id gives that room its options; rooms matching none are plain.
    pub rooms: Vec<RoomClass>,
}

mod keys;
mod load;
mod rooms;
#[cfg(test)]
mod tests;
mod validate;
mod webhooks;

pub use load::Overrides;
pub use rooms::{BoardLimits, Durability, RoomClass, RoomClasses, DELTA_FOSSIL, MAX_PACES};
pub use webhooks::{WebhooksConfig, WEBHOOK_EVENTS};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the HTTP and WebSocket listener binds.
    pub listen: SocketAddr,
    /// This node's id: the `serverId` of everything it publishes to a broker.
    pub node_id: String,
    /// How long a graceful shutdown may take, all of it: flushing windows, closing
    /// sockets and sending what is queued for Redis.
    pub drain_timeout_ms: u64,
    /// A connection that has not sent a whole request head by then is closed; this also
    /// bounds an idle keep-alive connection waiting for its next request.
    pub header_timeout_ms: u64,
    /// A request body (`POST /api/publish`) must arrive whole within this time.
    pub body_timeout_ms: u64,
    /// A socket that sent nothing for this long gets a ping (its pong counts as
    /// hearing from it); 0 = no pings.
    pub ping_interval_ms: u64,
    /// A socket that sent nothing at all (not even a pong) for this long is closed 1001
    /// `idle timeout`: a peer that vanished without a FIN is found and removed; 0 = never.
    pub idle_timeout_ms: u64,
    /// Origins (`https://app.example.com`, `https://*.example.com`) whose pages may open
    /// a WebSocket; an upgrade with another `Origin` header is refused 403. Empty = any.
    /// (Clients that are not browsers send no Origin and are not affected.)
    pub allowed_origins: Vec<String>,
    /// Log filter (`info`, `debug`, `volley=trace,...`); `RUST_LOG` wins when set.
    pub log: String,
    /// Experimental: a tick's socket writes go through io_uring, one submission for up
    /// to 256 sockets instead of a `writev` each (plain TCP only; Linux).
    pub io_uring: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Messages for one socket inside this window leave as one frame; 0 sends each at once.
    pub delivery_window_ms: u64,
    /// A socket idle for a whole window sends its next message at once.
    pub leading_edge: bool,
    /// Most messages in one `batch` frame; more are split into further frames.
    pub max_batch_messages: usize,
    /// Most payload bytes in one `batch` frame (a single larger message still goes alone).
    pub max_batch_bytes: usize,
    /// Publishes to the broker within this window leave in one pipeline; 0 sends as soon
    /// as the previous pipeline returns.
    pub publish_window_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// WebSocket connections this node accepts; more are refused with HTTP 503.
    pub max_connections: usize,
    /// Largest inbound message (all fragments together); larger closes with 1009.
    pub max_frame_bytes: usize,
    /// Rooms one socket may be in at once.
    pub max_rooms_per_socket: usize,
    /// Bytes queued for one socket before it is closed as a slow consumer (1008).
    pub max_outbox_bytes: usize,
    /// Publishes (`message`, `broadcast`) one socket may make per second; 0 = no limit.
    pub publish_rate: u32,
    /// Publishes a socket may make in a burst above the steady rate.
    pub publish_burst: u32,
    /// Who may publish from a socket: `any`, `authenticated`, `none`.
    pub client_publish: ClientPublish,
    /// Publishes per second for a trusted socket (a token with a `publish` claim, or the
    /// API key on its upgrade); 0 = unlimited.
    pub trusted_publish_rate: u32,
    /// Whether a client's `broadcast` frame is accepted. Off by default: a broadcast goes
    /// as-is to every socket on every node, so any browser could forge frames for all.
    pub client_broadcast: bool,
    /// Joins one socket may make per second; 0 = no limit.
    pub join_rate: u32,
    /// Joins a socket may make at once above the steady rate (a page joining its rooms).
    pub join_burst: u32,
    /// `get_online_users` one socket may ask per second; 0 = no limit. Each answer is a
    /// listing of up to `presence.max_list` users, so this bounds what one socket costs.
    pub presence_rate: u32,
    /// `get_online_users` a socket may ask at once above the steady rate.
    pub presence_burst: u32,
    /// Whether rooms get `user_joined` / `user_left` notices.
    pub notices: bool,
    /// No notices in a room with more local members than this: each notice goes to every
    /// member, so a big audience joining would cost members squared.
    pub notices_max_members: usize,
    /// Deepest nesting of arrays and objects accepted in `content` or `payload`.
    pub max_json_depth: usize,
    /// WebSockets one client IP address may hold on this node; more are refused with
    /// HTTP 429. 0 = no limit. Behind a load balancer every client has its address, so
    /// set it only where nodes see clients' own addresses.
    pub max_connections_per_ip: usize,
}

/// How envelopes are shaped on Redis channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvelopeMode {
    /// One `PUBLISH` per room per window: `{"serverId":S,"batch":[P1,...]}`.
    Batch,
    /// One `PUBLISH` per message: `{"serverId":S,"payload":P}`, as the Node.js servers do.
    Single,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]`, or `rediss://` for TLS; empty keeps the node
    /// on the memory broker.
    pub url: String,
    pub envelope: EnvelopeMode,
    /// Prefix on every channel and key volley uses.
    pub key_prefix: String,
    /// Most commands in one pipeline; a larger window is sent as several.
    pub max_pipeline: usize,
    /// Messages kept while Redis is unreachable; beyond this they are dropped and counted.
    pub outage_buffer: usize,
    /// How often the node checks its pub/sub connection with a probe to itself.
    pub probe_interval_ms: u64,
    /// After an outage, how long publishes held meanwhile may wait, from the moment Redis
    /// answers again, for the other nodes to be subscribed again before they are sent.
    pub recovery_wait_ms: u64,
    /// Most messages in one envelope, sent or received; bigger received ones are dropped.
    pub max_envelope_messages: usize,
    /// Independent Redis servers to spread rooms over (instead of `redis.url`): each
    /// room lives on one shard, chosen by rendezvous hashing of its id.
    pub shards: Vec<String>,
    /// Some nodes of a Redis Cluster (`redis://host:port`, or `rediss://` for TLS; the
    /// first one's credentials and scheme apply to all): rooms use sharded pub/sub on the
    /// master that owns their slot.
    pub cluster_nodes: Vec<String>,
    /// Sentinels (`host:port`, `redis://host:port`, or `rediss://host:port`: TLS to the
    /// sentinels and the masters they name) that name the master of `redis.master_name`
    /// (instead of `redis.url`); the node follows every failover.
    pub sentinels: Vec<String>,
    pub master_name: String,
    /// Password of the master and replicas, when Sentinel names them.
    pub master_password: String,
    /// Password of the sentinels themselves.
    pub sentinel_password: String,
    /// For `rediss://` URLs: the PEM file of the CA that signed the servers'
    /// certificates; empty trusts the system's roots.
    pub tls_ca_file: String,
    /// For `rediss://` URLs to servers that ask for a client certificate: its PEM file
    /// and its key's, both or neither.
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

/// permessage-deflate (RFC 7692) for sockets whose client offers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressionConfig {
    /// Accept a client's permessage-deflate offer. Off by default: it costs CPU per
    /// frame (compressed once per frame, shared by every compressing socket).
    pub enabled: bool,
    /// Frames whose JSON is shorter go out uncompressed (not worth a deflate header).
    pub min_bytes: usize,
    /// zlib level, 1 (fastest) to 9 (smallest).
    pub level: u32,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            enabled: false,
            min_bytes: 256,
            level: 1,
        }
    }
}

/// `wss://` and `https://` on the same listener: both set = TLS on, both empty = off.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first.
    pub cert: String,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Seconds between this node's cluster reports (`metrics:<serverId>` in Redis, TTL
    /// 300 s), which `/api/cluster` and `/dashboard` read.
    pub report_s: u64,
    /// Reports each node keeps as its history for the dashboard's charts.
    pub history: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DemoConfig {
    /// Run the built-in feed (`--demo`): matches on the board `scores`, symbols on the
    /// board `ticker`.
    pub enabled: bool,
    /// Simulated matches.
    pub matches: usize,
    /// Simulated ticker symbols.
    pub symbols: usize,
    /// Average ticker updates per second over all symbols; they come in bursts.
    pub ticker_rate: u32,
    /// How many times faster than real time the match clocks run (60: a minute a second).
    pub clock_speed: u32,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            report_s: 5,
            history: 120,
        }
    }
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            enabled: false,
            matches: 6,
            symbols: 24,
            ticker_rate: 40,
            clock_speed: 60,
        }
    }
}

/// Who is online: the reference servers' `presence:<userId>` hashes, kept fresh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// A user's presence expires this long after the last refresh (a node that died).
    pub ttl_s: u64,
    /// How often a node refreshes its users' presence (one pipeline for all of them).
    pub refresh_s: u64,
    /// Most users one `get_online_users` (and `GET /api/presence`) lists; `truncated`
    /// says there are more. The node reads that listing at most once a second and shares
    /// it with every asker. `max_users`, its earlier name, still works.
    #[serde(alias = "max_users")]
    pub max_list: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            ttl_s: 60,
            refresh_s: 25,
            max_list: 1000,
        }
    }
}

/// Who may publish from a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientPublish {
    /// Every socket (the reference servers' behaviour).
    Any,
    /// Only sockets with an identity (`auth`).
    Authenticated,
    /// No socket: publishing is for backends, through the HTTP API.
    None,
}

/// Identity: JWTs checked with a secret or a public key; without either, the reference
/// servers' `{"type":"auth","userId":U}`, which trusts the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 secret.
    pub jwt_secret: String,
    /// PEM file with an RSA (RS256) or EC P-256 (ES256) public key.
    pub jwt_public_key: String,
    /// Every frame but `auth` is refused (`unauthenticated`) until the socket has an identity.
    pub required: bool,
    /// After its token expires, how long a socket has to send a fresh one before it is closed.
    pub expiry_grace_s: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret: String::new(),
            jwt_public_key: String::new(),
            required: false,
            expiry_grace_s: 30,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Key for `POST /api/publish` (`Authorization: apikey KEY`); empty disables the API.
    pub key: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: String::new(),
            envelope: EnvelopeMode::Batch,
            key_prefix: String::new(),
            max_pipeline: 1000,
            outage_buffer: 10_000,
            probe_interval_ms: 1000,
            recovery_wait_ms: 10_000,
            max_envelope_messages: 1000,
            shards: Vec::new(),
            cluster_nodes: Vec::new(),
            sentinels: Vec::new(),
            master_name: String::new(),
            master_password: String::new(),
            sentinel_password: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            // Random, not the reference servers' `server-<pid>`: in containers every pid is 1, and
            // two nodes with one id drop each other's messages as their own echo.
            node_id: format!("volley-{:08x}", fastrand::u32(..)),
            drain_timeout_ms: 5_000,
            header_timeout_ms: 10_000,
            body_timeout_ms: 10_000,
            ping_interval_ms: 25_000,
            idle_timeout_ms: 60_000,
            allowed_origins: Vec::new(),
            log: "info".into(),
            io_uring: false,
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            delivery_window_ms: 50,
            leading_edge: true,
            max_batch_messages: 256,
            max_batch_bytes: 256 * 1024,
            publish_window_ms: 50,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 100_000,
            max_frame_bytes: 64 * 1024,
            max_rooms_per_socket: 200,
            max_outbox_bytes: 4 * 1024 * 1024,
            publish_rate: 100,
            publish_burst: 200,
            client_publish: ClientPublish::Any,
            trusted_publish_rate: 0,
            client_broadcast: false,
            join_rate: 20,
            join_burst: 200,
            presence_rate: 5,
            presence_burst: 10,
            notices: true,
            notices_max_members: 1000,
            max_json_depth: 32,
            max_connections_per_ip: 0,
        }
    }
}

/// What can go wrong while reading the configuration. Every message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("{0}")]
    Source(#[from] Box<figment::Error>),
    #[error("environment variable {name}={value:?} is not a port number")]
    BadPort { name: &'static str, value: String },
    #[error("--set {0:?}: expected KEY=VALUE, e.g. --set batch.delivery_window_ms=10")]
    BadSet(String),
    #[error("invalid value for {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("invalid [[rooms]] entry {index} (counting from 0): {reason}")]
    Room { index: usize, reason: String },
    #[error("{given_by} sets {key}, which is not a config key; did you mean {nearest}?")]
    UnknownKey {
        given_by: String,
        key: String,
        nearest: String,
    },
}

impl Config {
    /// In `--demo` mode the demo's rooms are boards (state rooms: the page opens them
    /// from a snapshot), `scores` keyed by `match` and `ticker` by `symbol` with Fossil
    /// deltas, unless a class already covers them.
    pub fn add_demo_rooms(&mut self) {
        let Ok(classes) = RoomClasses::compile(&self.rooms, &self.batch) else {
            return; // validate() names the bad entry
        };
        for (room, key) in [("scores", "match"), ("ticker", "symbol")] {
            if classes.class_of(room).is_none() {
                self.rooms.push(RoomClass {
                    pattern: room.into(),
                    state_key: Some(key.into()),
                    state_max_keys: rooms::DEFAULT_STATE_MAX_KEYS.max(self.demo.symbols),
                    delta: Some(DELTA_FOSSIL.into()),
                    ..RoomClass::default()
                });
            }
        }
    }

    /// The effective configuration as TOML, for `--print-config`.
    pub fn to_toml(&self) -> String {
        // Every field is a plain scalar, so serialization cannot fail.
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }

    pub fn delivery_window(&self) -> Duration {
        Duration::from_millis(self.batch.delivery_window_ms)
    }

    pub fn publish_window(&self) -> Duration {
        Duration::from_millis(self.batch.publish_window_ms)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.server.drain_timeout_ms)
    }
}
