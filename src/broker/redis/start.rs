//! Starting an engine: the options that say what it is for, and its tasks.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionInfo, IntoConnectionInfo, ProtocolVersion};
use tokio_util::sync::CancellationToken;

use super::core::{Core, Subscriptions};
use super::{presence, publisher, subscriber, PublishPaces, PublishQueue, RedisBroker};
use super::{HandBack, Keys};
use crate::config::{Config, RoomClasses};

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum RedisStartError {
    #[error("redis.url is not a usable Redis URL: {0}")]
    BadUrl(redis::RedisError),
    #[error("cannot read the Redis TLS files: {0}")]
    Tls(String),
}

/// What an engine is for: which server, under which names, and for which owner.
pub struct EngineOptions {
    pub info: ConnectionInfo,
    pub keys: Keys,
    /// Sharded pub/sub (`SPUBLISH` / `SSUBSCRIBE`): one master of a Redis Cluster. It
    /// subscribes the node-wide channels only after `set_home(true)`.
    pub spublish: bool,
    /// Where publishes go that this engine's Redis refused or that it still holds at
    /// shutdown: the set that owns it routes them again. Without one they are held
    /// here, and dropped and counted at shutdown.
    pub hand_back: Option<Arc<HandBack>>,
    /// Sends nothing until `open_gate`: it takes over from an engine that hands over
    /// what it held first.
    pub gated: bool,
    /// Starts with the node (not taking over from a live engine): first announces what
    /// a previous life of this node id left behind (see `presence`).
    pub previous_life: bool,
    /// The node's room classes, compiled once and shared by its delivery and every
    /// engine's publish queue; `None` compiles them from the config (an engine built
    /// alone, as the benches build one).
    pub classes: Option<Arc<RoomClasses>>,
}

impl EngineOptions {
    /// An engine alone on the Redis at `url` (`redis.url`, or one of `redis.shards`).
    pub fn standalone(config: &Config, url: &str) -> Result<EngineOptions, RedisStartError> {
        Ok(EngineOptions {
            info: url
                .into_connection_info()
                .map_err(RedisStartError::BadUrl)?,
            keys: Keys::new(&config.redis.key_prefix, &config.server.node_id),
            spublish: false,
            hand_back: None,
            gated: false,
            previous_life: true,
            classes: None,
        })
    }
}

impl RedisBroker {
    /// Starts the engine's tasks; connections are made (and remade) in the background,
    /// so a node starts even while Redis is down and reports it through `/readyz`.
    pub fn start_with(
        config: &Config,
        options: EngineOptions,
    ) -> Result<Arc<RedisBroker>, RedisStartError> {
        let EngineOptions {
            info,
            keys,
            spublish,
            hand_back,
            gated,
            previous_life,
            classes,
        } = options;
        let classes = classes.unwrap_or_else(|| Arc::new(RoomClasses::compiled(config)));
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let certs = super::tls::certificates(&config.redis).map_err(RedisStartError::Tls)?;
        let pubsub_client =
            super::tls::client(info.clone().set_redis_settings(resp3), certs.as_ref())
                .map_err(RedisStartError::BadUrl)?;
        let client = super::tls::client(info, certs.as_ref()).map_err(RedisStartError::BadUrl)?;

        let core = Arc::new(Core::new(config, keys, spublish, hand_back, gated));
        let queue = Arc::new(PublishQueue::new(
            config.redis.outage_buffer,
            PublishPaces::new(classes),
        ));
        let subscriptions = Arc::new(Subscriptions {
            rooms: Mutex::new(Default::default()),
            changed: tokio::sync::Notify::new(),
        });
        let stop = CancellationToken::new();
        // No retries inside a publish: a pipeline that meets a broken connection must
        // fail, so the batcher keeps it and holds it until the subscribers are back,
        // instead of the manager sending it to a restarted Redis that nobody has
        // subscribed to yet. The manager still reconnects in the background.
        let publisher_conn = ConnectionManager::new_lazy_with_config(
            client,
            manager_config().set_number_of_retries(0),
        )
        .map_err(RedisStartError::BadUrl)?;
        let _ = core.reader.set(publisher_conn.clone());
        let publisher = tokio::spawn(publisher::run(publisher::Publisher::new(
            core.clone(),
            queue.clone(),
            publisher_conn.clone(),
            config,
            stop.clone(),
        )));
        let (presence_tx, presence_rx) = tokio::sync::mpsc::unbounded_channel();
        let presence = tokio::spawn(presence::run(
            core.clone(),
            publisher_conn.clone(),
            presence_rx,
            config.presence.clone(),
            previous_life,
            stop.clone(),
        ));
        let subscriber = tokio::spawn(subscriber::run(
            core.clone(),
            subscriptions.clone(),
            pubsub_client,
            publisher_conn,
            Duration::from_millis(config.redis.probe_interval_ms),
            stop.clone(),
        ));
        Ok(Arc::new(RedisBroker {
            core,
            presence: presence_tx,
            queue,
            subscriptions,
            stop,
            tasks: Mutex::new(vec![publisher, subscriber, presence]),
        }))
    }
}

/// A script with its `PUBLISH` calls made `SPUBLISH`, for a Redis Cluster.
pub(super) fn spublish_script(script: &str) -> String {
    script.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")
}

/// The one recipe for volley's Redis connections (the engine's, the cluster
/// reporter's): reconnect quickly and give up on a single attempt fast, since volley
/// retries on its own schedule and keeps serving local sockets meanwhile.
pub(crate) fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1))
}

/// Reconnect backoff of the engine's tasks: doubling from 100 ms to 2 s.
pub(super) struct Backoff {
    min: Duration,
    max: Duration,
}

pub(super) const BACKOFF: Backoff = Backoff {
    min: Duration::from_millis(100),
    max: Duration::from_secs(2),
};

impl Backoff {
    pub(super) fn start(&self) -> Duration {
        self.min
    }

    pub(super) fn next(&self, last: Duration) -> Duration {
        (last * 2).min(self.max)
    }
}
