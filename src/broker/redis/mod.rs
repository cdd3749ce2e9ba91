//! The Redis engine: nodes on many machines share rooms through Redis Pub/Sub.
//!
//! Two connections per node, each a `ConnectionManager` that reconnects by itself:
//! - `publisher`: every publish is queued; once per publish window the whole queue leaves
//!   as ONE pipeline (one `PUBLISH` per room per window in `batch` mode, one per message in
//!   `single` mode). While Redis is away, publishes wait in a bounded outage buffer.
//! - `subscriber` (RESP3, automatic resubscription): `room:<id>` channels follow the
//!   hub (subscribed while any local socket is in the room), `websocket:broadcast` and the
//!   node's probe channel always. Inbound envelopes are parsed once and fanned out.
//!
//! Pub/sub can stay connected and still stop delivering, so the node publishes a probe to
//! its own channel every `redis.probe_interval_ms` and restarts the subscriber connection
//! when the probe does not come back.

mod envelope;
mod publisher;
mod subscriber;

pub use envelope::{decode, Channels, EnvelopeWriter, Inbound};

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, IntoConnectionInfo, ProtocolVersion};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Broker, BrokerState, Envelope, EnvelopeSink, PublishError, Target};
use crate::config::Config;
use crate::metrics::Stats;
use crate::protocol::Encoded;

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum RedisStartError {
    #[error("redis.url is not usable: {0}")]
    BadUrl(redis::RedisError),
}

/// State shared by the engine's tasks and the subscriber's push handler.
struct Shared {
    node_id: Arc<str>,
    channels: Channels,
    sink: OnceLock<Weak<dyn EnvelopeSink>>,
    /// The node's figures, for pipeline sizes and publish latency.
    stats: OnceLock<Arc<Stats>>,
    publisher_ok: AtomicBool,
    subscriber_ok: AtomicBool,
    /// Highest probe number received back on the probe channel.
    probe_seen: AtomicU64,
    /// Bumped when the subscriber connection is replaced; older handlers fall silent.
    generation: AtomicU64,
    figures: Figures,
}

#[derive(Default)]
struct Figures {
    pipelines: AtomicU64,
    published_messages: AtomicU64,
    publish_commands: AtomicU64,
    dropped_publishes: AtomicU64,
    received_envelopes: AtomicU64,
    bad_envelopes: AtomicU64,
    subscriber_restarts: AtomicU64,
    publish_failures: AtomicU64,
    reconnects: AtomicU64,
}

/// The publish queue between callers and the publisher task.
struct PublishQueue {
    items: Mutex<Queued>,
    capacity: usize,
    ready: tokio::sync::Notify,
}

impl PublishQueue {
    fn push(&self, batch: &[Envelope]) -> Result<(), PublishError> {
        let mut queued = self.items.lock();
        if queued.items.len() + batch.len() > self.capacity {
            return Err(PublishError::Overloaded);
        }
        let was_empty = queued.items.is_empty();
        queued.items.extend_from_slice(batch);
        if was_empty {
            queued.since = Some(Instant::now());
        }
        drop(queued);
        if was_empty {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Takes everything queued; returns when the oldest of it was queued.
    fn take(&self, into: &mut Vec<Envelope>) -> Option<Instant> {
        let mut queued = self.items.lock();
        std::mem::swap(&mut queued.items, into);
        queued.since.take()
    }
}

#[derive(Default)]
struct Queued {
    items: Vec<Envelope>,
    /// When the oldest queued item was queued; for the publish latency histogram.
    since: Option<Instant>,
}

/// Rooms the node wants; the subscriber task makes Redis agree.
struct Subscriptions {
    rooms: Mutex<std::collections::HashSet<String>>,
    changed: tokio::sync::Notify,
}

pub struct RedisBroker {
    shared: Arc<Shared>,
    queue: Arc<PublishQueue>,
    subscriptions: Arc<Subscriptions>,
    stop: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl RedisBroker {
    /// Starts the engine's tasks; connections are made (and remade) in the background,
    /// so a node starts even while Redis is down and reports it through `/readyz`.
    pub fn start(config: &Config) -> Result<Arc<RedisBroker>, RedisStartError> {
        let info = config
            .redis
            .url
            .as_str()
            .into_connection_info()
            .map_err(RedisStartError::BadUrl)?;
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let pubsub_client = Client::open(info.clone().set_redis_settings(resp3))
            .map_err(RedisStartError::BadUrl)?;
        let client = Client::open(info).map_err(RedisStartError::BadUrl)?;

        let node_id: Arc<str> = Arc::from(config.server.node_id.as_str());
        let shared = Arc::new(Shared {
            channels: Channels::new(&config.redis.key_prefix, &node_id),
            node_id,
            sink: OnceLock::new(),
            stats: OnceLock::new(),
            publisher_ok: AtomicBool::new(false),
            subscriber_ok: AtomicBool::new(false),
            probe_seen: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            figures: Figures::default(),
        });
        let queue = Arc::new(PublishQueue {
            items: Mutex::new(Queued::default()),
            capacity: config.redis.outage_buffer.max(config.redis.max_pipeline),
            ready: tokio::sync::Notify::new(),
        });
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
        let publisher = tokio::spawn(publisher::run(publisher::Publisher::new(
            shared.clone(),
            queue.clone(),
            publisher_conn.clone(),
            config,
            stop.clone(),
        )));
        let subscriber = tokio::spawn(subscriber::run(
            shared.clone(),
            subscriptions.clone(),
            pubsub_client,
            publisher_conn,
            Duration::from_millis(config.redis.probe_interval_ms),
            stop.clone(),
        ));
        Ok(Arc::new(RedisBroker {
            shared,
            queue,
            subscriptions,
            stop,
            tasks: Mutex::new(vec![publisher, subscriber]),
        }))
    }
}

/// Reconnect quickly and give up on a single attempt fast: volley retries on its own
/// schedule and keeps serving local sockets meanwhile.
fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1))
}

impl Shared {
    fn state(&self) -> BrokerState {
        if self.publisher_ok.load(Relaxed) && self.subscriber_ok.load(Relaxed) {
            BrokerState::Connected
        } else {
            BrokerState::Reconnecting
        }
    }

    /// One message from a subscribed channel.
    fn on_message(&self, channel: &[u8], message: &[u8]) {
        if channel == self.channels.probe.as_bytes() {
            if let Some(n) = probe_number(message) {
                self.probe_seen.fetch_max(n, Relaxed);
            }
            return;
        }
        let target = if channel == self.channels.broadcast.as_bytes() {
            Target::Broadcast
        } else if let Some(room) = self.channels.room_of(channel) {
            Target::Room(Arc::from(room))
        } else {
            return;
        };
        let inbound = match decode(message) {
            Ok(inbound) => inbound,
            Err(e) => {
                self.figures.bad_envelopes.fetch_add(1, Relaxed);
                tracing::warn!(channel = %String::from_utf8_lossy(channel), "dropping a message from Redis: {e}");
                return;
            }
        };
        // Our own envelopes were delivered locally when they were published.
        if inbound.server_id.as_deref() == Some(&*self.node_id) {
            return;
        }
        self.figures.received_envelopes.fetch_add(1, Relaxed);
        let Some(sink) = self.sink.get().and_then(Weak::upgrade) else {
            return;
        };
        let origin: Arc<str> = Arc::from(inbound.server_id.as_deref().unwrap_or("unknown"));
        for payload in inbound.payloads {
            sink.deliver(Envelope {
                origin: origin.clone(),
                target: target.clone(),
                payload: Encoded::from_json(payload.get().as_bytes()),
            });
        }
    }
}

fn probe_number(message: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Probe {
        probe: u64,
    }
    serde_json::from_slice::<Probe>(message)
        .ok()
        .map(|p| p.probe)
}

impl RedisBroker {
    /// Handles one message as if the subscriber connection had received it on `channel`.
    /// For benchmarks and tests of the inbound path; the node never calls it.
    #[doc(hidden)]
    pub fn inject(&self, channel: &[u8], message: &[u8]) {
        self.shared.on_message(channel, message);
    }
}

impl Broker for RedisBroker {
    fn engine(&self) -> &'static str {
        "redis"
    }

    fn attach(&self, node_id: Arc<str>, sink: Weak<dyn EnvelopeSink>, stats: Arc<Stats>) {
        debug_assert_eq!(node_id, self.shared.node_id);
        let _ = self.shared.sink.set(sink);
        let _ = self.shared.stats.set(stats);
    }

    fn publish(&self, batch: &[Envelope]) -> Result<(), PublishError> {
        self.queue.push(batch)
    }

    fn subscribe(&self, room: &Arc<str>) {
        let channel = self.shared.channels.room(room);
        if self.subscriptions.rooms.lock().insert(channel) {
            self.subscriptions.changed.notify_one();
        }
    }

    fn unsubscribe(&self, room: &str) {
        let channel = self.shared.channels.room(room);
        if self.subscriptions.rooms.lock().remove(&channel) {
            self.subscriptions.changed.notify_one();
        }
    }

    fn state(&self) -> BrokerState {
        self.shared.state()
    }

    fn figures(&self) -> Vec<(&'static str, u64)> {
        let f = &self.shared.figures;
        vec![
            ("redis_pipelines", f.pipelines.load(Relaxed)),
            ("redis_publish_commands", f.publish_commands.load(Relaxed)),
            (
                "redis_published_messages",
                f.published_messages.load(Relaxed),
            ),
            ("redis_publish_failures", f.publish_failures.load(Relaxed)),
            ("redis_reconnects", f.reconnects.load(Relaxed)),
            ("redis_dropped_publishes", f.dropped_publishes.load(Relaxed)),
            (
                "redis_received_envelopes",
                f.received_envelopes.load(Relaxed),
            ),
            ("redis_bad_envelopes", f.bad_envelopes.load(Relaxed)),
            (
                "redis_subscriber_restarts",
                f.subscriber_restarts.load(Relaxed),
            ),
        ]
    }

    fn shutdown(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            self.stop.cancel();
            let tasks = std::mem::take(&mut *self.tasks.lock());
            for task in tasks {
                let _ = task.await;
            }
        })
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
