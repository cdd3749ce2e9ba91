//! The subscriber: keeps Redis subscribed to exactly the channels the node needs, proves
//! the subscription still delivers, and keeps the list of live nodes.
//!
//! Subscription changes from joins and leaves only touch a set; this task diffs the set
//! against what Redis has and sends one `SUBSCRIBE` and one `UNSUBSCRIBE` with all the
//! channels that changed. On a new connection (and after a disconnection, which drops
//! every subscription) it subscribes everything again itself, rooms first and the node's
//! probe channel last: another node that sees this node's probe channel subscribed knows
//! all its rooms are (that is how held publishes know when to go, see `publisher`).
//!
//! Each probe interval it publishes a numbered probe to the node's own channel, and in
//! the same round trip registers the node in the live-node set and reads the others.
//! The node is ready only when a probe sent after the last full subscription came back.
//! A probe that reaches no subscriber means Redis lost the subscription (a restart):
//! everything is subscribed again at once. Two probes in a row that do not come back mean
//! the connection is deaf, and it is replaced; in a round whose tick came more than half
//! an interval late (the node starved of CPU, its probe perhaps unread in its own socket)
//! a probe not back yet is not counted missing. A probe carrying another instance's token
//! means another live node uses this node's id.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Client, PushInfo, PushKind, Value};
use tokio_util::sync::CancellationToken;

use super::core::{Core, Subscriptions};
use super::start::{manager_config, BACKOFF};
use crate::protocol::now_ms;

/// Probes in a row that may go missing before the connection is replaced.
const MISSES_BEFORE_RESTART: u32 = 2;

pub(super) async fn run(
    core: Arc<Core>,
    subscriptions: Arc<Subscriptions>,
    client: Client,
    mut probe_conn: ConnectionManager,
    probe_interval: Duration,
    stop: CancellationToken,
) {
    let mut conn: Option<ConnectionManager> = None;
    let mut current: HashSet<String> = HashSet::new();
    let mut backoff = BACKOFF.start();
    let mut ticker = tokio::time::interval(probe_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probes = Probes {
        sent: 0,
        judged: 0,
        misses: 0,
        subscribed_after: 0,
        alive_for_ms: 3 * probe_interval.as_millis() as u64 + 1000,
    };
    let mut ever_connected = false;
    loop {
        if core.resubscribe.swap(false, Relaxed) {
            current.clear();
        }
        // Before: reads that wait for a subscription must not trust a dropped one.
        if current.is_empty() || conn.is_none() {
            core.subscribed.lock().clear();
        }
        let fresh = current.is_empty() || conn.is_none();
        if let Err(e) = reconcile(&core, &subscriptions, &client, &mut conn, &mut current).await {
            if core.subscriber_ok.swap(false, Relaxed) {
                tracing::warn!(error = %super::tls::explain(&e), "Redis subscriber unavailable; retrying");
            } else if !ever_connected {
                ever_connected = true;
                tracing::warn!(
                    error = %super::tls::explain(&e),
                    redis = %client.get_connection_info().addr(),
                    "cannot reach Redis; serving local sockets only, /readyz answers 503 until it answers"
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = BACKOFF.next(backoff);
            continue;
        }
        ever_connected = true;
        if fresh {
            probes.subscribed_after = probes.sent;
        }
        if *core.subscribed.lock() != current {
            *core.subscribed.lock() = current.clone();
            core.subscribed_changed.notify_waiters();
        }
        backoff = BACKOFF.start();
        tokio::select! {
            _ = subscriptions.changed.notified() => {}
            _ = stop.cancelled() => return,
            due = ticker.tick() => {
                // A tick this late means the node itself ran late (starved of CPU):
                // a probe not back yet may be waiting unread in its own socket, so it
                // is not counted missing this round (one that came back still counts).
                let starved = due.elapsed() > probe_interval / 2;
                if probes.judge(&core, starved) {
                    replace_deaf(&core, &mut conn, &current, probe_interval).await;
                    continue;
                }
                probes.send(&core, &mut probe_conn).await;
            }
        }
    }
}

/// The probes: numbered, one published every interval, each judged once an interval
/// after it was sent.
struct Probes {
    sent: u64,
    judged: u64,
    misses: u32,
    /// The last probe number sent before everything was subscribed anew: only later
    /// probes prove the subscription.
    subscribed_after: u64,
    /// A live node is listed until this long after its last probe.
    alive_for_ms: u64,
}

impl Probes {
    /// Judges the last probe sent (once; a miss is not judged while `starved`). While
    /// Redis is unreachable no probe is published, so nothing is judged. True when so
    /// many were missed in a row that the pub/sub connection must be replaced.
    fn judge(&mut self, core: &Core, starved: bool) -> bool {
        if self.sent > self.judged {
            let seen = core.probe_seen.load(Relaxed) >= self.sent;
            if !seen && starved {
                // Inconclusive: the node ran late, the probe may wait unread here.
                return false;
            }
            self.judged = self.sent;
            if seen {
                self.misses = 0;
                if self.sent > self.subscribed_after && !core.subscriber_ok.swap(true, Relaxed) {
                    tracing::info!("Redis subscriber delivering");
                }
            } else {
                self.misses += 1;
                if core.subscriber_ok.swap(false, Relaxed) {
                    tracing::warn!("a Redis probe did not come back; not ready until one does");
                }
            }
        }
        if self.misses >= MISSES_BEFORE_RESTART {
            tracing::warn!(
                misses = self.misses,
                "Redis subscriber stopped delivering probes; reconnecting it"
            );
            self.misses = 0;
            return true;
        }
        false
    }

    /// Publishes the next probe; learns from it whether Redis still knows this node's
    /// subscriptions, and which other nodes are alive.
    async fn send(&mut self, core: &Arc<Core>, probe_conn: &mut ConnectionManager) {
        let n = self.sent + 1;
        match probe(core, probe_conn, n, self.alive_for_ms).await {
            Ok((receivers, alive)) => {
                self.sent = n;
                if receivers == 0 {
                    // Redis does not know this node's subscription: it restarted, or the
                    // connection was cut. Subscribe everything again now.
                    if core.subscriber_ok.swap(false, Relaxed) {
                        tracing::warn!("Redis lost this node's subscriptions; subscribing again");
                    }
                    core.resubscribe.store(true, Relaxed);
                }
                let peers: Vec<String> = alive
                    .into_iter()
                    .filter(|id| *id != *core.node_id)
                    .collect();
                *core.peers.lock() = peers;
                check_positions(core, probe_conn).await;
                // After the subscription check above, so a restarted Redis never reads as
                // ready for a moment.
                if !core.publisher_ok.swap(true, Relaxed) {
                    core.counters.reconnects.fetch_add(1, Relaxed);
                    tracing::info!("Redis reachable");
                }
            }
            Err(e) => {
                // Nothing is heard from an unreachable Redis either: ready again only
                // after a probe comes back.
                core.subscriber_ok.store(false, Relaxed);
                if core.publisher_ok.swap(false, Relaxed) {
                    tracing::warn!(error = %e, "Redis unreachable");
                }
            }
        }
    }
}

/// Drops a pub/sub connection that stopped delivering; the next round makes a new one.
async fn replace_deaf(
    core: &Core,
    conn: &mut Option<ConnectionManager>,
    current: &HashSet<String>,
    probe_interval: Duration,
) {
    core.subscriber_ok.store(false, Relaxed);
    core.counters.subscriber_restarts.fetch_add(1, Relaxed);
    core.generation.fetch_add(1, Relaxed);
    if let Some(mut old) = conn.take() {
        // Best effort: a deaf connection should not stay subscribed.
        let channels: Vec<String> = current.iter().cloned().collect();
        let _ = tokio::time::timeout(probe_interval, old.unsubscribe(&channels)).await;
    }
}

/// Compares each durable room's stream offset with what was delivered here, and repairs
/// a room that is behind: a message lost without a later one to show the gap (a pub/sub
/// connection that dropped, or went deaf for a while).
async fn check_positions(core: &Arc<Core>, conn: &mut ConnectionManager) {
    let rooms = core.positions.snapshot();
    if rooms.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    for (room, _, _) in &rooms {
        pipe.cmd("HMGET")
            .arg(core.keys.position(room))
            .arg("offset")
            .arg("epoch");
    }
    let Ok(tops) = pipe
        .query_async::<Vec<(Option<u64>, Option<String>)>>(conn)
        .await
    else {
        return;
    };
    for ((room, epoch, last), top) in rooms.into_iter().zip(tops) {
        if let (Some(top), Some(top_epoch)) = top {
            core.positions
                .behind(core, &room, (epoch, last), (Arc::from(top_epoch), top));
        }
    }
}

/// Publishes probe `n` and, in the same round trip, lists this node as alive and reads
/// the other live nodes. Returns the probe's receivers and the live node ids.
async fn probe(
    core: &Core,
    conn: &mut ConnectionManager,
    n: u64,
    alive_for_ms: u64,
) -> redis::RedisResult<(i64, Vec<String>)> {
    let message = format!(
        r#"{{"serverId":{},"probe":{n},"instance":{}}}"#,
        serde_json::Value::from(&*core.node_id),
        core.instance
    );
    let now = now_ms();
    let alive = &core.keys.alive;
    let (receivers, live): (i64, Vec<String>) = redis::pipe()
        .cmd(core.publish_command())
        .arg(&core.keys.probe)
        .arg(message)
        .zadd(alive, &*core.node_id, now + alive_for_ms)
        .ignore()
        .zrembyscore(alive, "-inf", now)
        .ignore()
        .zrangebyscore(alive, now, "+inf")
        .query_async(conn)
        .await?;
    Ok((receivers, live))
}

/// Makes Redis' subscriptions match the wanted set, connecting first if needed. On a
/// fresh connection the probe channel is subscribed last, after every room.
async fn reconcile(
    core: &Arc<Core>,
    subscriptions: &Arc<Subscriptions>,
    client: &Client,
    conn: &mut Option<ConnectionManager>,
    current: &mut HashSet<String>,
) -> redis::RedisResult<()> {
    if conn.is_none() {
        *conn = Some(connect(core, subscriptions, client).await?);
        current.clear();
    }
    let Some(conn) = conn.as_mut() else {
        return Ok(());
    };
    for channel in std::mem::take(&mut *core.moved_channels.lock()) {
        current.remove(&channel);
    }
    let mut wanted = subscriptions.rooms.lock().clone();
    if core.home.load(Relaxed) {
        wanted.insert(core.keys.broadcast.clone());
        wanted.insert(core.keys.presence_updates.clone());
    }
    let probe = &core.keys.probe;
    let add: Vec<String> = wanted.difference(current).cloned().collect();
    let remove: Vec<String> = current
        .difference(&wanted)
        .filter(|c| *c != probe)
        .cloned()
        .collect();
    if core.spublish() {
        return reconcile_sharded(core, conn, current, add, remove).await;
    }
    if !add.is_empty() {
        conn.subscribe(&add).await?;
        current.extend(add);
    }
    if !current.contains(probe) {
        conn.subscribe(probe).await?;
        current.insert(probe.clone());
    }
    if !remove.is_empty() {
        conn.unsubscribe(&remove).await?;
        for channel in &remove {
            current.remove(channel);
        }
    }
    Ok(())
}

/// The same in a Redis Cluster: one `SSUBSCRIBE` per channel (a command's channels must
/// share a slot), all in one pipeline. A channel the master refuses (`MOVED`: its slot
/// lives elsewhere now) stays unsubscribed here and wakes the cluster engine, which
/// moves the room to the engine of its new master.
async fn reconcile_sharded(
    core: &Arc<Core>,
    conn: &mut ConnectionManager,
    current: &mut HashSet<String>,
    mut add: Vec<String>,
    remove: Vec<String>,
) -> redis::RedisResult<()> {
    let probe = &core.keys.probe;
    if !current.contains(probe) {
        // Last, as outside a cluster: the probe channel vouches for every room.
        add.push(probe.clone());
    }
    if !add.is_empty() {
        let mut pipe = redis::pipe();
        for channel in &add {
            pipe.cmd("SSUBSCRIBE").arg(channel);
        }
        let replies: Vec<redis::RedisResult<Value>> =
            pipe.ignore_errors().query_async(conn).await?;
        let mut refused = 0;
        for (channel, reply) in add.into_iter().zip(replies) {
            match reply {
                Ok(_) => {
                    current.insert(channel);
                }
                Err(e) if e.is_cluster_error() => refused += 1,
                Err(e) => return Err(e),
            }
        }
        if refused > 0 {
            tracing::debug!(refused, "sharded channels live on another master now");
            if let Some(hand_back) = &core.hand_back {
                hand_back.notify.notify_one();
            }
        }
    }
    if !remove.is_empty() {
        let mut pipe = redis::pipe();
        for channel in &remove {
            pipe.cmd("SUNSUBSCRIBE").arg(channel);
        }
        // A channel whose slot moved away is unsubscribed already; the errors say so.
        let _: Vec<redis::RedisResult<Value>> = pipe.ignore_errors().query_async(conn).await?;
        for channel in &remove {
            current.remove(channel);
        }
    }
    Ok(())
}

async fn connect(
    core: &Arc<Core>,
    subscriptions: &Arc<Subscriptions>,
    client: &Client,
) -> redis::RedisResult<ConnectionManager> {
    let generation = core.generation.load(Relaxed);
    let handler = core.clone();
    let changed = subscriptions.clone();
    // No automatic resubscription: after a disconnection this task subscribes everything
    // again itself, in the order that lets other nodes trust its probe channel.
    let config =
        manager_config().set_push_sender(move |info: PushInfo| -> Result<(), Infallible> {
            if handler.generation.load(Relaxed) == generation {
                on_push(&handler, &changed, info);
            }
            Ok(())
        });
    ConnectionManager::new_with_config(client.clone(), config).await
}

fn on_push(core: &Arc<Core>, subscriptions: &Subscriptions, info: PushInfo) {
    match info.kind {
        PushKind::Message | PushKind::SMessage => {
            if let [Value::BulkString(channel), Value::BulkString(message)] = &info.data[..] {
                core.on_message(channel, message);
            }
        }
        PushKind::SUnsubscribe => {
            // For a channel still wanted, the server's own: its slot moved to another
            // master. (For one not wanted, the answer to this task's SUNSUBSCRIBE.)
            if let Some(Value::BulkString(channel)) = info.data.first() {
                let Ok(channel) = std::str::from_utf8(channel) else {
                    return;
                };
                if subscriptions.rooms.lock().contains(channel) {
                    core.moved_channels.lock().push(channel.to_string());
                    subscriptions.changed.notify_one();
                    if let Some(hand_back) = &core.hand_back {
                        hand_back.notify.notify_one();
                    }
                }
            }
        }
        PushKind::Disconnection => {
            core.counters.subscriber_disconnects.fetch_add(1, Relaxed);
            if core.subscriber_ok.swap(false, Relaxed) {
                tracing::warn!(
                    "Redis subscriber connection lost; it reconnects and subscribes again"
                );
            }
            core.resubscribe.store(true, Relaxed);
            subscriptions.changed.notify_one();
        }
        _ => {}
    }
}
