//! Presence on Redis: who is online on any node, without ghosts and without `KEYS`.
//!
//! A user's presence is the reference servers' hash `presence:<userId>` (`serverId`,
//! `connectedAt`, `lastSeen`), plus a sorted set of the nodes the user has sockets on
//! (`presence:<userId>:nodes`, scored by when each entry expires), one index of online
//! users (`presence:online`, scored likewise) and one hash of their listing entries
//! (`volley:presence:info`: user -> `{"serverId","connectedAt"}`), so listing is two
//! commands whatever the number of users. A user's first node announces `connected` on
//! `presence:updates`, the last one to leave `disconnected`, each in one script.
//!
//! Every `presence.refresh_s` a node refreshes all its users in one pipeline, and its own
//! liveness (`volley:presence:nodes`, scored by when it expires) and its record
//! (`volley:presence:node:<serverId>`: user -> the rooms its sockets are in here, as the
//! node's hub knows them; written again whenever they change). A
//! node that dies stops refreshing: once its liveness expired, the first surviving node
//! to look claims it (one script: exactly one node does, cluster-wide), takes each of its
//! users off it as a live node would (`disconnected` when no other node has them), and
//! announces `user_left` in each room it had them in. A node shutting down says goodbye
//! for its users itself. A node that finds itself claimed while alive (Redis was out of
//! its reach for longer than `presence.ttl_s`) announces its users again.
//!
//! | file | job |
//! | --- | --- |
//! | `mod.rs` | the presence task: changes in order, refresh, reaping, goodbye |
//! | `scripts.rs` | the Lua that makes each change one atomic step |
//! | `listing.rs` | who is online, and one user's presence: reads only |

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Core;
use crate::broker::PresenceEvent;
use crate::config::PresenceConfig;
use crate::protocol::now_ms;

mod listing;
mod scripts;

pub(super) use listing::{online_users, presence_of};
use scripts::{OFFLINE, OFFLINE_SPUBLISH, ONLINE, ONLINE_SPUBLISH, REAP, REAP_SPUBLISH};

/// Most dead nodes one reaping call claims (the rest wait for the next refresh).
const REAP_BATCH: usize = 16;

/// A change in who is online on this node, in the order it happened.
pub(super) enum Change {
    Online(Arc<str>),
    Offline(Arc<str>),
    /// The rooms the user's sockets here are in changed (the node knows which).
    Rooms(Arc<str>),
}

/// This node's users, as this task has written them.
#[derive(Default)]
struct Here {
    users: HashSet<Arc<str>>,
    /// Users whose record (their rooms) must be written again.
    dirty: HashSet<Arc<str>>,
}

/// What one batch of changes sends to Redis.
#[derive(Default)]
struct Writes {
    /// Online (true) and offline (false) scripts, in order.
    scripts: Vec<(Arc<str>, bool)>,
}

impl Here {
    fn apply(&mut self, change: Change, writes: &mut Writes) {
        match change {
            Change::Online(user) => {
                self.users.insert(user.clone());
                self.dirty.insert(user.clone());
                writes.scripts.push((user, true));
            }
            Change::Offline(user) => {
                self.users.remove(&user);
                self.dirty.remove(&user);
                writes.scripts.push((user, false));
            }
            Change::Rooms(user) => {
                if self.users.contains(&user) {
                    self.dirty.insert(user);
                }
            }
        }
    }
}

/// A user's rooms on this node, as the record keeps them: a JSON list of room ids.
fn record(core: &Core, user: &str) -> Option<String> {
    let rooms = core.sink()?.rooms_of(user);
    let rooms: Vec<&str> = rooms.iter().map(|r| &**r).collect();
    serde_json::to_string(&rooms).ok()
}

/// Applies this node's presence changes in order, refreshes its users and its liveness,
/// and (on the engine that serves the presence keys) announces the users of nodes that
/// died. At shutdown it says goodbye for its users.
pub(super) async fn run(
    core: Arc<Core>,
    mut conn: ConnectionManager,
    mut changes: mpsc::UnboundedReceiver<Change>,
    config: PresenceConfig,
    mut previous_life: bool,
    stop: CancellationToken,
) {
    let ttl_ms = config.ttl_s * 1000;
    let mut here = Here::default();
    // With `previous_life` (an engine that starts with the node, not one taking over
    // from a live engine): a node that comes back under the id of one that died (a
    // restart with the same server.node_id, before the dead one's liveness expired)
    // first announces what its previous life left behind; only before any user of its
    // own is online.
    let mut refresh = tokio::time::interval(Duration::from_secs(config.refresh_s));
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                // What the node's sockets did last (their leaves, their users going
                // offline), then a goodbye for whoever is still here.
                let mut writes = Writes::default();
                while let Ok(change) = changes.try_recv() {
                    here.apply(change, &mut writes);
                }
                write(&core, &mut conn, &mut here, writes, ttl_ms).await;
                goodbye(&core, &mut conn, &here).await;
                return;
            }
            change = changes.recv() => {
                let Some(change) = change else { return };
                previous_life = false;
                let mut writes = Writes::default();
                here.apply(change, &mut writes);
                while let Ok(change) = changes.try_recv() {
                    here.apply(change, &mut writes);
                }
                write(&core, &mut conn, &mut here, writes, ttl_ms).await;
            }
            _ = refresh.tick() => {
                if std::mem::take(&mut previous_life) {
                    reap(&core, &mut conn, Some(&core.node_id)).await;
                }
                refresh_here(&core, &mut conn, &mut here, ttl_ms).await;
                if core.home.load(std::sync::atomic::Ordering::Relaxed) {
                    reap(&core, &mut conn, None).await;
                }
            }
        }
    }
}

/// The node's record: `volley:presence:node:<id>`; it outlives the node's liveness, so
/// the node that announces its users gone can still read it.
fn record_ttl_ms(ttl_ms: u64) -> u64 {
    3 * ttl_ms
}

/// One pipeline: the online and offline scripts in order, then the records of users
/// whose rooms changed.
async fn write(
    core: &Core,
    conn: &mut ConnectionManager,
    here: &mut Here,
    writes: Writes,
    ttl_ms: u64,
) {
    let dirty: Vec<Arc<str>> = here.dirty.drain().collect();
    if writes.scripts.is_empty() && dirty.is_empty() {
        return;
    }
    let now = now_ms();
    let record_key = core.keys.presence_node(&core.node_id);
    let mut pipe = redis::pipe();
    for (user, online) in &writes.scripts {
        add_change(&mut pipe, core, user, *online, now, ttl_ms);
    }
    let mut written = 0;
    for user in dirty.iter().filter(|u| here.users.contains(*u)) {
        if let Some(rooms) = record(core, user) {
            pipe.hset(&record_key, &**user, rooms).ignore();
            written += 1;
        }
    }
    if written > 0 {
        pipe.cmd("PEXPIRE")
            .arg(&record_key)
            .arg(record_ttl_ms(ttl_ms))
            .ignore();
    }
    if let Err(e) = pipe.query_async::<()>(conn).await {
        // The next refresh puts an online user back and writes every record again; an
        // offline one expires.
        tracing::warn!(changes = writes.scripts.len(), error = %e, "presence changes not written to Redis");
        here.dirty.extend(dirty);
    }
}

/// One user's online or offline script.
fn add_change(
    pipe: &mut redis::Pipeline,
    core: &Core,
    user: &str,
    online: bool,
    now: u64,
    ttl_ms: u64,
) {
    let keys = &core.keys;
    let cmd = pipe.cmd("EVAL");
    if online {
        cmd.arg(if core.spublish() {
            ONLINE_SPUBLISH.as_str()
        } else {
            ONLINE
        })
        .arg(6)
        .arg(keys.presence(user))
        .arg(keys.presence_nodes(user))
        .arg(&keys.presence_index)
        .arg(&keys.presence_info)
        .arg(&keys.presence_nodes)
        .arg(keys.presence_node(&core.node_id))
        .arg(user)
        .arg(&*core.node_id)
        .arg(now)
        .arg(ttl_ms)
        .arg(&keys.presence_updates);
    } else {
        cmd.arg(if core.spublish() {
            OFFLINE_SPUBLISH.as_str()
        } else {
            OFFLINE.as_str()
        })
        .arg(5)
        .arg(keys.presence(user))
        .arg(keys.presence_nodes(user))
        .arg(&keys.presence_index)
        .arg(&keys.presence_info)
        .arg(keys.presence_node(&core.node_id))
        .arg(user)
        .arg(&*core.node_id)
        .arg(now)
        .arg(&keys.presence_updates);
    }
    cmd.ignore();
}

/// Refreshes every user here, the node's liveness and its record. A node that finds its
/// liveness gone while it has users was announced dead (Redis was out of its reach for
/// longer than the TTL): its users are announced online again and its record rewritten.
async fn refresh_here(core: &Core, conn: &mut ConnectionManager, here: &mut Here, ttl_ms: u64) {
    let keys = &core.keys;
    let now = now_ms();
    let expires = now + ttl_ms;
    let record_key = keys.presence_node(&core.node_id);
    if !here.users.is_empty() {
        let listed: Result<Option<f64>, _> = redis::cmd("ZSCORE")
            .arg(&keys.presence_nodes)
            .arg(&*core.node_id)
            .query_async(conn)
            .await;
        if let Ok(None) = listed {
            tracing::warn!(
                users = here.users.len(),
                "this node's presence had expired (announced gone); announcing its users again"
            );
            let writes = Writes {
                scripts: here.users.iter().map(|u| (u.clone(), true)).collect(),
            };
            here.dirty.extend(here.users.iter().cloned());
            write(core, conn, here, writes, ttl_ms).await;
            return;
        }
    }
    // Records that could not be written before go again now.
    if !here.dirty.is_empty() {
        write(core, conn, here, Writes::default(), ttl_ms).await;
    }
    // Six commands a user: the listing entry and the record change only with the user's
    // presence and rooms (written then, and all again when Redis lost them).
    let mut pipe = redis::pipe();
    for user in &here.users {
        let nodes = keys.presence_nodes(user);
        let hash = keys.presence(user);
        pipe.zadd(&nodes, &*core.node_id, expires)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&nodes)
            .arg(ttl_ms)
            .ignore()
            .hset(&hash, "lastSeen", now)
            .ignore()
            .cmd("HSETNX")
            .arg(&hash)
            .arg("serverId")
            .arg(&*core.node_id)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&hash)
            .arg(ttl_ms)
            .ignore()
            .zadd(&keys.presence_index, &**user, expires)
            .ignore();
    }
    // The node is alive, users or not: only a node that stops refreshing is announced
    // dead (a node that shuts down takes itself off).
    pipe.zadd(&keys.presence_nodes, &*core.node_id, expires)
        .ignore()
        .cmd("PEXPIRE")
        .arg(&record_key)
        .arg(record_ttl_ms(ttl_ms))
        .ignore();
    if !here.users.is_empty() {
        pipe.cmd("PEXPIRE")
            .arg(&keys.presence_info)
            .arg(record_ttl_ms(ttl_ms))
            .ignore();
    }
    pipe.cmd("ZREMRANGEBYSCORE")
        .arg(&keys.presence_index)
        .arg("-inf")
        .arg(now)
        .ignore();
    if let Err(e) = pipe.query_async::<()>(conn).await {
        tracing::warn!(users = here.users.len(), error = %e, "presence refresh failed; retrying next interval");
    }
}

/// Claims the nodes whose liveness expired (or `node`, this node's previous life) and
/// announces their users gone: the script publishes `disconnected` for each user no
/// other node has; the rooms it returns get a `user_left` per user, from this node.
async fn reap(core: &Core, conn: &mut ConnectionManager, node: Option<&str>) {
    let keys = &core.keys;
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(if core.spublish() {
        REAP_SPUBLISH.as_str()
    } else {
        REAP.as_str()
    })
    .arg(3)
    .arg(&keys.presence_nodes)
    .arg(&keys.presence_index)
    .arg(&keys.presence_info)
    .arg(now_ms())
    .arg(keys.presence_prefix())
    .arg(keys.presence_node(""))
    .arg(&keys.presence_updates)
    .arg(REAP_BATCH)
    .arg(node.unwrap_or(""));
    let reaped: Vec<Vec<redis::Value>> = match cmd.query_async(conn).await {
        Ok(reaped) => reaped,
        Err(e) => {
            tracing::debug!(error = %e, "could not look for dead nodes' users");
            return;
        }
    };
    for entry in reaped {
        let mut fields = entry.into_iter();
        let Some(Ok(node)) = fields.next().map(redis::from_redis_value::<String>) else {
            continue;
        };
        let mut rooms = Vec::new();
        while let (Some(room), Some(count)) = (fields.next(), fields.next()) {
            if let (Ok(room), Ok(count)) = (
                redis::from_redis_value::<String>(room),
                redis::from_redis_value::<u64>(count),
            ) {
                rooms.push((room, count));
            }
        }
        if node == *core.node_id {
            tracing::info!(rooms = rooms.len(), "this node's previous life left users behind (it died without a goodbye): they are announced gone");
        } else {
            tracing::info!(node = %node, rooms = rooms.len(), "a node's presence expired: its users are announced gone");
        }
        core.counters
            .nodes_reaped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(sink) = core.sink() {
            sink.users_gone(&node, &rooms);
        }
    }
}

/// At shutdown: every user still here goes offline as a live node would take them, and
/// the node leaves the live set, so nobody announces it dead later.
async fn goodbye(core: &Core, conn: &mut ConnectionManager, here: &Here) {
    let keys = &core.keys;
    let now = now_ms();
    let mut pipe = redis::pipe();
    for user in &here.users {
        add_change(&mut pipe, core, user, false, now, 0);
    }
    pipe.zrem(&keys.presence_nodes, &*core.node_id)
        .ignore()
        .del(keys.presence_node(&core.node_id))
        .ignore();
    if let Err(e) = pipe.query_async::<()>(conn).await {
        tracing::warn!(users = here.users.len(), error = %e, "could not say goodbye for this node's users; they expire after presence.ttl_s and are announced gone then");
    }
}

/// A message on `presence:updates`.
pub(super) fn event(message: &[u8]) -> Option<PresenceEvent> {
    #[derive(serde::Deserialize)]
    struct Update {
        #[serde(rename = "type")]
        kind: String,
        #[serde(rename = "userId")]
        user_id: String,
        #[serde(rename = "serverId")]
        server_id: String,
    }
    let update: Update = serde_json::from_slice(message).ok()?;
    Some(PresenceEvent {
        connected: match update.kind.as_str() {
            "connected" => true,
            "disconnected" => false,
            _ => return None,
        },
        user_id: Arc::from(update.user_id),
        server_id: Arc::from(update.server_id),
    })
}
