//! The subscriber: keeps Redis subscribed to exactly the channels the node needs, and
//! proves the subscription still delivers.
//!
//! Subscription changes from joins and leaves only touch a set; this task diffs the set
//! against what Redis has and sends one `SUBSCRIBE` and one `UNSUBSCRIBE` with all the
//! channels that changed. Each probe interval it publishes a numbered probe to the node's
//! own channel; two probes in a row that do not come back mean the connection is deaf,
//! and it is replaced (the new one subscribes everything again).

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Client, PushInfo, PushKind, Value};
use tokio_util::sync::CancellationToken;

use super::{manager_config, Shared, Subscriptions};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Probes in a row that may go missing before the connection is replaced.
const MISSES_BEFORE_RESTART: u32 = 2;

pub(super) async fn run(
    shared: Arc<Shared>,
    subscriptions: Arc<Subscriptions>,
    client: Client,
    mut probe_conn: ConnectionManager,
    probe_interval: Duration,
    stop: CancellationToken,
) {
    let mut conn: Option<ConnectionManager> = None;
    let mut current: HashSet<String> = HashSet::new();
    let mut backoff = MIN_BACKOFF;
    let mut ticker = tokio::time::interval(probe_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe_sent = 0u64;
    let mut judged = 0u64;
    let mut misses = 0u32;
    loop {
        if let Err(e) = reconcile(&shared, &subscriptions, &client, &mut conn, &mut current).await {
            if shared.subscriber_ok.swap(false, Relaxed) {
                tracing::warn!(error = %e, "Redis subscriber unavailable; retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        }
        backoff = MIN_BACKOFF;
        tokio::select! {
            _ = subscriptions.changed.notified() => {}
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {
                // Judge each published probe once, an interval after it was sent. While
                // Redis is unreachable no probe is published, so nothing is judged: the
                // connection manager's own reconnect and resubscription handle outages.
                if probe_sent > judged {
                    judged = probe_sent;
                    if shared.probe_seen.load(Relaxed) < probe_sent {
                        misses += 1;
                    } else {
                        misses = 0;
                        if !shared.subscriber_ok.swap(true, Relaxed) {
                            tracing::info!("Redis subscriber delivering again");
                        }
                    }
                }
                if misses >= MISSES_BEFORE_RESTART {
                    tracing::warn!(misses, "Redis subscriber stopped delivering probes; reconnecting it");
                    shared.subscriber_ok.store(false, Relaxed);
                    shared.figures.subscriber_restarts.fetch_add(1, Relaxed);
                    shared.generation.fetch_add(1, Relaxed);
                    if let Some(mut old) = conn.take() {
                        // Best effort: a deaf connection should not stay subscribed.
                        let channels: Vec<String> = current.iter().cloned().collect();
                        let _ = tokio::time::timeout(probe_interval, old.unsubscribe(&channels)).await;
                    }
                    misses = 0;
                    continue;
                }
                let n = probe_sent + 1;
                let probe = format!(r#"{{"serverId":{},"probe":{n}}}"#, serde_json::Value::from(&*shared.node_id));
                let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                    .arg(&shared.channels.probe)
                    .arg(probe)
                    .query_async(&mut probe_conn)
                    .await;
                // A probe that could not be published says nothing about the subscriber,
                // but it does say whether Redis can be reached for publishing.
                match sent {
                    Ok(_) => {
                        probe_sent = n;
                        if !shared.publisher_ok.swap(true, Relaxed) {
                            shared.figures.reconnects.fetch_add(1, Relaxed);
                            tracing::info!("Redis reachable");
                        }
                    }
                    Err(e) => {
                        if shared.publisher_ok.swap(false, Relaxed) {
                            tracing::warn!(error = %e, "Redis unreachable");
                        }
                    }
                }
            }
        }
    }
}

/// Makes Redis' subscriptions match the wanted set, connecting first if needed.
async fn reconcile(
    shared: &Arc<Shared>,
    subscriptions: &Subscriptions,
    client: &Client,
    conn: &mut Option<ConnectionManager>,
    current: &mut HashSet<String>,
) -> redis::RedisResult<()> {
    if conn.is_none() {
        *conn = Some(connect(shared, client).await?);
        current.clear();
    }
    let Some(conn) = conn.as_mut() else {
        return Ok(());
    };
    let mut wanted = subscriptions.rooms.lock().clone();
    wanted.insert(shared.channels.broadcast.clone());
    wanted.insert(shared.channels.probe.clone());
    let add: Vec<String> = wanted.difference(current).cloned().collect();
    let remove: Vec<String> = current.difference(&wanted).cloned().collect();
    if !add.is_empty() {
        conn.subscribe(&add).await?;
        current.extend(add);
    }
    if !remove.is_empty() {
        conn.unsubscribe(&remove).await?;
        for channel in &remove {
            current.remove(channel);
        }
    }
    Ok(())
}

async fn connect(shared: &Arc<Shared>, client: &Client) -> redis::RedisResult<ConnectionManager> {
    let generation = shared.generation.load(Relaxed);
    let handler = shared.clone();
    let config = manager_config()
        .set_push_sender(move |info: PushInfo| -> Result<(), Infallible> {
            if handler.generation.load(Relaxed) == generation {
                on_push(&handler, info);
            }
            Ok(())
        })
        .set_automatic_resubscription();
    ConnectionManager::new_with_config(client.clone(), config).await
}

fn on_push(shared: &Shared, info: PushInfo) {
    match info.kind {
        PushKind::Message => {
            if let [Value::BulkString(channel), Value::BulkString(message)] = &info.data[..] {
                shared.on_message(channel, message);
            }
        }
        PushKind::Disconnection if shared.subscriber_ok.swap(false, Relaxed) => {
            tracing::warn!("Redis subscriber connection lost; it reconnects and resubscribes");
        }
        _ => {}
    }
}
